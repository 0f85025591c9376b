"""Configuration: ``bot.yaml``, ``users.yaml`` and ``processes/*.yaml`` in one
directory, validated together at start.  Every problem is reported at once
as ``file:line: message``; unknown keys are errors; secrets come from the
environment (``*_env`` keys) and are never logged.

Relative paths (the database) are relative to the config directory's parent,
the bot's home, so ``conf/`` and ``var/`` sit side by side.
"""
from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bot.access import IrcIds, User
from engine.definitions import ProcessSpec, collect_definitions
from engine.schedules import ScheduleSpec
from engine.yamlconfig import ConfigError, Node, Problem, load_yaml
from engine.durations import parse_duration
from engine.timers import check_cron

BOT_KEYS = ("database", "durability", "timezone", "misfire", "log_level", "console", "commands",
            "schedules", "networks")
MISFIRES = ("run_once", "skip")
PROTOCOLS = ("irc", "xmpp")


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

    def summary(self) -> str:
        return (f"{self.conf_dir}: OK: {len(self.specs)} process(es), {len(self.schedules)} schedule(s), "
                f"{len(self.users)} user(s), {len(self.networks)} network(s)")


class _Checker:
    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []

    def problem(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.file, line, message))

    def mapping(self, node: Any, line: int, what: str, allowed: tuple[str, ...]) -> Node:
        if node is None:
            empty = Node()
            empty.line, empty.key_lines = line, {}
            return empty
        if not isinstance(node, Node):
            self.problem(line, f"{what}: expected a mapping")
            empty = Node()
            empty.line, empty.key_lines = line, {}
            return empty
        for key in node:
            if key not in allowed:
                self.problem(node.line_of(key), f"unknown key {key!r} in {what} (expected {', '.join(allowed)})")
        return node

    def typed(self, node: Node, key: str, kind: type | tuple[type, ...], default: Any,
              check: Callable[[Any], str | None] | None = None) -> Any:
        if key not in node:
            return default
        value = node[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.problem(node.line_of(key), f"{key}: expected {names}, got {value!r}")
            return default
        if check:
            message = check(value)
            if message:
                self.problem(node.line_of(key), f"{key}: {message}")
                return default
        return value


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


def _load_users(path: Path, display: str, irc_networks: set[str]) -> tuple[list[User], list[Problem]]:
    c = _Checker(display)
    try:
        data = load_yaml(path, display)
    except ConfigError as exc:
        return [], exc.problems
    top = c.mapping(data, 1, "users.yaml", ("users",))
    users_node = top.get("users")
    users: list[User] = []
    if not isinstance(users_node, Node):
        c.problem(top.line_of("users") if "users" in top else 1, "users: expected a mapping of user name -> entry")
        return users, c.problems
    owners: dict[tuple[str, str], str] = {}     # (where, identity) -> the user it already belongs to

    def claim(line: int, name: str, where: str, identity: str, what: str) -> None:
        owner = owners.setdefault((where, identity), name)
        if owner != name:
            c.problem(line, f"user {name!r}: {what} is already user {owner!r}'s (an identity belongs to one user)")

    known = ", ".join(sorted(irc_networks)) or "none configured"
    for name, entry in users_node.items():
        line = users_node.line_of(name)
        e = c.mapping(entry, line, f"user {name!r}", ("irc", "xmpp", "email", "roles"))
        irc: dict[str, IrcIds] = {}
        irc_node = e.get("irc")
        if irc_node is not None and not isinstance(irc_node, Node):
            c.problem(e.line_of("irc"), f"user {name!r} irc: expected IRC network name -> {{accounts, hostmasks}}")
        for net, ids_node in (irc_node.items() if isinstance(irc_node, Node) else ()):
            nline = irc_node.line_of(net)
            if net not in irc_networks:
                c.problem(nline, f"user {name!r} irc: {net!r} is not an IRC network in bot.yaml ({known}); "
                                 "accounts belong to one network: irc: {<network>: {accounts: [...]}}")
                continue
            ids = c.mapping(ids_node, nline, f"user {name!r} irc {net!r}", ("accounts", "hostmasks"))
            accounts = _names(ids.get("accounts", []))
            hostmasks = _names(ids.get("hostmasks", []))
            if accounts is None:
                c.problem(ids.line_of("accounts"), f"user {name!r} irc accounts: expected a list of services accounts")
            if hostmasks is None:
                c.problem(ids.line_of("hostmasks"), f"user {name!r} irc hostmasks: expected a list of nick!user@host patterns")
            for account in accounts or ():
                claim(ids.line_of("accounts"), name, f"irc:{net}", account.casefold(), f"IRC account {account!r} on {net}")
            for mask in hostmasks or ():
                if "!" not in mask or "@" not in mask or _too_broad(mask):
                    c.problem(ids.line_of("hostmasks"), f"user {name!r}: hostmask {mask!r} must be nick!user@host "
                                                        "whose host part names a host or network, like *.example.org "
                                                        "(it is the weaker, explicit fallback)")
            irc[str(net)] = IrcIds(tuple(accounts or ()), tuple(hostmasks or ()))
        jids = _names(e.get("xmpp", []))
        if jids is None or any("@" not in j or "/" in j for j in jids or ()):
            c.problem(e.line_of("xmpp"), f"user {name!r} xmpp: expected bare JIDs like alice@example.org")
            jids = []
        for jid in jids:
            claim(e.line_of("xmpp"), name, "xmpp", jid.lower(), f"XMPP address {jid!r}")
        emails = _names(e.get("email", []))
        if emails is None or any("@" not in m for m in emails or ()):
            c.problem(e.line_of("email"), f"user {name!r} email: expected addresses")
            emails = []
        for mail in emails:
            claim(e.line_of("email"), name, "email", mail.lower(), f"email address {mail!r}")
        roles: dict[str, frozenset[str]] = {}
        roles_node = e.get("roles", {})
        if not isinstance(roles_node, dict):
            c.problem(e.line_of("roles"), f"user {name!r} roles: expected project -> [roles] (use '*' for every project)")
        else:
            for project, names in roles_node.items():
                rl = _names(names)
                if rl is None:
                    c.problem(roles_node.line_of(project) if isinstance(roles_node, Node) else line,
                              f"user {name!r} roles on {project!r}: expected a list of role names")
                    continue
                roles[str(project)] = frozenset(rl)
        users.append(User(str(name), irc, tuple(jids or ()), tuple(emails or ()), roles))
    return users, c.problems


def load_config(conf_dir: Path, participants: frozenset[str] | None) -> BotConfig:
    """Load and validate everything; raise ConfigError listing every problem."""
    conf_dir = conf_dir.resolve()
    home = conf_dir.parent
    problems: list[Problem] = []
    bot_file = conf_dir / "bot.yaml"
    display = _display(bot_file, home)
    c = _Checker(display)
    data: Any = None
    if not bot_file.exists():
        problems.append(Problem(display, 0, "missing: the bot's main configuration file"))
    else:
        try:
            data = load_yaml(bot_file, display)
        except ConfigError as exc:
            problems += exc.problems
    top = c.mapping(data, 1, "bot.yaml", BOT_KEYS)
    database = c.typed(top, "database", str, "var/bot.sqlite3")
    durability = c.typed(top, "durability", str, "full",
                         lambda v: None if v in ("full", "normal") else "expected full or normal")
    tz = c.typed(top, "timezone", str, "UTC", _check_timezone)
    misfire = c.typed(top, "misfire", str, "run_once",
                      lambda v: None if v in MISFIRES else f"expected one of {', '.join(MISFIRES)}")
    log_level = c.typed(top, "log_level", str, "INFO",
                        lambda v: None if v.upper() in ("DEBUG", "INFO", "WARNING", "ERROR") else
                        "expected DEBUG, INFO, WARNING or ERROR")
    console = c.mapping(top.get("console"), top.line_of("console"), "console", ("user",))
    console_user = c.typed(console, "user", str, "admin")
    commands = c.mapping(top.get("commands"), top.line_of("commands"), "commands",
                         ("prefix", "max_room_lines", "rate_limit"))
    prefix = c.typed(commands, "prefix", str, "!", lambda v: None if v and " " not in v else "a non-blank word")
    max_room_lines = c.typed(commands, "max_room_lines", int, 4, lambda v: None if v >= 1 else "at least 1")
    rate = c.mapping(commands.get("rate_limit"), commands.line_of("rate_limit"), "commands rate_limit",
                     ("commands", "per"))
    rate_commands = c.typed(rate, "commands", int, 5, lambda v: None if v >= 1 else "at least 1")
    rate_window = 10.0
    if "per" in rate:
        try:
            rate_window = parse_duration(rate["per"])
        except ValueError as exc:
            c.problem(rate.line_of("per"), f"per: {exc}")
        else:
            if rate_window < 1:
                c.problem(rate.line_of("per"), "per: at least 1s (a shorter window turns the limit off)")
                rate_window = 10.0

    specs, found, process_names = collect_definitions(conf_dir / "processes", participants, base=home)
    problems += found
    if not (conf_dir / "processes").is_dir():
        problems.append(Problem(_display(conf_dir / "processes", home), 0, "missing: the process definitions directory"))

    schedules: list[ScheduleSpec] = []
    sched_node = top.get("schedules", [])
    if not isinstance(sched_node, list):
        c.problem(top.line_of("schedules"), "schedules: expected a list")
        sched_node = []
    seen: set[str] = set()
    for item in sched_node:
        if not isinstance(item, Node):
            c.problem(top.line_of("schedules"), "schedules: each entry must be a mapping")
            continue
        s = c.mapping(item, item.line, "schedule", ("name", "cron", "process", "fields", "misfire"))
        name = c.typed(s, "name", str, None)
        cron = c.typed(s, "cron", str, None, lambda v: check_cron(v, tz))
        process = c.typed(s, "process", str, None)
        fields = c.typed(s, "fields", dict, {})
        smisfire = c.typed(s, "misfire", str, misfire,
                           lambda v: None if v in MISFIRES else f"expected one of {', '.join(MISFIRES)}")
        for key in ("name", "cron", "process"):
            if key not in s:
                c.problem(s.line, f"schedule: missing {key!r}")
        if name in seen:
            c.problem(s.line_of("name"), f"schedule {name!r} defined twice")
        if process is not None and process not in process_names:
            c.problem(s.line_of("process"), f"schedule {name!r}: unknown process {process!r}")
        if name and cron and process and name not in seen:
            seen.add(name)
            schedules.append(ScheduleSpec(name, cron, process, dict(fields), smisfire, tz))

    networks: list[Any] = []
    net_node = top.get("networks", [])
    if not isinstance(net_node, list):
        c.problem(top.line_of("networks"), "networks: expected a list")
        net_node = []
    names: set[str] = set()
    irc_names: set[str] = set()
    for item in net_node:
        if not isinstance(item, Node) or item.get("protocol") not in PROTOCOLS:
            line = item.line_of("protocol") if isinstance(item, Node) else top.line_of("networks")
            c.problem(line, f"network: 'protocol' must be one of {', '.join(PROTOCOLS)}")
            continue
        if item["protocol"] == "irc" and isinstance(item.get("name"), str):
            irc_names.add(item["name"])     # even if the entry has problems: users.yaml may name it
        body = Node({k: v for k, v in item.items() if k != "protocol"})
        body.line, body.key_lines = item.line, {k: v for k, v in item.key_lines.items() if k != "protocol"}
        try:
            adapter = importlib.import_module(f"bot.transports.{item['protocol']}")
        except ImportError as exc:
            c.problem(item.line_of("protocol"), f"network: the {item['protocol']} front-end cannot be loaded ({exc})")
            continue
        cfg, found = adapter.parse_config(body, display)
        problems += found
        if cfg is not None and "command_prefix" not in body and prefix:
            cfg = dataclasses.replace(cfg, command_prefix=prefix)    # commands.prefix is every network's default
        if cfg is not None:
            if cfg.name in names:
                c.problem(item.line, f"network name {cfg.name!r} used twice")
            names.add(cfg.name)
            networks.append(cfg)

    users_file = conf_dir / "users.yaml"
    users: list[User] = []
    users_parsed = True
    if users_file.exists():
        users, found = _load_users(users_file, _display(users_file, home), irc_names)
        problems += found
        users_parsed = not any(p.message.startswith("YAML syntax") for p in found)
    if users_parsed and console_user not in {u.name for u in users}:
        line = console.line_of("user") if "user" in console else top.line
        c.problem(line, f"console user {console_user!r} is not defined in users.yaml")

    problems += c.problems
    if problems:
        raise ConfigError(problems)
    db = Path(database)
    return BotConfig(conf_dir=conf_dir, home=home, database=db if db.is_absolute() else home / db,
                     durability=durability, timezone=tz, log_level=log_level.upper(),
                     console_user=console_user, prefix=prefix, max_room_lines=max_room_lines,
                     rate_commands=rate_commands, rate_window=rate_window, schedules=schedules,
                     networks=networks, users=users, specs=specs)


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
