"""The repositories, as configured in ``participants: {repo_publish: {...}}``.

Every repository participant (``repo_lock``, ``repo_sync``, ``repo_verify``,
``repo_sign``, ``repo_publish``, ``repo_rollback``) works from this one
section; ``check`` reports its problems as ``file:line``.

Names and paths are checked strictly here, because they end up in rsync's
and gpg's argument lists and in remote paths: a repository name is a plain
word (``devel``, ``f40-updates``), never ``../x``, ``-e sh``, ``a;b`` or
anything with a newline; paths are absolute and normalised, with no control
characters; the few values that go into ssh's option string (the key file,
the known-hosts file) hold no spaces or quotes at all.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from engine.configkit import Section
from engine.cron import check_cron
from engine.yamlconfig import Node, Problem

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
USER = re.compile(r"^[A-Za-z_][A-Za-z0-9._-]{0,31}$")
PLAIN_PATH = re.compile(r"^/[A-Za-z0-9._/+@-]*$")     # may go into ssh's option string: no spaces, no quotes
KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9@._+-]{0,127}$")
PROJECT = re.compile(r"^[^\s\x00-\x1f\x7f]{1,200}$")
REPO_KEYS = ("project", "source", "destination", "ssh_key", "known_hosts", "password_env", "retention",
             "grace", "metadata", "verify", "freeze", "approval", "sign", "bwlimit")
TOP_KEYS = ("repositories", "timeout", "kill_grace", "freeze_recheck", "override_role")
FREEZE_KEYS = ("name", "start", "duration", "timezone")
OVERRIDE_ROLE = "publishers-override"


def name_problem(value: Any, what: str = "repository name") -> str | None:
    """Why ``value`` may not be a repository (or snapshot) name, or None."""
    if not isinstance(value, str):
        return f"{what}: expected a name, got {value!r}"
    if not NAME.match(value) or ".." in value:
        return (f"{what} {value!r}: use letters, digits, '.', '_' and '-' (starting with a letter or digit, "
                "at most 64, no '..')")
    return None


def path_problem(value: Any, what: str = "") -> str | None:
    """Why ``value`` is not an absolute, normalised path without control characters, or None."""
    lead = f"{what}: " if what else ""
    if not isinstance(value, str) or not value:
        return f"{lead}expected an absolute path, got {value!r}"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return f"{lead}{value!r} holds a control character"
    if not value.startswith("/"):
        return f"{lead}expected an absolute path, got {value!r}"
    if ".." in value.split("/") or "." in value.split("/")[1:-1] or "//" in value:
        return f"{lead}{value!r} is not a normalised path (no '.', '..' or '//')"
    return None


@dataclass(frozen=True)
class Freeze:
    """While a freeze is on, a publish waits (unless forced by the override role)."""

    name: str
    cron: str               # when each freeze starts
    duration: float         # seconds
    timezone: str = "UTC"


@dataclass(frozen=True)
class Destination:
    """Where a repository is published: ``kind`` is local, rsync (a daemon module) or ssh.
    ``base`` is the directory holding ``snapshots/`` and the ``current`` link, as rsync names it."""

    kind: str
    path: str                       # local: the directory; rsync: path in the module; ssh: remote path
    host: str = ""
    port: int = 0
    module: str = ""
    user: str = ""
    ssh_key: str = ""
    known_hosts: str = ""
    password_env: str = ""

    @property
    def base(self) -> str:
        if self.kind == "local":
            return self.path
        if self.kind == "rsync":
            port = f":{self.port}" if self.port else ""
            return f"rsync://{self.host}{port}/{self.module}{self.path}"
        return f"{self.user}@{self.host}:{self.path}"

    def shown(self) -> str:
        if self.kind == "ssh":
            return f"ssh://{self.user}@{self.host}{f':{self.port}' if self.port else ''}{self.path}"
        return self.base


@dataclass(frozen=True)
class Signing:
    key: str                        # a fingerprint, key id or address gpg's --local-user takes
    gnupg_home: str = ""            # GNUPGHOME; default: gpg's own


@dataclass(frozen=True)
class Repository:
    name: str
    project: str
    source: str
    destination: Destination
    retention: int = 5
    grace: float = 3600.0
    metadata: tuple[str, ...] = ("repodata",)
    verify: tuple[str, ...] = ("repodata/repomd.xml",)
    freezes: tuple[Freeze, ...] = ()
    approval: bool = False
    approvers: tuple[str, ...] = ()
    signing: Signing | None = None
    line: int = 0
    bwlimit: int = 0                # KiB/s for rsync (0: no limit)


@dataclass(frozen=True)
class RepoConfig:
    repositories: dict[str, Repository] = field(default_factory=dict)
    timeout: float = 7200.0         # one rsync or gpg run
    kill_grace: float = 5.0
    freeze_recheck: float = 60.0    # how often a publish waiting for a freeze's end looks at the clock
    override_role: str = OVERRIDE_ROLE

    def repository(self, name: Any) -> Repository:
        """The repository called ``name``; ValueError (one line) for anything else."""
        problem = name_problem(name)
        if problem is None and name in self.repositories:
            return self.repositories[name]
        known = ", ".join(sorted(self.repositories)) or "none configured"
        shown = repr(name) if len(repr(name)) <= 70 else repr(name)[:67] + "..."
        raise ValueError(f"unknown repository {shown} (known: {known})")


def check_section(section: Section) -> RepoConfig:
    section.check_keys(TOP_KEYS)
    timeout = section.duration("timeout", RepoConfig.timeout)
    grace = section.duration("kill_grace", RepoConfig.kill_grace)
    recheck = section.duration("freeze_recheck", RepoConfig.freeze_recheck, minimum=0.01)
    role = section.get("override_role", str, OVERRIDE_ROLE,
                       lambda v: None if NAME.match(v) else "expected a role name")
    repos: dict[str, Repository] = {}
    node = section.raw("repositories", {})
    if not isinstance(node, dict):
        section.problem("repositories", "repositories: expected a mapping of repository name -> settings")
        node = {}
    for name in node:
        problem = name_problem(name)
        if problem:
            line = node.line_of(str(name)) if isinstance(node, Node) else section.line("repositories")
            section.findings.problems.append(Problem(section.file, line, f"{section.label}: repositories: {problem}"))
            continue
        line = node.line_of(name) if isinstance(node, Node) else section.line("repositories")
        repo = _repository(Section(node[name], section.file, section.findings,
                                   label=f"{section.label} repository {name}", line=line,
                                   what=f"repository {name}"), name)
        if repo is not None:
            repos[name] = repo
    return RepoConfig(repos, timeout, grace, recheck, role)


def _repository(s: Section, name: str) -> Repository | None:
    s.check_keys(REPO_KEYS)
    s.require("project", "source", "destination")
    before = len(s.findings.problems)
    project = s.get("project", str, "", lambda v: None if PROJECT.match(v) else "expected a project name")
    source = s.get("source", str, "", path_problem)
    dest = _destination(s)
    retention = s.get("retention", int, 5, lambda v: None if 1 <= v <= 1000 else "from 1 to 1000 snapshots")
    grace = s.duration("grace", 3600.0)
    bwlimit = s.get("bwlimit", int, 0, lambda v: None if v >= 0 else "KiB per second, 0 for no limit")
    metadata = _relative_names(s, "metadata", ("repodata",))
    verify = _relative_names(s, "verify", ("repodata/repomd.xml",))
    freezes = _freezes(s)
    approval = False
    approvers: tuple[str, ...] = ()
    if "approval" in s:
        value = s.raw("approval")
        if isinstance(value, bool):
            approval = value
        else:
            sub = s.sub("approval", ("roles",))
            approvers = tuple(sub.names("roles", "a list of role names"))
            approval = True
    signing = None
    if "sign" in s:
        sub = s.sub("sign", ("key", "gnupg_home"))
        sub.require("key")
        key = sub.get("key", str, "", lambda v: None if KEY_ID.match(v) else
                      "expected a key fingerprint, key id or address")
        home = sub.get("gnupg_home", str, "", path_problem)
        signing = Signing(key, home)
    if len(s.findings.problems) > before or dest is None or not source or not project:
        return None
    return Repository(name, project, source.rstrip("/") or "/", dest, retention, grace, metadata, verify, freezes,
                      approval, approvers, signing, s.line(None), bwlimit)


def _destination(s: Section) -> Destination | None:
    raw = s.get("destination", str, None)
    ssh_keys = ("ssh_key", "known_hosts")
    if raw is None:
        return None
    if any(ord(c) < 32 or ord(c) == 127 or c.isspace() for c in raw):
        s.problem("destination", f"destination: {raw!r} holds a space or a control character")
        return None
    if raw.startswith("/"):
        problem = path_problem(raw, "destination")
        if problem:
            s.problem("destination", problem)
            return None
        for key in (*ssh_keys, "password_env"):
            if key in s:
                s.problem(key, f"{key}: only for an ssh:// or rsync:// destination")
        return Destination("local", raw.rstrip("/") or "/")
    url = urlsplit(raw)
    if url.scheme not in ("rsync", "ssh") or not url.hostname:
        s.problem("destination", f"destination: expected an absolute path, rsync://host[:port]/module[/path] "
                                 f"or ssh://user@host[:port]/path, got {raw!r}")
        return None
    try:
        port = url.port or 0
    except ValueError:
        s.problem("destination", f"destination: bad port in {raw!r}")
        return None
    host = url.hostname
    if not HOST.match(host):
        s.problem("destination", f"destination: bad host name {host!r}")
        return None
    if url.query or url.fragment or url.password:
        s.problem("destination", f"destination: {raw!r}: no query, fragment or password in the URL"
                                 + (" (use password_env)" if url.password else ""))
        return None
    if url.scheme == "rsync":
        module, _, rest = url.path.lstrip("/").partition("/")
        path = "/" + rest.rstrip("/") if rest.strip("/") else ""
        if name_problem(module, "module"):
            s.problem("destination", f"destination: {name_problem(module, 'rsync module')}")
            return None
        if path and (path_problem(path, "destination path") or not PLAIN_PATH.match(path)):
            s.problem("destination", f"destination: bad path {path!r} in the module")
            return None
        for key in ssh_keys:
            if key in s:
                s.problem(key, f"{key}: only for an ssh:// destination")
        env = ""
        if "password_env" in s:
            env = s.get("password_env", str, "", lambda v: None if re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", v)
                        else "the name of an environment variable")
            s.secret("password_env")
        return Destination("rsync", path, host, port, module, user=url.username or "", password_env=env)
    user = url.username or ""
    if not USER.match(user):
        s.problem("destination", f"destination: an ssh destination names its user: ssh://user@host/path, "
                                 f"got {raw!r}")
        return None
    path = url.path.rstrip("/")
    problem = path_problem(path, "destination path") if path else "destination: ssh:// needs an absolute path"
    if problem or not PLAIN_PATH.match(path):
        s.problem("destination", problem or f"destination: {path!r}: letters, digits and ._/+@- only")
        return None
    s.require(*ssh_keys)
    files = []
    for key in ssh_keys:
        value = s.get(key, str, "", lambda v: path_problem(v) or (
            None if PLAIN_PATH.match(v) else f"{v!r}: letters, digits and ._/+@- only"))
        if value and not os.path.isfile(value):
            s.warn(key, f"{key}: {value} does not exist (yet)")
        files.append(value)
    if "password_env" in s:
        s.problem("password_env", "password_env: only for an rsync:// destination (ssh uses ssh_key)")
    if not all(files):
        return None
    return Destination("ssh", path, host, port, user=user, ssh_key=files[0], known_hosts=files[1])


def _relative_names(s: Section, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    if key not in s:
        return default
    values = s.names(key, "a list of paths inside the repository")
    for value in values:
        parts = value.split("/")
        if not value or value.startswith("/") or any(p in ("", ".", "..") for p in parts) or any(
                not re.match(r"^[A-Za-z0-9_][A-Za-z0-9._+-]*$", p) for p in parts):
            s.problem(key, f"{key}: {value!r} is not a plain relative path inside the repository")
    return tuple(values)


def _freezes(s: Section) -> tuple[Freeze, ...]:
    node = s.raw("freeze")
    if node is None:
        return ()
    if not isinstance(node, list):
        s.problem("freeze", "freeze: expected a list of {start: cron, duration, timezone}")
        return ()
    found = []
    for index, item in enumerate(node):
        line = getattr(node, "item_lines", [s.line("freeze")] * (index + 1))[index]
        f = Section(item, s.file, s.findings, label=f"{s.label} freeze {index + 1}", line=line,
                    what=f"freeze {index + 1}")
        f.check_keys(FREEZE_KEYS)
        f.require("start", "duration")
        tz = f.get("timezone", str, "UTC", _tz_problem)
        cron = f.get("start", str, "", lambda v: check_cron(v, tz if _tz_problem(tz) is None else "UTC"))
        duration = f.duration("duration", 0.0)
        name = f.get("name", str, f"freeze {index + 1}", lambda v: None if PROJECT.match(v) else "a short name")
        if cron and duration:
            found.append(Freeze(name, cron, duration, tz))
    return tuple(found)


def _tz_problem(name: str) -> str | None:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return f"unknown time zone {name!r}"
    return None
