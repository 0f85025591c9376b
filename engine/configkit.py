"""Checking one section of configuration: the toolkit every config parser uses.

``bot.config``, each front-end's config parser and each participant's own
section of bot.yaml read YAML mappings (with line numbers, from
``engine.yamlconfig``) through a ``Section``.  It lives in the engine so that
participants, which import only the engine, check their configuration the
same way: typed values,
durations, required and unknown keys, and secrets named by ``*_env`` keys.
Every problem is collected as ``file:line: message`` rather than raised, so
``check`` can print them all at once.  Problems stop the bot from starting;
warnings are printed by ``check`` and logged at start, and change nothing.

Secrets are never written in config files: a ``*_env`` key names the
environment variable that holds one.  Checking a configuration must not need
its secrets, so a variable that is not set is a warning for ``check`` and a
problem only when the bot starts (``Findings.need_secrets``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from engine.durations import parse_duration
from engine.yamlconfig import Node, Problem
from engine.templating import MessageTemplate, check_template

Check = Callable[[Any], "str | None"]
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class Findings:
    """What checking found, shared by every section of one configuration."""

    need_secrets: bool = True           # False for ``check``: a missing secret is only a warning
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)


def empty_node(line: int) -> Node:
    node = Node()
    node.line, node.key_lines = line, {}
    return node


class Section:
    """One YAML mapping being checked.  ``label`` starts every message about it
    (``irc network 'libera'``); a value that is not a mapping is reported once
    and then read as an empty one, so callers need no special case."""

    def __init__(self, node: Any, file: str, findings: Findings, *, label: str = "",
                 line: int = 0, what: str = "") -> None:
        self.file = file
        self.findings = findings
        self.label = label
        if isinstance(node, Node):
            self.node = node
        else:
            self.node = empty_node(getattr(node, "line", line))
            if node is not None:
                self.problem(None, f"{what or label or 'section'}: expected a mapping")

    # -- reporting -------------------------------------------------------------------

    def line(self, key: str | None) -> int:
        return self.node.line_of(key) if key else self.node.line

    def _message(self, message: str) -> str:
        return f"{self.label}: {message}" if self.label else message

    def problem(self, key: str | None, message: str) -> None:
        self.findings.problems.append(Problem(self.file, self.line(key), self._message(message)))

    def warn(self, key: str | None, message: str) -> None:
        self.findings.warnings.append(Problem(self.file, self.line(key), self._message(message)))

    @property
    def ok(self) -> bool:
        """No problem was found anywhere in this configuration so far."""
        return not self.findings.problems

    # -- keys --------------------------------------------------------------------------

    def __contains__(self, key: str) -> bool:
        return key in self.node

    def raw(self, key: str, default: Any = None) -> Any:
        return self.node.get(key, default)

    def check_keys(self, allowed: tuple[str, ...], secrets: Mapping[str, str] | None = None,
                   what: str = "") -> None:
        """Unknown keys are problems; ``secrets`` maps a key that would hold a
        secret in the file (``password``) to the ``*_env`` key to use instead."""
        for key in self.node:
            if secrets and key in secrets:
                self.problem(key, f"{key}: secrets are not written in config files; put it in an "
                                  f"environment variable and name it with {secrets[key]}")
            elif key not in allowed:
                where = f" in {what}" if what else ""
                self.problem(key, f"unknown key {key!r}{where} (expected {', '.join(allowed)})")

    def require(self, *keys: str) -> None:
        for key in keys:
            if key not in self.node:
                self.problem(None, f"missing {key!r}")

    # -- values ------------------------------------------------------------------------

    def get(self, key: str, kind: type | tuple[type, ...], default: Any, check: Check | None = None,
            *, required: bool = False) -> Any:
        """The value of ``key`` if it has the type (a bool is not a number) and
        passes ``check`` (which returns a message for a bad value); else ``default``."""
        if key not in self.node:
            if required:
                self.problem(None, f"missing {key!r}")
            return default
        value = self.node[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(k.__name__ for k in kinds)
            self.problem(key, f"{key}: expected {names}, got {value!r}")
            return default
        message = check(value) if check else None
        if message:
            self.problem(key, f"{key}: {message}")
            return default
        return value

    def duration(self, key: str, default: float, *, minimum: float = 0.0, why: str = "") -> float:
        """A duration (``90s``, ``5m``) in seconds, more than 0 and at least ``minimum``."""
        if key not in self.node:
            return default
        try:
            seconds = parse_duration(self.node[key])
        except ValueError as exc:
            self.problem(key, f"{key}: {exc}")
            return default
        if seconds <= 0 or seconds < minimum:
            floor = f"at least {_seconds(minimum)}" if minimum else "must be more than 0"
            self.problem(key, f"{key}: {floor}" + (f" ({why})" if why else ""))
            return default
        return seconds

    def names(self, key: str, what: str) -> list[str]:
        """A string or a list of strings."""
        value = self.node.get(key, [])
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        self.problem(key, f"{key}: expected {what}")
        return []

    def secret(self, key: str) -> str | None:
        """The secret in the environment variable that ``key`` (``password_env``)
        names.  Not set: a problem when the bot starts, a warning for ``check``."""
        env = self.get(key, str, None, lambda v: None if _ENV_NAME.match(v) else
                       "the name of an environment variable")
        if env is None:
            return None
        value = os.environ.get(env)
        if not value:
            message = f"{key}: environment variable {env} is not set (or empty)"
            if self.findings.need_secrets:
                self.problem(key, message)
            else:
                self.warn(key, message + "; the bot will refuse to start without it")
        return value or None

    def sub(self, key: str, allowed: tuple[str, ...], what: str = "") -> "Section":
        """A nested mapping (absent: empty), its unknown keys reported."""
        section = Section(self.node.get(key), self.file, self.findings, label=self.label,
                          line=self.line(key), what=what or key)
        section.check_keys(allowed, what=what or key)
        return section


def _seconds(value: float) -> str:
    return f"{value:g}s"


def message_templates(section: Section, key: str, what: str,
                      name_problem: Callable[[str], str | None] = lambda _n: None) -> dict[str, MessageTemplate]:
    """``key: {<name>: {chat, subject, body}}`` in ``section``, each checked (syntax, a chat line)
    and reported at its own line; ``name_problem`` checks the names."""
    templates: dict[str, MessageTemplate] = {}
    node = section.raw(key, {})
    if not isinstance(node, Node):
        if node:
            section.problem(key, f"{key}: expected a mapping of {what} -> {{chat, subject, body}}")
        return templates
    for name in node:
        item = Section(node[name], section.file, section.findings, label=f"{section.label} template {name!r}".strip(),
                       line=node.line_of(name), what="template")
        item.check_keys(("chat", "subject", "body"))
        problem = name_problem(str(name))
        if problem:
            item.problem(None, problem)
        values = {k: item.get(k, str, "", check_template) for k in ("chat", "subject", "body")}
        if not values["chat"]:
            item.problem(None, "missing 'chat' (the line sent to chat; mail uses it when subject or body is absent)")
        templates[str(name)] = MessageTemplate(values["chat"], values["subject"], values["body"])
    return templates
