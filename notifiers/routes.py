"""Notification routes from ``bot.yaml`` (``notifications:``): which event
kinds of which projects go to which destinations, with a template per kind.
Pure configuration and matching (``notifiers.routing`` does the routing at
run time); checked with file:line by ``run_bot.py check``.

Projects form a tree by name: ``Foo:Bar:Baz`` inherits the routes of
``Foo:Bar``, then ``Foo``, then ``"*"`` (every project); a project with
``inherit: override`` starts afresh.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Mapping

from engine.configkit import Section, message_templates
from engine.events import Event
from engine.templating import MessageTemplate
from notifiers.destinations import Address, BadDestination, Book

ENGINE_KINDS = ("launched", "completed", "recovered", "failed", "cancelled", "terminated", "step failed",
                "timer fired")
# history events that are the engine's own bookkeeping, never routed
_INTERNAL = frozenset({"dispatched", "pending", "done", "set", "skipped", "then taken", "else taken", "wait over",
                       "retrying", "retried", "retry scheduled", "handler retried", "suspended", "repeat ended",
                       "cancel handler", "terminate", "timed out", "error handler"})
DIGESTS = ("hourly", "daily")
_PATTERN = re.compile(r"[a-z0-9 *?]{1,60}")
_PROJECT = re.compile(r"[A-Za-z0-9_.-]+(?::[A-Za-z0-9_.-]+)*|\*")


def kind_of(event: Event) -> str | None:
    """The kind people subscribe to, or None for the engine's bookkeeping."""
    name = event.event
    if not event.path:
        if name == "completed":
            return "recovered" if event.detail.startswith("recovered") else "completed"
        return name if name in ("launched", "cancelled", "terminated", "failed") else None
    if name == "failed":
        return "failed"
    if name == "error":
        return "step failed"
    if name.startswith("timer "):
        return "timer fired"
    if name in _INTERNAL or name == "cancelled":
        return None
    return name                     # a participant's own event


def chain(project: str | None) -> list[str]:
    """``Foo:Bar`` -> ``["*", "Foo", "Foo:Bar"]``: the project and its parents, root first."""
    if not project:
        return ["*"]
    parts = project.split(":")
    return ["*", *(":".join(parts[:i]) for i in range(1, len(parts) + 1))]


@dataclass(frozen=True)
class Route:
    patterns: tuple[str, ...]
    to: tuple[Address, ...]

    def wants(self, kind: str) -> bool:
        return any(matches(kind, p) for p in self.patterns)


@lru_cache(maxsize=4096)
def matches(kind: str, pattern: str) -> bool:
    """``kind`` matches the glob ``pattern`` (kinds and patterns are few: remembered)."""
    return fnmatch.fnmatchcase(kind, pattern)


@dataclass(frozen=True)
class ProjectRoutes:
    routes: tuple[Route, ...] = ()
    override: bool = False


@dataclass(frozen=True)
class NotificationConfig:
    projects: Mapping[str, ProjectRoutes] = field(default_factory=dict)
    templates: Mapping[str, MessageTemplate] = field(default_factory=dict)
    flood_per_minute: int = 20
    flood_window: float = 60.0          # the window those lines are counted in (a minute, unless told)

    def routes_for(self, project: str | None) -> list[Route]:
        """The routes of ``project``: its parents' (root first), extended or overridden."""
        routes: list[Route] = []
        for name in chain(project):
            own = self.projects.get(name)
            if own is None:
                continue
            routes = list(own.routes) if own.override else routes + list(own.routes)
        return routes


def parse_notifications(top: Section, book: Book) -> NotificationConfig:
    """``bot.yaml`` ``notifications:``, checked with file:line."""
    section = top.sub("notifications", ("projects", "templates", "flood_per_minute", "flood_window"))
    flood = section.get("flood_per_minute", int, 20, lambda v: None if 1 <= v <= 1000 else "1 to 1000")
    window = section.duration("flood_window", 60.0, minimum=1.0)
    templates = message_templates(
        section, "templates", "event kind",
        lambda kind: None if _PATTERN.fullmatch(kind) else
        "expected an event kind (lower-case words, as in `failed` or `publish done`)")
    projects: dict[str, ProjectRoutes] = {}
    pnode = section.raw("projects", {})
    if not isinstance(pnode, Mapping):
        section.problem("projects", "projects: expected a mapping of project -> {routes, inherit}")
        pnode = {}
    for name in pnode:
        item = Section(pnode[name], section.file, section.findings, label=f"notifications project {name!r}",
                       line=_line(pnode, name, section), what="project")
        item.check_keys(("routes", "inherit"))
        if not isinstance(name, str) or not _PROJECT.fullmatch(name):
            item.problem(None, "expected a project name (Foo:Bar) or \"*\"")
        inherit = item.get("inherit", str, "extend",
                           lambda v: None if v in ("extend", "override") else "expected extend or override")
        routes: list[Route] = []
        rnode = item.raw("routes", [])
        if not isinstance(rnode, list):
            item.problem("routes", "routes: expected a list of {events, to}")
            rnode = []
        for entry in rnode:
            route = Section(entry, item.file, item.findings, label=item.label, what="route")
            route.check_keys(("events", "to"))
            patterns = route.names("events", "an event kind or a list of them (failed, completed, \"publish *\")")
            for pattern in patterns:
                problem = pattern_problem(pattern, ())
                if problem:
                    route.problem("events", problem)
            to: list[Address] = []
            for dest in route.names("to", "a destination or a list of them"):
                try:
                    to += book.resolve(dest)
                except BadDestination as exc:
                    route.problem("to", str(exc))
            if not patterns or not to:
                route.problem(None, "a route needs events and to")
            routes.append(Route(tuple(patterns), tuple(to)))
        projects[str(name)] = ProjectRoutes(tuple(routes), inherit == "override")
    return NotificationConfig(projects, templates, flood, window)


def _line(node: Any, key: Any, section: Section) -> int:
    line_of = getattr(node, "line_of", None)
    return line_of(key) if line_of else section.line(None)


def pattern_problem(pattern: str, extra_kinds: Iterable[str]) -> str | None:
    """None if ``pattern`` (a glob over event kinds) can match something."""
    if not _PATTERN.fullmatch(pattern):
        return f"event pattern {pattern!r}: lower-case words and * only"
    if "*" in pattern or "?" in pattern:
        return None                 # may match a participant's own kind too
    if pattern in ENGINE_KINDS or pattern in set(extra_kinds):
        return None
    if re.fullmatch(r"[a-z][a-z0-9]*(?: [a-z0-9]+){1,4}", pattern):
        return None                 # a participant's own kind ("publish done")
    return f"unknown event kind {pattern!r} (known: {', '.join(ENGINE_KINDS)}, or a participant's own)"


@dataclass(frozen=True)
class Subscription:
    id: int
    user: str
    project: str
    pattern: str
    network: str
    digest: str = ""

    def describe(self) -> str:
        return (f"[{self.id}] {self.project} {self.pattern} via {self.network}"
                + (f", {self.digest} digest" if self.digest else ""))
