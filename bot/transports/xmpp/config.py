"""An XMPP network's entry in bot.yaml: ``XmppConfig`` and its checker."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar

from engine.configkit import Section
from bot.network import is_loopback
from bot.outqueue import DEFAULT_MAX_PER_TARGET

TLS_POLICIES = ("starttls", "direct", "plaintext")
KEYS = ("name", "jid", "password_env", "host", "port", "tls", "ca_file", "rooms", "nick",
        "command_prefix", "rate", "burst", "reconnect_min", "reconnect_max", "keepalive",
        "max_line_chars", "max_queued_lines")
MIN_MAX_QUEUED = 10                    # lines per target
MIN_KEEPALIVE = 1.0                    # seconds; below this pings would flood, and 0 would never ping


@dataclass(frozen=True)
class XmppConfig:
    protocol: ClassVar[str] = "xmpp"
    name: str                          # the network name in logs and identities
    jid: str                           # the bot's bare JID, bot@example.org
    # From the environment; never logged, never in repr.  None only for ``check``
    # without the variable set: the transport refuses to start without one.
    password: str | None = field(repr=False)
    host: str | None = None            # default: the JID's domain (SRV if aiodns is installed)
    port: int | None = None            # default: 5222 (5223 with tls=direct)
    tls: str = "starttls"              # starttls | direct (XEP-0368) | plaintext (loopback tests only)
    ca_file: str | None = None         # extra CA bundle; certificates are always verified
    rooms: tuple[str, ...] = ()        # room JIDs to join (and create if missing)
    nick: str | None = None            # default: the JID's local part
    command_prefix: str = "!"
    rate: float = 5.0                  # outbound messages per second ...
    burst: int = 10                    # ... after a burst of this many
    reconnect_min: float = 1.0         # backoff after a lost connection: min doubling to max,
    reconnect_max: float = 300.0       # with jitter
    keepalive: float = 60.0            # ping the server this often when idle (config: at least 1s)
    max_line_chars: int = 3000         # longer lines are split (at a space if possible)
    # Lines of text (after splitting at max_line_chars) one target may have queued;
    # an answer that does not fit ends in a note saying how many lines were left out.
    max_queued_lines: int = DEFAULT_MAX_PER_TARGET
    connect_timeout: float = 30.0      # start() waits this long for the first session
    join_timeout: float = 10.0

    @property
    def room_nick(self) -> str:
        return self.nick or self.jid.split("@", 1)[0]

    @property
    def domain(self) -> str:
        return self.jid.split("@", 1)[1]


def _bare_jid(value: str) -> str | None:
    """A message if ``value`` is not a bare JID (``name@example.org``)."""
    from slixmpp.jid import JID, InvalidJID

    try:
        jid = JID(value)
    except InvalidJID as exc:
        return f"not a valid JID ({exc})"
    if not jid.user or jid.resource:
        return "expected a bare JID like name@example.org"
    return None


def _not_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def parse_config(section: Section) -> XmppConfig | None:
    """One ``networks:`` entry (without its ``protocol`` key).  Every problem
    goes to ``section.findings`` with its line; the password comes from the
    variable named by ``password_env`` and never appears in a message."""
    s = section
    problems_before = len(s.findings.problems)
    s.check_keys(KEYS, secrets={"password": "password_env"})
    s.require("name", "jid", "password_env")
    name = s.get("name", str, None, _not_empty)
    jid = s.get("jid", str, None, _bare_jid)
    host = s.get("host", str, None, _not_empty)
    port = s.get("port", int, None, lambda v: None if 0 < v < 65536 else "expected 1..65535")
    tls = s.get("tls", str, "starttls",
                lambda v: None if v in TLS_POLICIES else f"expected one of {', '.join(TLS_POLICIES)}")
    ca_file = s.get("ca_file", str, None, lambda v: None if os.path.isfile(v) else "no such file")
    nick = s.get("nick", str, None, lambda v: None if v.strip() and "/" not in v else "a non-empty nickname")
    prefix = s.get("command_prefix", str, "!",
                   lambda v: None if v and not any(c.isspace() for c in v) else "a non-blank word")
    rate = s.get("rate", (int, float), 5.0, lambda v: None if v > 0 else "must be > 0")
    burst = s.get("burst", int, 10, lambda v: None if v >= 1 else "at least 1")
    max_line = s.get("max_line_chars", int, 3000, lambda v: None if v >= 100 else "at least 100")
    # As on IRC, at least 10: fewer would cut ordinary answers (help, a short ps) for nothing.
    max_queued = s.get("max_queued_lines", int, DEFAULT_MAX_PER_TARGET,
                       lambda v: None if v >= MIN_MAX_QUEUED else f"at least {MIN_MAX_QUEUED}")
    rmin = s.duration("reconnect_min", 1.0)
    rmax = s.duration("reconnect_max", 300.0)
    if rmax < rmin:
        s.problem("reconnect_max", "need reconnect_min <= reconnect_max")
    keepalive = s.duration("keepalive", 60.0, minimum=MIN_KEEPALIVE,
                           why="how often an idle connection is pinged: without pings a dead "
                               "connection is never noticed")
    if tls == "plaintext":
        # The password would cross the network unencrypted: only a test server on this machine.
        server = host if "host" in s else (jid.split("@", 1)[1] if jid else None)
        if server is not None and not is_loopback(server):
            where = repr(server) if "host" in s else f"{server!r} (the jid's domain; set host)"
            s.problem("tls", f"tls: plaintext is only allowed to a loopback host (localhost, 127.0.0.1, ::1), "
                             f"not {where}: the password would cross the network unencrypted")
    rooms: list[str] = []
    raw = s.raw("rooms", [])
    if not isinstance(raw, list) or not all(isinstance(r, str) for r in raw):
        s.problem("rooms", "rooms: expected a list of room JIDs")
    else:
        for room in raw:
            message = _bare_jid(room)
            if message:
                s.problem("rooms", f"room {room!r}: {message}")
            else:
                rooms.append(room)
    # Missing: a problem at start, a warning (and a config without password) for check.
    password = s.secret("password_env")

    if len(s.findings.problems) > problems_before or name is None or jid is None:
        return None
    return XmppConfig(name=name, jid=jid, password=password, host=host, port=port, tls=tls,
                      ca_file=ca_file, rooms=tuple(rooms), nick=nick, command_prefix=prefix,
                      rate=float(rate), burst=burst, reconnect_min=rmin, reconnect_max=rmax,
                      keepalive=keepalive, max_line_chars=max_line, max_queued_lines=max_queued)
