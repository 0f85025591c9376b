"""``participants: {bugzilla: {trackers: {...}}}`` in bot.yaml, checked.

    participants:
      bugzilla:
        trackers:
          bmc:
            url: https://bugs.example.com/rest/     # the explicit REST URL
            api_key_env: RELEASEBOT_BMC_API_KEY      # the variable holding the API key
            reference: 'BMC#(?P<key>\\d+)'           # a regex with a named group 'key'
            triggers: [Fixes, Resolves, Closes]
            status: RESOLVED                         # what a fixed bug moves to ...
            resolution: FIXED                        # ... required for a closed status, refused for an open one
            products: [Product]                      # only bugs of these products (default: any)
            projects: ["Project:Devel"]              # the projects using it ("*": all)
            comment: "Fixed in {{ package }} {{ version }}"   # Jinja2, sandboxed
            mentioned: comment                       # or nothing
            mentioned_comment: "..."
            workflow: {CONFIRMED: [IN_PROGRESS, RESOLVED], ...}   # default: Bugzilla's own
            open_statuses: [UNCONFIRMED, CONFIRMED, IN_PROGRESS]
            timeout: 60s                             # one HTTP request

Everything a real run would trip over is found by ``check``: a regex that
does not compile or has no ``key`` group, a status the workflow does not
know, a resolution missing or where Bugzilla refuses one (121 / 122), a
template that does not compile or reads a variable it will not get.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from engine.configkit import Section
from engine.templating import check_template, fields_read
from engine.yamlconfig import Node
from participants.bugzilla.changelog import Syntax, syntax

TRACKER_KEYS = ("url", "api_key_env", "reference", "triggers", "status", "resolution", "products", "projects",
                "comment", "mentioned", "mentioned_comment", "workflow", "open_statuses", "timeout", "ca_file")
DEFAULT_WORKFLOW: dict[str, tuple[str, ...]] = {
    "UNCONFIRMED": ("CONFIRMED", "IN_PROGRESS", "RESOLVED"),
    "CONFIRMED": ("IN_PROGRESS", "RESOLVED"),
    "IN_PROGRESS": ("CONFIRMED", "RESOLVED"),
    "RESOLVED": ("UNCONFIRMED", "CONFIRMED", "VERIFIED"),
    "VERIFIED": ("UNCONFIRMED", "CONFIRMED"),
}
DEFAULT_OPEN = ("UNCONFIRMED", "CONFIRMED", "IN_PROGRESS")
DEFAULT_TRIGGERS = ("Fixes", "Resolves", "Closes")
# what a comment template may read
TEMPLATE_VARIABLES = frozenset({"bug", "ref", "tracker", "fixed", "status", "resolution", "packages", "package",
                                "version", "lines", "instance", "process", "project", "step", "approved_by"})
DEFAULT_COMMENT = (
    "{% for p in packages %}{{ 'Fixed' if fixed else 'Mentioned' }} in {{ p.name }} {{ p.version }}:\n"
    "{% for line in p.lines %}  - {{ line }}\n{% endfor %}{% endfor %}"
    "({{ process }} #{{ instance }}{% if project %} for {{ project }}{% endif %}"
    "{% if approved_by %}, approved by {{ approved_by }}{% endif %})")
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_STATUS = re.compile(r"^[A-Z][A-Z0-9_]*$")


@dataclass(frozen=True)
class Tracker:
    name: str
    url: str
    api_key_env: str
    api_key: str | None = field(repr=False)       # the secret: never in a repr, a log or a message
    syntax: Syntax
    status: str
    resolution: str
    products: tuple[str, ...]
    projects: tuple[str, ...]
    comment: str
    mentioned: str                                # comment | nothing
    mentioned_comment: str
    workflow: Mapping[str, tuple[str, ...]]
    open_statuses: frozenset[str]
    timeout: float
    ca_file: str | None

    def uses(self, project: str | None) -> bool:
        """Whether ``project`` (or a parent of it: ``Foo`` covers ``Foo:Bar``) uses this tracker."""
        if "*" in self.projects:
            return True
        if not project:
            return False
        return any(project == p or project.startswith(p + ":") for p in self.projects)

    def may_move(self, current: str, target: str) -> bool:
        return current == target or target in self.workflow.get(current, ())

    def is_open(self, status: str) -> bool:
        return status in self.open_statuses


@dataclass(frozen=True)
class BugzillaConfig:
    trackers: Mapping[str, Tracker] = field(default_factory=dict)


def check_config(section: Section) -> BugzillaConfig:
    section.check_keys(("trackers",))
    node = section.raw("trackers")
    if node is None:
        return BugzillaConfig()
    if not isinstance(node, Node):
        section.problem("trackers", "trackers: expected a mapping of tracker name -> its settings")
        return BugzillaConfig()
    trackers: dict[str, Tracker] = {}
    for name in node:
        sub = Section(node.get(name), section.file, section.findings, label=f"participants bugzilla: tracker {name}",
                      line=node.line_of(name), what=f"tracker {name}")
        if not _NAME.match(name):
            sub.problem(None, "a tracker's name is lower-case letters, digits, '-' and '_' (as typed in chat)")
            continue
        tracker = _tracker(name, sub)
        if tracker is not None:
            trackers[name] = tracker
    return BugzillaConfig(trackers)


def _tracker(name: str, s: Section) -> Tracker | None:
    s.check_keys(TRACKER_KEYS, secrets={"api_key": "api_key_env", "password": "api_key_env"})
    s.require("url", "api_key_env", "reference", "status", "projects")
    url = s.get("url", str, "", _url_problem)
    api_key = s.secret("api_key_env")
    pattern = s.get("reference", str, "", _reference_problem)
    triggers = tuple(s.names("triggers", "a list of trigger words")) if "triggers" in s else DEFAULT_TRIGGERS
    for word in triggers:
        if not re.fullmatch(r"\w[\w-]*", word):
            s.problem("triggers", f"triggers: {word!r} is not a word")
    workflow = _workflow(s)
    known = set(workflow) | {t for targets in workflow.values() for t in targets}
    open_statuses = frozenset(s.names("open_statuses", "a list of statuses")) if "open_statuses" in s \
        else frozenset(DEFAULT_OPEN) & known
    for status in sorted(open_statuses - known):
        s.problem("open_statuses", f"open_statuses: {status!r} is not a status of the workflow")
    status = s.get("status", str, "", lambda v: None if _STATUS.match(v) else "an upper-case status name")
    if status and status not in known:
        s.problem("status", f"status: {status!r} is not a status of the workflow ({', '.join(sorted(known))})")
    resolution = s.get("resolution", str, "",
                       lambda v: None if not v or _STATUS.match(v) else "an upper-case resolution")
    if status and status in known:
        if status in open_statuses and resolution:
            s.problem("resolution", f"resolution: {status} is an open status, and Bugzilla refuses a resolution "
                                    f"for open bugs (122)")
        elif status not in open_statuses and not resolution:
            s.problem("status", f"status: {status} is a closed status and needs a resolution (Bugzilla 121)")
    products = tuple(s.names("products", "a list of product names"))
    projects = tuple(s.names("projects", "a list of projects (or \"*\" for all)"))
    if "projects" in s and not projects:
        s.problem("projects", "projects: name at least one project (or \"*\")")
    comment = _template(s, "comment", DEFAULT_COMMENT)
    mentioned = s.get("mentioned", str, "comment",
                      lambda v: None if v in ("comment", "nothing") else "comment or nothing")
    mentioned_comment = _template(s, "mentioned_comment", DEFAULT_COMMENT)
    timeout = s.duration("timeout", 60.0)
    ca_file = s.get("ca_file", str, None, lambda v: None if v.startswith("/") else "an absolute path")
    if not (url and pattern and status):
        return None
    return Tracker(name, url, str(s.raw("api_key_env", "")), api_key, syntax(name, pattern, triggers), status,
                   resolution, products, projects, comment, mentioned, mentioned_comment, workflow, open_statuses,
                   timeout, ca_file)


def _url_problem(url: str) -> str | None:
    if not re.match(r"^https?://[^/\s]+/(\S*/)?rest/?$", url):
        return f"{url!r} is not an explicit REST URL (http(s)://host/.../rest/)"
    return None


def _reference_problem(pattern: str) -> str | None:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        return f"{pattern!r} does not compile: {exc}"
    if "key" not in compiled.groupindex:
        return f"{pattern!r} has no named group 'key' (as in BMC#(?P<key>\\d+))"
    if compiled.match(""):
        return f"{pattern!r} matches empty text"
    return None


def _workflow(s: Section) -> dict[str, tuple[str, ...]]:
    if "workflow" not in s:
        return dict(DEFAULT_WORKFLOW)
    node = s.raw("workflow")
    if not isinstance(node, dict) or not node:
        s.problem("workflow", "workflow: expected a mapping of status -> the statuses it may move to")
        return dict(DEFAULT_WORKFLOW)
    workflow: dict[str, tuple[str, ...]] = {}
    for status, targets in node.items():
        if isinstance(targets, str):
            targets = [targets]
        if (not _STATUS.match(status) or not isinstance(targets, list)
                or not all(isinstance(t, str) and _STATUS.match(t) for t in targets)):
            s.problem("workflow", f"workflow: {status}: expected upper-case statuses, got {targets!r}")
            continue
        workflow[status] = tuple(targets)
    return workflow


def _template(s: Section, key: str, default: str) -> str:
    source = str(s.get(key, str, default))
    problem = check_template(source)
    if problem:
        s.problem(key, f"{key}: {problem}")
        return default
    unknown = sorted(fields_read(source) - TEMPLATE_VARIABLES)
    if unknown:
        s.problem(key, f"{key}: unknown variable(s) {', '.join(unknown)} "
                       f"(known: {', '.join(sorted(TEMPLATE_VARIABLES))})")
        return default
    return source
