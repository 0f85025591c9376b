"""YAML with line numbers, and the ``file:line: message`` problem type.

Every loader (process definitions, bot config, users) reads YAML through
``load_yaml`` so that any problem can name the exact place it comes from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True, order=True)
class Problem:
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class ConfigError(Exception):
    """One or more problems in configuration or definitions."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class Node(dict):  # type: ignore[type-arg]
    """A YAML mapping that remembers the line of itself and of each key."""

    line: int
    key_lines: dict[str, int]

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)


class NodeList(list):  # type: ignore[type-arg]
    line: int
    item_lines: list[int]


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> Node:
    loader.flatten_mapping(node)
    result = Node()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise yaml.constructor.ConstructorError(
                None, None, "mapping keys must be plain scalars", key_node.start_mark)
        key = str(key)
        if key in result:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> NodeList:
    result = NodeList(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def load_yaml(path: Path, display: str | None = None) -> Any:
    """Parse one YAML file; a syntax error becomes a ConfigError naming file:line."""
    name = display or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(name, 0, f"cannot read: {exc.strerror}")]) from None
    return loads_yaml(text, name)


def loads_yaml(text: str, name: str) -> Any:
    try:
        return yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        raise ConfigError([Problem(name, line, f"YAML syntax: {exc.problem or exc}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(name, 0, f"YAML syntax: {exc}")]) from None


def line_of(value: Any, default: int = 0) -> int:
    return getattr(value, "line", default)


UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# The longest duration anything may name.  Far beyond any release chore, and far
# inside what datetime can represent: a due time years past 9999 would stop every
# timer from being armed (and the bot from starting) instead of failing one step.
MAX_DURATION = 3650 * 86400.0
MAX_DURATION_TEXT = "10 years (3650d)"


def parse_duration(text: Any) -> float:
    """'90s', '4h', '2d', '1h30m', '500ms' -> seconds, at most MAX_DURATION.  Raises ValueError."""
    import re

    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ValueError(f"bad duration {text!r}: expected e.g. 90s, 4h, 2d")
    if isinstance(text, (int, float)):
        if not math.isfinite(text):
            raise ValueError(f"bad duration {text!r}: must be finite")
        if text < 0:
            raise ValueError(f"bad duration {text!r}: negative")
        seconds = float(text)
    else:
        s = text.strip().replace(" ", "")
        parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)", s)
        if not s or "".join(n + u for n, u in parts) != s:
            raise ValueError(f"bad duration {text!r}: expected e.g. 90s, 4h, 2d, 1h30m")
        seconds = sum(float(n) * UNITS[u] for n, u in parts)
    if seconds > MAX_DURATION:
        raise ValueError(f"bad duration {text!r}: longer than {MAX_DURATION_TEXT}")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds as people write them: 90 -> '90s', 7200 -> '2h', 1.5 -> '1.5s'."""
    for unit in ("w", "d", "h", "m"):
        size = UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds >= UNITS["d"]:
        return f"about {seconds / UNITS['d']:.0f}d"
    return f"{seconds:g}s"
