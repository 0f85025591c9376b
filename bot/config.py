"""Configuration: ``bot.yaml``, ``users.yaml`` and ``processes/*.yaml`` in one
directory, validated together at start.  Every problem is reported at once
as ``file:line: message``; unknown keys are errors; secrets come from the
environment (``*_env`` keys) and are never logged.  Each network's entry is
checked by its front-end (``bot.transports.FRONT_ENDS``); all parsers share
``engine.configkit``.

Relative paths (the database) are relative to the config directory's parent,
the bot's home, so ``conf/`` and ``var/`` sit side by side.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Mapping, Protocol

from bot.access import IrcIds, User
from engine.configkit import Findings, Section, empty_node
from bot.transports import FRONT_ENDS, front_end
from engine.definitions import ProcessSpec, collect_definitions, field_problems
from engine.schedules import ScheduleSpec
from engine.yamlconfig import ConfigError, Node, Problem, load_yaml
from engine.cron import check_cron
from notifiers.destinations import BadDestination, Book
from notifiers.routes import NotificationConfig, parse_notifications

BOT_KEYS = ("database", "durability", "timezone", "misfire", "log_level", "console", "commands",
            "schedules", "networks", "participants", "outbox", "notifications")
MISFIRES = ("run_once", "skip")


class ParticipantChecks(Protocol):
    """How a participant checks its configuration (``engine.participants.Participant``
    is one; config parsing does not import the engine's participant runtime)."""

    def check_config(self, section: Section) -> Any: ...

    def check_params(self, params: Mapping[str, Any], config: Any) -> list[str]: ...


@dataclass(frozen=True)
class BotConfig:
    conf_dir: Path
    home: Path
    database: Path
    durability: str = "full"
    timezone: str = "UTC"
    log_level: str = "INFO"
    console_user: str = "admin"
    prefix: str = "!"
    max_room_lines: int = 4
    rate_commands: int = 5
    rate_window: float = 10.0
    schedules: list[ScheduleSpec] = field(default_factory=list)
    networks: list[Any] = field(default_factory=list)   # each adapter's own config dataclass
    users: list[User] = field(default_factory=list)
    specs: dict[str, ProcessSpec] = field(default_factory=dict)
    participant_config: dict[str, Any] = field(default_factory=dict)   # name -> its check_config's result
    warnings: list[Problem] = field(default_factory=list)    # printed by check, logged at start
    outbox: Any = None                                   # the outbox: settings (bot.yaml outbox:)
    notifications: NotificationConfig = field(default_factory=NotificationConfig)

    @property
    def book(self) -> Book:
        """The destinations messages may go to: these networks and users."""
        return make_book(self.networks, self.users)

    def summary(self) -> str:
        return (f"{self.conf_dir}: OK: {len(self.specs)} process(es), {len(self.schedules)} schedule(s), "
                f"{len(self.users)} user(s), {len(self.networks)} network(s)")


def _names(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _too_broad(mask: str) -> bool:
    """A hostmask pattern whose host part pins no host or network: its literal
    prefix or suffix (around the wildcards) must name at least two labels, as
    in ``*.example.org`` or ``192.168.1.*``.  ``*!*@*.*``, ``*!*@*-*``,
    ``*!*@user/*`` and character classes (``[a-z]*``) match too many people."""
    host = mask.split("@", 1)[1] if "@" in mask else ""
    if not host or "[" in host:
        return True
    if "*" not in host and "?" not in host:
        return False
    parts = re.split(r"[*?]", host)

    def labels(text: str) -> int:
        return sum(1 for label in re.split(r"[.:/]", text) if any(ch.isalnum() for ch in label))
    return max(labels(parts[0]), labels(parts[-1])) < 2


def _load_users(path: Path, display: str, irc_networks: Mapping[str, bool],
                findings: Findings) -> tuple[list[User], bool]:
    """users.yaml; ``irc_networks`` maps each IRC network's name to whether it
    offers hostmask identities.  Returns the users and whether the file parsed."""
    try:
        data = load_yaml(path, display)
    except ConfigError as exc:
        findings.problems += exc.problems
        return [], False
    top = Section(data, display, findings, line=1, what="users.yaml")
    top.check_keys(("users",), what="users.yaml")
    users_node = top.raw("users")
    users: list[User] = []
    if not isinstance(users_node, Node):
        top.problem("users" if "users" in top else None, "users: expected a mapping of user name -> entry")
        return users, True
    owners: dict[tuple[str, str], str] = {}     # (where, identity) -> the user it already belongs to

    known = ", ".join(sorted(irc_networks)) or "none configured"
    for name, entry in users_node.items():
        who = f"user {name!r}"
        e = Section(entry, display, findings, line=users_node.line_of(name), what=who)
        e.check_keys(("irc", "xmpp", "email", "roles"), what=who)

        def claim(key: str, where: str, identity: str, what: str) -> None:
            owner = owners.setdefault((where, identity), str(name))
            if owner != name:
                e.problem(key, f"{who}: {what} is already user {owner!r}'s (an identity belongs to one user)")

        irc: dict[str, IrcIds] = {}
        irc_node = e.raw("irc")
        if irc_node is not None and not isinstance(irc_node, Node):
            e.problem("irc", f"{who} irc: expected IRC network name -> {{accounts, hostmasks}}")
        for net, ids_node in (irc_node.items() if isinstance(irc_node, Node) else ()):
            if net not in irc_networks:
                Section(irc_node, display, findings).problem(
                    net, f"{who} irc: {net!r} is not an IRC network in bot.yaml ({known}); "
                         "accounts belong to one network: irc: {<network>: {accounts: [...]}}")
                continue
            ids = Section(ids_node, display, findings, line=irc_node.line_of(net), what=f"{who} irc {net!r}")
            ids.check_keys(("accounts", "hostmasks"), what=f"{who} irc {net!r}")
            accounts = ids.names("accounts", f"a list of services accounts ({who})")
            hostmasks = ids.names("hostmasks", f"a list of nick!user@host patterns ({who})")
            for account in accounts:
                claim("irc", f"irc:{net}", account.casefold(), f"IRC account {account!r} on {net}")
            for mask in hostmasks:
                if "!" not in mask or "@" not in mask or _too_broad(mask):
                    ids.problem("hostmasks", f"{who}: hostmask {mask!r} must be nick!user@host whose host part "
                                             "names a host or network, like *.example.org (it is the weaker, "
                                             "explicit fallback)")
            if hostmasks and not irc_networks[net]:
                ids.warn("hostmasks", f"{who}: hostmasks on {net} are never used: that network has "
                                      "allow_hostmask: false")
            irc[str(net)] = IrcIds(tuple(accounts), tuple(hostmasks))
        jids = e.names("xmpp", f"bare JIDs like alice@example.org ({who})")
        if any("@" not in j or "/" in j for j in jids):
            e.problem("xmpp", f"{who} xmpp: expected bare JIDs like alice@example.org")
            jids = []
        for jid in jids:
            claim("xmpp", "xmpp", jid.lower(), f"XMPP address {jid!r}")
        emails = e.names("email", f"addresses ({who})")
        if any("@" not in m for m in emails):
            e.problem("email", f"{who} email: expected addresses")
            emails = []
        for mail in emails:
            claim("email", "email", mail.lower(), f"email address {mail!r}")
        roles: dict[str, frozenset[str]] = {}
        roles_node = e.raw("roles", {})
        if not isinstance(roles_node, dict):
            e.problem("roles", f"{who} roles: expected project -> [roles] (use '*' for every project)")
        else:
            for project, names in roles_node.items():
                rl = _names(names)
                if rl is None:
                    line = roles_node.line_of(project) if isinstance(roles_node, Node) else e.line(None)
                    findings.problems.append(Problem(display, line, f"{who} roles on {project!r}: expected a "
                                                                    "list of role names"))
                    continue
                roles[str(project)] = frozenset(rl)
        users.append(User(str(name), irc, tuple(jids), tuple(emails), roles))
    return users, True


def load_config(conf_dir: Path, participants: Mapping[str, ParticipantChecks] | Collection[str] | None, *,
                need_secrets: bool = True) -> BotConfig:
    """Load and validate everything; raise ConfigError listing every problem.

    ``participants``: name -> participant (``ParticipantRegistry.by_name()``):
    each checks its section of ``participants:`` and the params of the steps
    that use it; names alone check only that sections and steps name known
    participants (then ``participant_config`` stays empty); None checks no names.

    ``need_secrets=False`` is for ``check``: a secret's environment variable
    that is not set is then a warning (``BotConfig.warnings``), not a problem."""
    conf_dir = conf_dir.resolve()
    home = conf_dir.parent
    findings = Findings(need_secrets=need_secrets)
    bot_file = conf_dir / "bot.yaml"
    display = _display(bot_file, home)
    data: Any = None
    if not bot_file.exists():
        findings.problems.append(Problem(display, 0, "missing: the bot's main configuration file"))
    else:
        try:
            data = load_yaml(bot_file, display)
        except ConfigError as exc:
            findings.problems += exc.problems
    top = Section(data, display, findings, line=1, what="bot.yaml")
    top.check_keys(BOT_KEYS, what="bot.yaml")
    database = top.get("database", str, "var/bot.sqlite3")
    durability = top.get("durability", str, "full",
                         lambda v: None if v in ("full", "normal") else "expected full or normal")
    tz = top.get("timezone", str, "UTC", _check_timezone)
    misfire = top.get("misfire", str, "run_once",
                      lambda v: None if v in MISFIRES else f"expected one of {', '.join(MISFIRES)}")
    log_level = top.get("log_level", str, "INFO",
                        lambda v: None if v.upper() in ("DEBUG", "INFO", "WARNING", "ERROR") else
                        "expected DEBUG, INFO, WARNING or ERROR")
    console = top.sub("console", ("user",))
    console_user = console.get("user", str, "admin")
    commands = top.sub("commands", ("prefix", "max_room_lines", "rate_limit"))
    prefix = commands.get("prefix", str, "!", lambda v: None if v and " " not in v else "a non-blank word")
    max_room_lines = commands.get("max_room_lines", int, 4, lambda v: None if v >= 1 else "at least 1")
    rate = commands.sub("rate_limit", ("commands", "per"), "commands rate_limit")
    rate_commands = rate.get("commands", int, 5, lambda v: None if v >= 1 else "at least 1")
    rate_window = rate.duration("per", 10.0, minimum=1.0, why="a shorter window turns the limit off")

    known = frozenset(participants) if participants is not None else None
    checks: Mapping[str, ParticipantChecks] = participants if isinstance(participants, Mapping) else {}
    participant_config = _participant_sections(top, known, checks)
    specs, found, process_names = collect_definitions(conf_dir / "processes", known, base=home)
    findings.problems += found
    for spec in specs.values():
        for step in spec.steps.values():
            checker = checks.get(step.participant or "")
            if checker is not None and step.participant is not None:
                for message in checker.check_params(step.params or {}, participant_config.get(step.participant)):
                    findings.problems.append(Problem(spec.file, step.line, f"step {step.name}: {message}"))
    if not (conf_dir / "processes").is_dir():
        findings.problems.append(Problem(_display(conf_dir / "processes", home), 0,
                                         "missing: the process definitions directory"))

    schedules: list[ScheduleSpec] = []
    sched_node = top.raw("schedules", [])
    if not isinstance(sched_node, list):
        top.problem("schedules", "schedules: expected a list")
        sched_node = []
    seen: set[str] = set()
    for item in sched_node:
        if not isinstance(item, Node):
            top.problem("schedules", "schedules: each entry must be a mapping")
            continue
        s = Section(item, display, findings)
        s.check_keys(("name", "cron", "process", "fields", "misfire"), what="schedule")
        name = s.get("name", str, None)
        cron = s.get("cron", str, None, lambda v: check_cron(v, tz))
        process = s.get("process", str, None)
        fields = s.get("fields", dict, {})
        smisfire = s.get("misfire", str, misfire,
                         lambda v: None if v in MISFIRES else f"expected one of {', '.join(MISFIRES)}")
        for key in ("name", "cron", "process"):
            if key not in s:
                s.problem(None, f"schedule: missing {key!r}")
        if name in seen:
            s.problem("name", f"schedule {name!r} defined twice")
        if process is not None and process not in process_names:
            s.problem("process", f"schedule {name!r}: unknown process {process!r}")
        elif process in specs:
            # fields a launch would refuse (unknown, or not of the declared input type): refused here
            for message in field_problems(specs[process], fields, specs):
                s.problem("fields", f"schedule {name!r}: {message}")
        if name and cron and process and name not in seen:
            seen.add(name)
            schedules.append(ScheduleSpec(name, cron, process, dict(fields), smisfire, tz))

    networks: list[Any] = []
    net_node = top.raw("networks", [])
    if not isinstance(net_node, list):
        top.problem("networks", "networks: expected a list")
        net_node = []
    names: set[str] = set()
    irc_networks: dict[str, bool] = {}      # name -> allow_hostmask, for users.yaml
    protocols = ", ".join(FRONT_ENDS)
    for item in net_node:
        if not isinstance(item, Node) or item.get("protocol") not in FRONT_ENDS:
            line = item.line_of("protocol") if isinstance(item, Node) else top.line("networks")
            findings.problems.append(Problem(display, line, f"network: 'protocol' must be one of {protocols}"))
            continue
        protocol = item["protocol"]
        if protocol == "irc" and isinstance(item.get("name"), str):
            # even if the entry has problems: users.yaml may name it
            irc_networks[item["name"]] = item.get("allow_hostmask", True) is not False
        body = Node({k: v for k, v in item.items() if k != "protocol"})
        body.line, body.key_lines = item.line, {k: v for k, v in item.key_lines.items() if k != "protocol"}
        try:
            adapter = front_end(protocol)
        except ImportError as exc:
            findings.problems.append(Problem(display, item.line_of("protocol"),
                                             f"network: the {protocol} front-end cannot be loaded ({exc})"))
            continue
        label = f"{protocol} network {body['name']!r}" if isinstance(body.get("name"), str) else f"{protocol} network"
        cfg = adapter.parse_config(Section(body, display, findings, label=label))
        if cfg is not None and "command_prefix" not in body and prefix:
            cfg = dataclasses.replace(cfg, command_prefix=prefix)    # commands.prefix is every network's default
        if cfg is not None:
            if cfg.name in names:
                findings.problems.append(Problem(display, item.line, f"network name {cfg.name!r} used twice"))
            names.add(cfg.name)
            networks.append(cfg)

    users_file = conf_dir / "users.yaml"
    users: list[User] = []
    users_parsed = True
    if users_file.exists():
        users, users_parsed = _load_users(users_file, _display(users_file, home), irc_networks, findings)
    if users_parsed and console_user not in {u.name for u in users}:
        (console if "user" in console else top).problem("user" if "user" in console else None,
                                                        f"console user {console_user!r} is not defined in users.yaml")

    outbox = _outbox_settings(top)
    notifications = NotificationConfig()
    if users_parsed:
        book = make_book(networks, users)
        notifications = parse_notifications(top, book)
        for spec in specs.values():
            for step in spec.steps.values():
                checker = checks.get(step.participant or "")
                for param in getattr(checker, "destination_params", ()):
                    for message in destination_problems(book, (step.params or {}).get(param)):
                        findings.problems.append(Problem(spec.file, step.line, f"step {step.name}: {param}: {message}"))

    if findings.problems:
        raise ConfigError(findings.problems)
    db = Path(database)
    return BotConfig(conf_dir=conf_dir, home=home, database=db if db.is_absolute() else home / db,
                     durability=durability, timezone=tz, log_level=log_level.upper(),
                     console_user=console_user, prefix=prefix, max_room_lines=max_room_lines,
                     rate_commands=rate_commands, rate_window=rate_window, schedules=schedules,
                     networks=networks, users=users, specs=specs, participant_config=participant_config,
                     warnings=sorted(findings.warnings), outbox=outbox, notifications=notifications)


@dataclass(frozen=True)
class OutboxSettings:
    retry_min: float = 2.0
    retry_max: float = 300.0
    give_up: float = 7 * 86400.0
    keep: float = 30 * 86400.0


def _outbox_settings(top: Section) -> OutboxSettings:
    """``outbox: {retry_min, retry_max, give_up, keep}``: how long undelivered messages wait,
    and how long settled ones are kept (for ``outbox``)."""
    section = top.sub("outbox", ("retry_min", "retry_max", "give_up", "keep"))
    retry_min = section.duration("retry_min", 2.0, minimum=0.1)
    retry_max = section.duration("retry_max", 300.0, minimum=retry_min)
    give_up = section.duration("give_up", 7 * 86400.0, minimum=60.0, why="a message must get a chance")
    keep = section.duration("keep", 30 * 86400.0, minimum=3600.0)
    return OutboxSettings(retry_min, retry_max, give_up, keep)


def make_book(networks: list[Any], users: list[User]) -> Book:
    protocols = {cfg.name: cfg.protocol for cfg in networks}
    rooms = {cfg.name: frozenset(getattr(cfg, "rooms", ())) for cfg in networks if cfg.protocol == "xmpp"}
    on: dict[str, frozenset[str]] = {}
    for user in users:
        nets = {net for net, ids in user.irc.items() if net in protocols and (ids.accounts or ids.hostmasks)}
        if user.xmpp_jids:
            nets |= {n for n, p in protocols.items() if p == "xmpp"}
        if user.emails:
            nets |= {n for n, p in protocols.items() if p == "email"}
        on[user.name] = frozenset(nets)
    return Book(protocols, rooms, on)


def destination_problems(book: Book, value: Any) -> list[str]:
    """What is wrong with a destination param as written (templated entries are checked when they run)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else None
    if items is None:
        return [f"expected a destination or a list of them, got {value!r}"]
    problems = []
    for item in items:
        if isinstance(item, str) and ("{{" in item or "{%" in item):
            continue
        try:
            book.resolve(item)
        except BadDestination as exc:
            problems.append(str(exc))
    return problems


def _participant_sections(top: Section, names: frozenset[str] | None,
                          checks: Mapping[str, ParticipantChecks]) -> dict[str, Any]:
    """``participants: {<name>: {...}}``: each known participant checks its own
    section (an empty one when absent: its defaults); an unknown name is a problem."""
    node = top.raw("participants")
    if node is not None and not isinstance(node, Node):
        top.problem("participants", "participants: expected a mapping of participant name -> its settings")
        node = None
    sections = node if isinstance(node, Node) else empty_node(top.line(None))
    for name in sections:
        if names is not None and name not in names:
            known = ", ".join(sorted(names)) or "none"
            Section(sections, top.file, top.findings).problem(
                name, f"participants: unknown participant {name!r} (known: {known})")
    config: dict[str, Any] = {}
    for name, checker in sorted(checks.items()):
        line = sections.line_of(name) if name in sections else top.line("participants")
        section = Section(sections.get(name), top.file, top.findings, label=f"participants {name}", line=line,
                          what=f"participants {name}")
        config[name] = checker.check_config(section)
    return config


def _check_timezone(name: str) -> str | None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return f"unknown time zone {name!r}"
    return None


def _display(path: Path, home: Path) -> str:
    try:
        return str(path.relative_to(home))
    except ValueError:
        return str(path)
