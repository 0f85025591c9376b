"""Process definitions: YAML files loaded into immutable ``ProcessSpec`` /
``StepSpec`` trees.  Every problem is reported as ``file:line: message``,
all of them at once.

A definition::

    name: hello                 # defaults to the file name
    description: Say hello
    project: Project:Devel      # roles are checked on this project (a launch field may override)
    launch_roles: [admins]      # who may launch, cancel and retry it
    inputs: {count: int}        # launch/retry values are text unless typed here
    fields: {who: world}        # defaults, overridden by launch fields
    extra_fields: refuse        # or allow: take launch fields the definition does not know
    on_error: ...               # optional, for the whole process
    on_cancel: ...              # optional: a subprocess run when the instance is cancelled
    steps:
      - participant: echo
        params: {text: "hello {{ who }}"}

Steps are mappings with exactly one expression key (see ``EXPRESSIONS``) plus
the common attributes ``id``, ``timeout``, ``on_timeout``, ``on_error``,
``on_cancel``, ``timers`` and ``if`` (a guard: with another expression key,
``if`` decides whether the step runs; with ``then`` it is the conditional).
A nested list is a sequence.

A ``for_each`` runs one copy of its body per item.  The copies have paths of
their own ("3.0", "3.1", ... under the for_each at "3"; the body as written
is the template at "3.do"), made on demand by ``ProcessSpec.find``.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from engine.yamlconfig import ConfigError, Node, NodeList, Problem, loads_yaml
from engine.durations import MAX_DURATION, MAX_DURATION_TEXT, format_duration, parse_duration
from engine.templating import check_expression, check_template, fields_read

EXPRESSIONS = ("participant", "sequence", "concurrence", "if", "wait", "repeat", "for_each",
               "subprocess", "set", "terminate", "error")
COMMON = ("id", "timeout", "on_timeout", "on_error", "on_cancel", "timers")
EXTRA = {  # keys an expression takes besides its own and the common ones
    "participant": ("params",),
    "concurrence": ("wait_for", "merge"),
    "if": ("then", "else"),
    "repeat": ("max", "break_if", "on_exhausted"),
    "for_each": ("as", "do", "concurrent", "wait_for", "merge", "max_parallel", "collect"),
    "subprocess": ("fields",),
}
MERGES = ("union", "first", "last", "none")
PROCESS_KEYS = ("name", "description", "project", "launch_roles", "inputs", "fields", "extra_fields", "steps",
                "timeout", "on_timeout", "on_error", "on_cancel")
INPUT_TYPES = ("str", "int", "float", "bool")
BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
MAX_ITEMS = 1000          # for_each: more items than this fail the step (each keeps state in the instance row)
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
_INT_LIMIT = 2 ** 63
# The definition language: what a definition's keys mean.  Each stored
# definition records the language it was written in, and an instance keeps
# its definition's language for good (``Engine._spec_of``), so a new default
# never changes what an instance launched earlier does.  Language 1 is every
# definition stored before languages were recorded.
LANGUAGE = 2
LANGUAGES = (1, 2)


@dataclass(frozen=True)
class Policy:
    """What to do on error or timeout: ``error`` (let it rise), ``skip``,
    ``retry`` (``retries`` times, ``backoff`` doubling) then ``then``,
    or run ``subprocess`` as a handler."""

    kind: str
    retries: int = 0
    backoff: float = 0.0
    subprocess: str | None = None
    then: "Policy | None" = None


ERROR = Policy("error")


@dataclass(frozen=True)
class StepSpec:
    kind: str
    path: str                       # stable position in the tree: "", "0", "2.1.0", "3.then.0"
    line: int
    label: str | None = None        # the author's ``id``
    children: tuple["StepSpec", ...] = ()
    participant: str | None = None
    params: Any = None              # participant params, set fields, subprocess fields, messages, for_each items
    condition: str | None = None    # if / break_if
    wait_for: str | int = "all"     # concurrence, for_each: all / any / N
    merge: str = "union"
    duration: float | None = None   # wait
    until: str | None = None        # wait until (HH:MM, ISO time or a template)
    max: int = 0                    # repeat
    on_exhausted: str = "error"     # repeat: max reached with break_if still false: error | continue
    process: str | None = None      # subprocess
    var: str | None = None          # for_each: the field holding the item (``as``)
    concurrent: bool = False        # for_each: bodies side by side
    max_parallel: int | None = None  # for_each concurrent: at most this many bodies at once
    collect: str | None = None      # for_each: the field that gets each body's changed fields, in item order
    timeout: float | None = None
    on_timeout: Policy = ERROR
    on_error: Policy | None = None
    on_cancel: str | None = None    # a subprocess run when the step is cancelled while under way
    guard: str | None = None        # ``if:`` on a step of another kind: run it only when true
    timers: tuple[tuple[float, str], ...] = ()   # named timers delivered to the participant
    scope: tuple[str, int] | None = None          # nearest enclosing concurrence branch or for_each body

    @property
    def name(self) -> str:
        """How a person sees this step: its id, or kind and position."""
        if self.label:
            return self.label
        what = self.participant or self.process or self.kind
        return f"{what}@{self.path or 'root'}"


InputType = str | tuple[str, ...]     # "str", "int", "float", "bool", or the allowed texts


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    file: str
    description: str
    project: str | None
    launch_roles: tuple[str, ...]
    fields: Mapping[str, Any]
    root: StepSpec
    steps: Mapping[str, StepSpec] = field(repr=False, default_factory=dict)
    parents: Mapping[str, str] = field(repr=False, default_factory=dict)
    subprocess_refs: tuple[tuple[str, int], ...] = ()
    source: str = field(repr=False, default="")   # the YAML text: stored with the instances that use it
    digest: str = ""                               # identifies this version of the definition (and language)
    language: int = LANGUAGE                       # the definition language it is read in
    inputs: Mapping[str, InputType] = field(default_factory=dict)   # declared launch field types
    extra_fields: bool = False                     # take launch fields it does not know (language 1: always)
    reads: frozenset[str] = frozenset()            # every field its templates and conditions read
    _copies: dict[str, StepSpec] = field(repr=False, compare=False, default_factory=dict)

    def find(self, path: str) -> StepSpec | None:
        """The step at ``path``, a for_each body's copy included (made the first time it is asked for)."""
        spec = self.steps.get(path)
        if spec is not None:
            return spec
        spec = self._copies.get(path)
        if spec is not None or not path:
            return spec
        parent_path, _, last = path.rpartition(".")
        parent = self.find(parent_path)
        if parent is None:
            return None
        if parent.kind == "for_each" and last.isdigit() and parent.children:
            template = parent.children[0]
            copy = _copy(template, template.path, path, parent.path, int(last))
            self._remember(copy)
            return copy
        return self._copies.get(path)

    def step(self, path: str) -> StepSpec:
        spec = self.steps.get(path) or self._copies.get(path) or self.find(path)
        if spec is None:
            raise KeyError(path)
        return spec

    def _remember(self, spec: StepSpec) -> None:
        self._copies[spec.path] = spec
        for child in spec.children:
            self._remember(child)

    def parent_path(self, path: str) -> str | None:
        if path in self.parents:
            return self.parents[path]
        return path.rpartition(".")[0] if path else None

    def parent(self, path: str) -> StepSpec | None:
        p = self.parent_path(path)
        return None if p is None else self.find(p)

    def subprocesses(self) -> Iterable[tuple[str, int]]:
        """Every process this one may start, with the line naming it."""
        return iter(self.subprocess_refs)


def _copy(spec: StepSpec, old: str, new: str, owner: str, index: int) -> StepSpec:
    """``spec`` (under the for_each template at ``old``) as the body of item
    ``index``, at ``new``: its paths moved, its scope the item's, its id marked."""
    def moved(path: str) -> str:
        return new + path[len(old):]
    scope = spec.scope
    if scope is not None:
        if scope[0] == owner:
            scope = (owner, index)
        elif scope[0] == old or scope[0].startswith(old + "."):
            scope = (moved(scope[0]), scope[1])
    return dataclasses.replace(spec, path=moved(spec.path), scope=scope,
                               label=f"{spec.label}[{index}]" if spec.label else None,
                               children=tuple(_copy(c, old, new, owner, index) for c in spec.children))


# -- launch fields ---------------------------------------------------------------------

def convert_field(name: str, kind: InputType, value: Any) -> Any:
    """``value`` as the declared ``kind``: text is converted by the type's own
    rules (no YAML: 010 is ten, 1.10 stays 1.10 as text), a value that already
    has the type is taken.  Raises ValueError with a message naming the field."""
    if isinstance(kind, tuple):
        if isinstance(value, str) and value in kind:
            return value
        raise ValueError(f"{name}: expected one of {', '.join(kind)}, got {_shown(value)}")
    if kind == "str":
        if isinstance(value, str):
            return value
        raise ValueError(f"{name}: expected text, got {_shown(value)}")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in BOOL_WORDS:
            return BOOL_WORDS[value.strip().lower()]
        raise ValueError(f"{name}: expected true or false (yes/no, on/off, 1/0), got {_shown(value)}")
    if kind == "int":
        number: Any = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and _INT.fullmatch(value.strip()):
            digits = value.strip().lstrip("+-")
            if len(digits.lstrip("0")) > 19:
                raise ValueError(f"{name}: {_shown(value)} is too large a number")
            number = int(value.strip())
        if number is None:
            raise ValueError(f"{name}: expected a whole number, got {_shown(value)}")
        if not -_INT_LIMIT <= number < _INT_LIMIT:
            raise ValueError(f"{name}: {_shown(value)} is too large a number")
        return number
    if kind == "float":
        result: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            result = float(value)
        elif isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            result = float(value.strip())
        if result is None or not math.isfinite(result):
            raise ValueError(f"{name}: expected a number, got {_shown(value)}")
        return result
    raise ValueError(f"{name}: unknown type {kind!r}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "..."


def known_fields(spec: ProcessSpec, specs: Mapping[str, ProcessSpec] | None = None) -> frozenset[str]:
    """The fields a launch of ``spec`` may set: ``project`` and those it declares
    (``fields``, ``inputs``); with ``specs``, also those declared by every
    process it may start (subprocesses and handlers get all of its fields).
    A field a template merely reads is not declared: declaring it (with a
    default in ``fields``, or a type in ``inputs``) is what makes a misspelt
    launch field detectable."""
    names = {"project"}
    todo, seen = [spec], {spec.name}
    while todo:
        current = todo.pop()
        names |= set(current.fields) | set(current.inputs)
        for name, _line in current.subprocesses():
            called = specs.get(name) if specs is not None else None
            if called is not None and name not in seen:
                seen.add(name)
                todo.append(called)
    return frozenset(names)


def unknown_fields(spec: ProcessSpec, fields: Iterable[str], specs: Mapping[str, ProcessSpec] | None = None,
                   *, known: frozenset[str] | None = None) -> list[str]:
    """One message per field of ``fields`` that ``spec`` does not know (see
    ``known_fields``; ``known`` if given), with a did-you-mean; none if it
    says ``extra_fields: allow``."""
    if spec.extra_fields:
        return []
    if known is None:
        known = known_fields(spec, specs)
    out = []
    for name in fields:
        if name in known:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        if close:
            out.append(f"unknown field {name!r} (did you mean {close[0]!r}?)")
        else:
            listed = sorted(known)
            shown = ", ".join(listed[:12]) + (", ..." if len(listed) > 12 else "")
            out.append(f"unknown field {name!r} (known: {shown})")
    return out


def field_problems(spec: ProcessSpec, fields: Mapping[str, Any],
                   specs: Mapping[str, ProcessSpec] | None = None) -> list[str]:
    """Everything wrong with launching ``spec`` with ``fields`` (a schedule's,
    at check time): unknown fields and values that do not convert."""
    problems = unknown_fields(spec, fields, specs)
    for name, value in fields.items():
        kind = spec.inputs.get(name)
        if kind is not None:
            try:
                convert_field(name, kind, value)
            except ValueError as exc:
                problems.append(str(exc))
    return problems


def launch_fields(spec: ProcessSpec, fields: Mapping[str, Any], specs: Mapping[str, ProcessSpec] | None = None,
                  *, known: frozenset[str] | None = None) -> dict[str, Any]:
    """``fields`` converted by ``spec``'s inputs; raises ValueError with every
    problem (unknown fields, values that do not convert), '; '-joined."""
    problems = unknown_fields(spec, fields, specs, known=known)
    out: dict[str, Any] = {}
    for name, value in fields.items():
        kind = spec.inputs.get(name)
        try:
            out[name] = value if kind is None else convert_field(name, kind, value)
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ValueError("; ".join(problems))
    return out


class _Parser:
    def __init__(self, file: str, participants: frozenset[str] | None, language: int = LANGUAGE) -> None:
        self.file = file
        self.participants = participants
        self.language = language
        self.reads: set[str] = set()          # fields read by templates and conditions
        self.bound: set[str] = {"error", "cancel"}   # fields the engine or a for_each provides
        self.problems: list[Problem] = []
        self.steps: dict[str, StepSpec] = {}
        self.parents: dict[str, str] = {}
        self.subprocess_refs: list[tuple[str, int]] = []
        self.labels: dict[str, int] = {}     # step id -> line where it is first used

    def problem(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.file, line, message))

    # -- common attributes --------------------------------------------------

    def duration(self, value: Any, line: int, what: str) -> float | None:
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.problem(line, f"{what}: {exc}")
            return None

    def policy(self, value: Any, line: int, what: str, allow_retry: bool) -> Policy:
        if value in ("error", "skip"):
            return Policy(str(value))
        if isinstance(value, Node):
            keys = set(value)
            if "subprocess" in value and keys == {"subprocess"}:
                return Policy("subprocess", subprocess=self.process_name(value["subprocess"],
                                                                         value.line_of("subprocess")))
            if allow_retry and "retry" in value and keys <= {"retry", "backoff", "then"}:
                retries = value["retry"]
                if not isinstance(retries, int) or isinstance(retries, bool) or not 1 <= retries <= 100:
                    self.problem(value.line_of("retry"), f"{what}: retry must be a whole number from 1 to 100")
                    retries = 1
                backoff = self.duration(value.get("backoff", "10s"), value.line_of("backoff"), f"{what} backoff")
                if backoff is not None and backoff * 2 ** (retries - 1) > MAX_DURATION:
                    # the backoff doubles: the last wait must stay a time a timer can be armed for
                    self.problem(value.line_of("retry"),
                                 f"{what}: the last of {retries} retries would wait "
                                 f"{format_duration(backoff * 2 ** (retries - 1))}, more than "
                                 f"{MAX_DURATION_TEXT}; use fewer retries or a shorter backoff")
                then = self.policy(value.get("then", "error"), value.line_of("then"), f"{what} then", False)
                return Policy("retry", retries=retries, backoff=backoff or 0.0, then=then)
        forms = "error, skip, {retry: N, backoff: 10s, then: skip}, or {subprocess: NAME}" if allow_retry \
            else "error, skip, or {subprocess: NAME}"
        self.problem(line, f"{what}: expected {forms}, got {value!r}")
        return ERROR

    def handler(self, value: Any, line: int, what: str) -> str | None:
        """``{subprocess: NAME}``: the process to run (on_cancel)."""
        if isinstance(value, Node) and set(value) == {"subprocess"}:
            return self.process_name(value["subprocess"], value.line_of("subprocess"))
        self.problem(line, f"{what}: expected {{subprocess: NAME}}, got {value!r}")
        return None

    def process_name(self, value: Any, line: int) -> str | None:
        if not isinstance(value, str) or not _NAME.match(value):
            self.problem(line, f"bad process name {value!r}")
            return None
        self.subprocess_refs.append((value, line))
        return value

    def timers(self, value: Any, line: int) -> tuple[tuple[tuple[float, str], ...], float | None]:
        """'4h: remind, 1d: escalate, 2d: timeout' -> named timers, and the timeout.
        A name may come back ('4h: remind, 8h: remind'): each is a timer of its own."""
        if not isinstance(value, str):
            self.problem(line, f"timers: expected a string like '4h: remind, 2d: timeout', got {value!r}")
            return (), None
        named: list[tuple[float, str]] = []
        timeout = None
        for part in filter(None, (p.strip() for p in value.split(","))):
            when, sep, name = (x.strip() for x in part.partition(":"))
            if not sep or not re.match(r"^[a-z][a-z0-9_]*$", name):
                self.problem(line, f"timers: bad entry {part!r}: expected 'DURATION: name'")
                continue
            seconds = self.duration(when, line, f"timers {name}")
            if seconds is None:
                continue
            if name == "timeout":
                timeout = seconds
            else:
                named.append((seconds, name))
        return tuple(sorted(named)), timeout

    # -- steps --------------------------------------------------------------

    def sequence(self, value: Any, line: int, path: str, scope: tuple[str, int] | None,
                 label: str | None = None) -> StepSpec:
        if not isinstance(value, list) or not value:
            self.problem(line, "expected a non-empty list of steps")
            value = []
        lines = getattr(value, "item_lines", [line] * len(value))
        children = tuple(self.step(item, lines[i], f"{path}.{i}" if path else str(i), path, scope)
                         for i, item in enumerate(value))
        spec = StepSpec("sequence", path, line, label=label, children=children, scope=scope)
        self.steps[path] = spec
        return spec

    def step(self, node: Any, line: int, path: str, parent: str, scope: tuple[str, int] | None) -> StepSpec:
        self.parents[path] = parent
        if isinstance(node, list):
            return self.sequence(node, line, path, scope)
        if not isinstance(node, Node):
            self.problem(line, f"a step must be a mapping like '- participant: echo', got {node!r}")
            return self._register(StepSpec("error", path, line, params="invalid step", scope=scope))
        kinds = [k for k in node if k in EXPRESSIONS]
        guard: Any = None
        if "if" in kinds and len(kinds) == 2 and "then" not in node:
            # 'if' beside another expression guards it; 'if' with 'then' is the conditional
            kinds.remove("if")
            guard = node["if"]
            if "else" in node:
                self.problem(node.line_of("else"), "else: only an if with then has one; an 'if' on a "
                                                   f"{kinds[0]} step only decides whether it runs")
        elif "if" in kinds and len(kinds) > 1 and "then" in node:
            others = ", ".join(k for k in kinds if k != "if")
            self.problem(node.line, f"an if with then is a conditional and takes no other expression; found {others} "
                                    "(to guard a step, give it 'if' without 'then')")
            return self._register(StepSpec("error", path, node.line, params="invalid step", scope=scope))
        if len(kinds) != 1:
            if kinds:
                self.problem(node.line, f"a step takes exactly one of {', '.join(EXPRESSIONS)}; found {', '.join(kinds)}")
            else:
                unknown = [k for k in node if k not in COMMON and not any(k in e for e in EXTRA.values())]
                self.problem(node.line, f"unknown expression {unknown[0] if unknown else next(iter(node), '?')!r} "
                                        f"(expected one of {', '.join(EXPRESSIONS)})")
            return self._register(StepSpec("error", path, node.line, params="invalid step", scope=scope))
        kind = kinds[0]
        allowed = {kind, *COMMON, *EXTRA.get(kind, ())} | ({"if", "else"} if guard is not None else set())
        for key in node:
            if key not in allowed:
                self.problem(node.line_of(key), f"unknown key {key!r} in a {kind} step")
        common = self.common(node, kind)
        if guard is not None:
            if not isinstance(guard, (str, bool)):
                self.problem(node.line_of("if"), f"if: expected a condition, got {guard!r}")
            else:
                guard = str(guard).lower() if isinstance(guard, bool) else guard
                self.condition(guard, node.line_of("if"))
                common["guard"] = guard
        value, vline = node[kind], node.line_of(kind)
        attrs: dict[str, Any] = {}
        children: tuple[StepSpec, ...] = ()
        if kind == "participant":
            if not isinstance(value, str):
                self.problem(vline, f"participant: expected a name, got {value!r}")
            elif self.participants is not None and value not in self.participants:
                known = ", ".join(sorted(self.participants)) or "none"
                self.problem(vline, f"unknown participant {value!r} (known: {known})")
            params = node.get("params", {})
            if not isinstance(params, dict):
                self.problem(node.line_of("params"), "params: expected a mapping")
                params = {}
            self.template(params, node.line_of("params"))
            attrs.update(participant=value if isinstance(value, str) else None, params=dict(params))
        elif kind == "sequence":
            children = self.sequence(value, vline, path, scope).children
        elif kind == "concurrence":
            if not isinstance(value, list) or len(value) < 1:
                self.problem(vline, "concurrence: expected a list of branches")
                value = []
            lines = getattr(value, "item_lines", [vline] * len(value))
            branches = []
            for i, branch in enumerate(value):
                bpath = f"{path}.{i}" if path else str(i)
                self.parents[bpath] = path
                items = branch if isinstance(branch, list) else [branch]
                seq_lines = NodeList(items)
                seq_lines.line = lines[i]
                seq_lines.item_lines = getattr(branch, "item_lines", [lines[i]] * len(items))
                branches.append(self.sequence(seq_lines, lines[i], bpath, (path, i)))
            children = tuple(branches)
            wait_for = node.get("wait_for", "all")
            if wait_for not in ("all", "any") and not (
                    isinstance(wait_for, int) and not isinstance(wait_for, bool) and 1 <= wait_for <= len(branches)):
                self.problem(node.line_of("wait_for"),
                             f"wait_for: expected all, any or a number from 1 to {len(branches)}, got {wait_for!r}")
                wait_for = "all"
            merge = node.get("merge", "union")
            if merge not in MERGES:
                self.problem(node.line_of("merge"), f"merge: expected one of {', '.join(MERGES)}, got {merge!r}")
                merge = "union"
            attrs.update(wait_for=wait_for, merge=merge)
        elif kind == "if":
            if not isinstance(value, (str, bool)):
                self.problem(vline, f"if: expected a condition, got {value!r}")
                value = "false"
            self.condition(str(value).lower() if isinstance(value, bool) else value, vline)
            if "then" not in node:
                self.problem(node.line, "if: missing 'then'")
            then = self.sequence(node.get("then", []), node.line_of("then"), f"{path}.then", scope)
            self.parents[then.path] = path
            children = (then,)
            if "else" in node:
                other = self.sequence(node["else"], node.line_of("else"), f"{path}.else", scope)
                self.parents[other.path] = path
                children = (then, other)
            attrs["condition"] = str(value).lower() if isinstance(value, bool) else value
        elif kind == "wait":
            if isinstance(value, Node):
                if set(value) != {"until"} or not isinstance(value["until"], str):
                    self.problem(vline, "wait: expected a duration (90s, 4h, 2d) or {until: '02:00'}")
                else:
                    until = value["until"]
                    if "{{" in until:
                        self.template(until, vline)
                    elif not _parse_until_ok(until):
                        self.problem(vline, f"wait until: bad time {until!r}: expected HH:MM or an ISO date-time")
                    attrs["until"] = until
            else:
                attrs["duration"] = self.duration(value, vline, "wait") or 0.0
        elif kind == "repeat":
            maximum = node.get("max")
            if not isinstance(maximum, int) or isinstance(maximum, bool) or maximum < 1:
                self.problem(node.line_of("max") if "max" in node else node.line,
                             "repeat: needs 'max', a whole number of at least 1 (a loop must end)")
                maximum = 1
            if "break_if" in node:
                self.condition(node["break_if"], node.line_of("break_if"))
            exhausted = node.get("on_exhausted", "error" if self.language >= 2 else "continue")
            if exhausted not in ("error", "continue"):
                self.problem(node.line_of("on_exhausted"), f"on_exhausted: expected error or continue, got {exhausted!r}")
                exhausted = "error"
            elif "on_exhausted" in node and "break_if" not in node:
                self.problem(node.line_of("on_exhausted"), "on_exhausted without break_if: a repeat without "
                                                           "break_if runs max times and ends")
            body = self.sequence(value, vline, f"{path}.body", scope)
            self.parents[body.path] = path
            children = (body,)
            attrs.update(max=maximum, condition=node.get("break_if"), on_exhausted=exhausted)
        elif kind == "for_each":
            children = (self.for_each(node, value, vline, path, attrs),)
        elif kind == "subprocess":
            fields = node.get("fields", {})
            if not isinstance(fields, dict):
                self.problem(node.line_of("fields"), "fields: expected a mapping")
                fields = {}
            self.template(fields, node.line_of("fields"))
            attrs.update(process=self.process_name(value, vline), params=dict(fields))
        elif kind == "set":
            if not isinstance(value, dict) or not value:
                self.problem(vline, "set: expected a mapping of fields")
                value = {}
            self.template(value, vline)
            attrs["params"] = dict(value)
        elif kind in ("terminate", "error"):
            if value is not None and not isinstance(value, str):
                self.problem(vline, f"{kind}: expected a message, got {value!r}")
                value = str(value)
            self.template(value or "", vline)
            attrs["params"] = value or ("terminated" if kind == "terminate" else "error")
        if common.get("timers") and kind != "participant":
            self.problem(node.line_of("timers"), "timers other than 'timeout' only make sense on a participant step")
        spec = StepSpec(kind, path, node.line, children=children, scope=scope, **common, **attrs)
        return self._register(spec)

    def common(self, node: Node, kind: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "id" in node:
            label = node["id"]
            if not isinstance(label, str) or not _NAME.match(label):
                self.problem(node.line_of("id"), f"id: expected a simple name, got {label!r}")
            elif label in self.labels:
                # people (and approvals) name a step by its id: it must say which step
                self.problem(node.line_of("id"), f"id {label!r} is already used by the step at line "
                                                 f"{self.labels[label]}")
            else:
                self.labels[label] = node.line
                out["label"] = label
        timeout = None
        if "timers" in node:
            named, timeout = self.timers(node["timers"], node.line_of("timers"))
            out["timers"] = named
        if "timeout" in node:
            if timeout is not None:
                self.problem(node.line_of("timeout"), "timeout given twice (in 'timeout' and in 'timers')")
            timeout = self.duration(node["timeout"], node.line_of("timeout"), "timeout")
        if timeout is not None:
            out["timeout"] = timeout
            for seconds, name in out.get("timers", ()):
                if seconds >= timeout:
                    self.problem(node.line_of("timers"),
                                 f"timers: {name} at {format_duration(seconds)} can never fire: the step "
                                 f"times out at {format_duration(timeout)}")
        if "on_timeout" in node:
            if timeout is None:
                self.problem(node.line_of("on_timeout"), "on_timeout without a timeout")
            out["on_timeout"] = self.policy(node["on_timeout"], node.line_of("on_timeout"), "on_timeout", False)
        if "on_error" in node:
            out["on_error"] = self.policy(node["on_error"], node.line_of("on_error"), "on_error", True)
        if "on_cancel" in node:
            out["on_cancel"] = self.handler(node["on_cancel"], node.line_of("on_cancel"), "on_cancel")
        return out

    def for_each(self, node: Node, value: Any, vline: int, path: str, attrs: dict[str, Any]) -> StepSpec:
        """``for_each: "{{ items }}"`` (or a list), ``as``, ``do``, and for
        ``concurrent: true`` also ``wait_for``, ``merge``, ``max_parallel``."""
        if isinstance(value, str):
            if "{{" not in value:
                self.problem(vline, f"for_each: expected a list or a template like '{{{{ items }}}}', got {value!r}")
            self.template(value, vline)
        elif isinstance(value, list):
            self.template(value, vline)
        else:
            self.problem(vline, f"for_each: expected a list or a template like '{{{{ items }}}}', got {value!r}")
            value = []
        var = node.get("as", "item")
        if not isinstance(var, str) or not _FIELD.match(var):
            self.problem(node.line_of("as"), f"as: expected a field name, got {var!r}")
            var = "item"
        self.bound.add(var)
        concurrent = node.get("concurrent", False)
        if not isinstance(concurrent, bool):
            self.problem(node.line_of("concurrent"), f"concurrent: expected true or false, got {concurrent!r}")
            concurrent = False
        for key in ("wait_for", "max_parallel"):
            if key in node and not concurrent:
                self.problem(node.line_of(key), f"{key}: only for a concurrent for_each (concurrent: true)")
        wait_for = node.get("wait_for", "all")
        if wait_for not in ("all", "any") and not (
                isinstance(wait_for, int) and not isinstance(wait_for, bool) and wait_for >= 1):
            self.problem(node.line_of("wait_for"), f"wait_for: expected all, any or a number of at least 1, "
                                                   f"got {wait_for!r}")
            wait_for = "all"
        merge = node.get("merge", "union")
        if merge not in MERGES:
            self.problem(node.line_of("merge"), f"merge: expected one of {', '.join(MERGES)}, got {merge!r}")
            merge = "union"
        most = node.get("max_parallel")
        if most is not None and (not isinstance(most, int) or isinstance(most, bool) or most < 1):
            self.problem(node.line_of("max_parallel"), f"max_parallel: expected a whole number of at least 1, "
                                                       f"got {most!r}")
            most = None
        collect = node.get("collect", "results")
        if not isinstance(collect, str) or not _FIELD.match(collect):
            self.problem(node.line_of("collect"), f"collect: expected a field name, got {collect!r}")
            collect = "results"
        do = node.get("do")
        if isinstance(do, list) and len(do) == 1 and not isinstance(do[0], list):
            # one step: it is the body itself, with no sequence around it (less state per item)
            body = self.step(do[0], getattr(do, "item_lines", [node.line_of("do")])[0], f"{path}.do", path,
                             (path, -1))
        elif "do" in node:
            body = self.sequence(do, node.line_of("do"), f"{path}.do", (path, -1))
        else:
            self.problem(node.line, "for_each: missing 'do' (the steps to run for each item)")
            body = self._register(StepSpec("sequence", f"{path}.do", node.line, scope=(path, -1)))
        self.parents[body.path] = path
        attrs.update(params=value, var=var, concurrent=concurrent, wait_for=wait_for, merge=merge,
                     max_parallel=most, collect=collect)
        return body

    def condition(self, source: Any, line: int) -> None:
        if not isinstance(source, str):
            self.problem(line, f"expected a condition, got {source!r}")
            return
        problem = check_expression(source)
        if problem:
            self.problem(line, problem)
        else:
            self.reads |= fields_read(source, condition=True)

    def template(self, value: Any, line: int) -> None:
        """Check every template string inside ``value``, each at its own line."""
        if isinstance(value, dict):
            for key, item in value.items():
                self.template(item, value.line_of(key) if isinstance(value, Node) else line)
        elif isinstance(value, list):
            lines = getattr(value, "item_lines", [line] * len(value))
            for item, item_line in zip(value, lines):
                self.template(item, item_line)
        else:
            problem = check_template(value)
            if problem:
                self.problem(line, problem)
            else:
                self.reads |= fields_read(value)

    def _register(self, spec: StepSpec) -> StepSpec:
        self.steps[spec.path] = spec
        return spec


def _parse_until_ok(text: str) -> bool:
    from datetime import datetime
    if re.match(r"^([01]?\d|2[0-3]):[0-5]\d$", text):
        return True
    try:
        datetime.fromisoformat(text)
        return True
    except ValueError:
        return False


def digest_of(source: str, language: int) -> str:
    """What identifies a stored definition: its text, and from language 2 on its
    language (language 1's digests are those stored before languages were)."""
    text = source if language == 1 else f"language {language}\n{source}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_definition(data: Any, file: str, stem: str, participants: frozenset[str] | None,
                     source: str = "", language: int = LANGUAGE) -> tuple[ProcessSpec | None, list[Problem]]:
    """``language``: the definition language to read it in; today's for the
    definitions on disk, the stored one for a definition an instance runs on."""
    if language not in LANGUAGES:
        raise ValueError(f"unknown definition language {language}")
    p = _Parser(file, participants, language)
    if not isinstance(data, Node):
        p.problem(1, "a process definition must be a mapping with at least 'steps'")
        return None, p.problems
    for key in data:
        if key not in PROCESS_KEYS:
            p.problem(data.line_of(key), f"unknown key {key!r} (expected {', '.join(PROCESS_KEYS)})")
    name = data.get("name", stem)
    if not isinstance(name, str) or not _NAME.match(name):
        p.problem(data.line_of("name"), f"bad process name {name!r}")
        name = stem
    project = data.get("project")
    if project is not None and not isinstance(project, str):
        p.problem(data.line_of("project"), "project: expected a name like Project:Devel")
        project = None
    roles = data.get("launch_roles", ["admins"])
    if isinstance(roles, str):
        roles = [roles]
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        p.problem(data.line_of("launch_roles"), "launch_roles: expected a list of role names")
        roles = ["admins"]
    fields = data.get("fields", {})
    if not isinstance(fields, dict):
        p.problem(data.line_of("fields"), "fields: expected a mapping of default field values")
        fields = {}
    inputs = _inputs(p, data)
    fields = dict(fields)
    for key, kind in inputs.items():
        if key in fields:
            try:
                fields[key] = convert_field(key, kind, fields[key])
            except ValueError as exc:
                p.problem(data["fields"].line_of(key), f"fields {exc}")
    extra = data.get("extra_fields", "allow" if language == 1 else "refuse")
    if extra not in ("allow", "refuse"):
        p.problem(data.line_of("extra_fields"), f"extra_fields: expected allow or refuse, got {extra!r}")
        extra = "refuse"
    if "steps" not in data:
        p.problem(data.line, "missing 'steps'")
    root_node = Node({"sequence": data.get("steps", [])})
    root_node.line = data.line
    root_node.key_lines = {"sequence": data.line_of("steps")}
    for key in ("timeout", "on_timeout", "on_error", "on_cancel"):
        if key in data:
            root_node[key] = data[key]
            root_node.key_lines[key] = data.line_of(key)
    common = p.common(root_node, "sequence")
    seq = p.sequence(root_node["sequence"], root_node.line_of("sequence"), "", None)
    root = StepSpec("sequence", "", data.line, label=None, children=seq.children, **common)
    p.steps[""] = root
    spec = ProcessSpec(name=name, file=file, description=str(data.get("description", "")),
                       project=project, launch_roles=tuple(roles), fields=fields, root=root,
                       steps=dict(p.steps), parents=dict(p.parents), source=source,
                       digest=digest_of(source, language) if source else "", language=language,
                       subprocess_refs=tuple(p.subprocess_refs), inputs=inputs, extra_fields=extra == "allow",
                       reads=frozenset(p.reads - p.bound))
    return spec, p.problems


def _inputs(p: _Parser, data: Node) -> dict[str, InputType]:
    """``inputs: {version: str, count: int, dry_run: bool, level: [low, high]}``."""
    raw = data.get("inputs", {})
    if not isinstance(raw, dict):
        p.problem(data.line_of("inputs"), "inputs: expected a mapping of field: type "
                                          "(str, int, float, bool, or a list of choices)")
        return {}
    out: dict[str, InputType] = {}
    for key, kind in raw.items():
        line = raw.line_of(key) if isinstance(raw, Node) else data.line_of("inputs")
        if not _FIELD.match(key):
            p.problem(line, f"inputs: {key!r} is not a field name")
        elif key == "project":
            p.problem(line, "inputs: project is always a launch field, and always text: it needs no declaration")
        elif isinstance(kind, str) and kind in INPUT_TYPES:
            out[key] = kind
        elif isinstance(kind, list) and kind and all(isinstance(c, str) and c for c in kind):
            out[key] = tuple(kind)
        elif isinstance(kind, list) and kind:
            p.problem(line, f"inputs {key}: choices must be text; quote them ('yes', '1'), got {kind!r}")
        else:
            p.problem(line, f"inputs {key}: expected {', '.join(INPUT_TYPES)} or a list of choices, got {kind!r}")
    return out


def subprocess_cycles(specs: Iterable[ProcessSpec]) -> list[Problem]:
    """Every subprocess reference that closes a cycle (``a`` calls ``b`` calls
    ``a``): such a process would start subprocesses without end.  Each is
    reported at its own line with the shortest cycle through it."""
    by_name = {spec.name: spec for spec in specs}
    calls = {name: [(target, line) for target, line in spec.subprocesses() if target in by_name]
             for name, spec in by_name.items()}

    def path(start: str, goal: str) -> list[str] | None:
        """The shortest chain of calls from ``start`` to ``goal``."""
        came_from: dict[str, str | None] = {start: None}
        todo = [start]
        for name in todo:              # breadth first: todo grows while it is walked
            if name == goal:
                chain: list[str] = []
                at: str | None = name
                while at is not None:
                    chain.append(at)
                    at = came_from[at]
                return chain[::-1]
            for target, _line in calls[name]:
                if target not in came_from:
                    came_from[target] = name
                    todo.append(target)
        return None

    found: dict[Problem, None] = {}
    for name, refs in calls.items():
        for target, line in refs:
            back = path(target, name)
            if back is not None:
                cycle = " -> ".join([name, *back])
                found[Problem(by_name[name].file, line, f"subprocess cycle: {cycle}")] = None
    return list(found)


def collect_definitions(directory: Path, participants: frozenset[str] | None = None,
                        base: Path | None = None) -> tuple[dict[str, ProcessSpec], list[Problem], set[str]]:
    """Parse every ``*.yaml``/``*.yml`` in ``directory``: the valid specs, every
    problem, and the name of every process found (broken ones included, so that
    references to them are not reported as unknown as well)."""
    problems: list[Problem] = []
    parsed: list[tuple[ProcessSpec, bool]] = []
    where: dict[str, str] = {}
    files = sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml"))
    for path in files:
        display = str(path.relative_to(base)) if base and path.is_relative_to(base) else str(path)
        try:
            source = path.read_text(encoding="utf-8")
            data = loads_yaml(source, display)
        except OSError as exc:
            problems.append(Problem(display, 0, f"cannot read: {exc.strerror}"))
            continue
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        spec, found = parse_definition(data, display, path.stem, participants, source)
        problems.extend(found)
        if spec is None:
            continue
        if spec.name in where:
            problems.append(Problem(display, data.line_of("name"),
                                    f"process {spec.name!r} is already defined in {where[spec.name]}"))
            continue
        where[spec.name] = display
        parsed.append((spec, not found))
    names = set(where)
    for spec, _ok in parsed:
        for name, line in spec.subprocesses():
            if name not in names:
                problems.append(Problem(spec.file, line, f"subprocess {name!r} is not a known process"))
    problems.extend(subprocess_cycles([spec for spec, _ok in parsed]))
    return {s.name: s for s, ok in parsed if ok}, problems, names


def load_definitions(directory: Path, participants: frozenset[str] | None = None,
                     base: Path | None = None) -> dict[str, ProcessSpec]:
    """Load every definition in ``directory``; raise ConfigError with every problem."""
    specs, problems, _names = collect_definitions(directory, participants, base)
    if problems:
        raise ConfigError(problems)
    return specs
