"""The IRC front-end: one server connection per configured network.

Built on ``irc.client_aio`` for the socket and line parsing; everything the
bot depends on is done here by hand, because the library either lacks it or
does it in a way that does not fit asyncio (see ../shared/test-servers.md §2):

* CAP LS 302 / REQ and SASL PLAIN (the library's SASL registers
  reactor-global handlers and AioConnection has none), so each connection
  gets its own reactor;
* who is talking: the IRCv3 ``account`` tag; without it, accounts tracked
  from extended-join + account-notify (+ WHOX) for users in shared channels.
  A nick alone never counts;
* one paced send queue (``bot.pacing.TokenBucket``; the library's
  ``set_rate_limit`` sleeps and would block the event loop);
* keepalive PINGs, reconnection with exponential backoff and jitter;
* the configured nick taken back when its holder (often our own ghost)
  leaves, and a SASL login made late when services were down at connect.

Nothing from the ``irc`` library leaves this module: incoming lines become
``bot.chat.Message`` and library errors become ``TransportError``.
"""
from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import random
import re
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import irc.client
import irc.client_aio
import irc.connection
from jaraco.stream import buffer as irc_buffer

from bot.chat import (UNVERIFIED, VERIFIED_SERVICES, Identity, Message, MessageHandler, Room,
                      Target, TransportError)
from bot.commands import sanitise
from bot.configkit import Section
from bot.pacing import TokenBucket
from engine.yamlconfig import Problem
from engine.durations import parse_duration

log = logging.getLogger(__name__)

# IRCv3 capabilities asked for when the server offers them (plus ``sasl`` when
# the bot has an account).  ``echo-message`` confirms each line the server
# processed, for free (see IrcTransport's delivery guarantee).
DEFAULT_CAPS = ("account-tag", "message-tags", "account-notify", "extended-join", "echo-message")

# Measured against InspIRCd 3's DEFAULT connect class (threshold 10 s of
# penalty, 1 s of penalty per command, decaying at 1 command/s, RecvQ 4 KB):
# a sustained 1.0 line/s never accumulates fakelag; 1.2/s lagged 18 s after 150
# lines and 1.5/s 43 s, growing until "RecvQ exceeded" disconnects the bot.
# A burst of 5 stays well under the 10-command threshold.  Every line the bot
# writes after registration (JOIN, WHO, PING included) spends a token.
DEFAULT_RATE = 1.0
DEFAULT_BURST = 5

REGISTRATION_TIMEOUT = 60.0     # TCP connect + CAP/SASL + welcome
STABLE_AFTER = 30.0             # a connection that lived this long resets the backoff
# Without echo-message a ``PING :marker`` confirms every line written before
# it.  One marker is outstanding at a time, and the next goes out as soon as
# the last was answered and lines were written since, so after a crash only
# the lines of about one round trip are resent twice.  A marker is a command
# like any other (InspIRCd's fakelag and ngircd's penalty count PING, measured),
# so it spends a token: while lines wait for tokens it is written after at most
# MARKER_LINES lines (or MARKER_AGE seconds), not after every line, which would
# halve the paced rate; when a token is spare it delays nothing and goes at once.
# 12 lines per marker keeps a backlog at 12/13 (92%) of the configured rate in
# lines (at the default 1/s, MARKER_AGE comes first: ~10/11); the price is that
# a crash mid-backlog may repeat up to that many lines the server had relayed.
MARKER_LINES = 12
MARKER_AGE = 10.0
ECHO_GRACE = 3.0                # with echo-message: a line not echoed by then gets a marker PING
# While the bot is not on its configured nick (taken at connect, e.g. by its
# own ghost), it asks for it again this often (jittered 2/3..4/3), and at once
# when the holder is seen to quit or change nick.
NICK_RETRY = 45.0
# While SASL is configured but the server did not offer it at registration
# (services down or still linking), CAP LS is asked again this often
# (jittered), besides listening for CAP NEW: InspIRCd 3 lists ``sasl`` again
# once services link but announces nothing (measured).  Then the bot logs in
# after registration; if the server refuses that (or does not answer within
# SASL_LATE_TIMEOUT), the bot QUITs and reconnects to log in while
# registering, at most once per RELOGIN_INTERVAL.
SASL_RECHECK = 60.0
SASL_LATE_TIMEOUT = 30.0
RELOGIN_INTERVAL = 600.0
MAX_BATCH = 32                  # lines per socket write at most (then yield to the loop)
IRC_LINE_BYTES = 512            # including CR LF (RFC 1459 / 2812)
MAX_HOST = 63                   # assumed for our own host until the server tells us
WHOX_TOKEN = "471"

_NICK = re.compile(r"^[A-Za-z\[\]\\`_^{|}][A-Za-z0-9\[\]\\`_^{|}-]*$")
_CHANNEL = re.compile(r"^[#&+!][^\s,\x07]+$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# -- configuration ---------------------------------------------------------------------

@dataclass(frozen=True)
class IrcConfig:
    protocol: ClassVar[str] = "irc"
    name: str                                   # the network's name in the bot ("libera")
    host: str
    nick: str
    port: int | None = None                     # default: 6697 with TLS, 6667 without
    tls: bool = True
    tls_verify: bool = True                     # False: accept any certificate (a test server only)
    ca_file: str | None = None                  # PEM CA bundle trusted besides the system's CAs
    username: str | None = None                 # default: the nick
    realname: str = "release bot"
    sasl_account: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    channels: tuple[str, ...] = ()
    command_prefix: str = "!"
    pacing_rate: float = DEFAULT_RATE           # lines per second, sustained
    pacing_burst: int = DEFAULT_BURST
    reconnect_min: float = 1.0                  # seconds; doubles per failed attempt ...
    reconnect_max: float = 300.0                # ... up to this, with jitter
    allow_hostmask: bool = True                 # False: never offer nick!user@host to the directory
    use_notice: bool = False                    # answer with NOTICE instead of PRIVMSG
    ping_interval: float = 60.0                 # PING the server after this much silence ...
    ping_timeout: float = 30.0                  # ... and drop the connection if it stays silent
    request_caps: tuple[str, ...] = DEFAULT_CAPS

    @property
    def server_port(self) -> int:
        return self.port if self.port is not None else (6697 if self.tls else 6667)


_KEYS = ("name", "host", "port", "tls", "tls_verify", "ca_file", "nick", "username", "realname", "sasl_account",
         "sasl_password_env", "channels", "command_prefix", "pacing_rate", "pacing_burst",
         "reconnect_min", "reconnect_max", "allow_hostmask", "use_notice", "ping_interval", "ping_timeout")


def _parse_entry(node: Any, file: str) -> tuple[IrcConfig | None, list[Problem]]:
    """Validate one ``protocol: irc`` entry of bot.yaml's ``networks``; every
    problem is returned (as ``file:line``), none is raised.  The SASL password
    comes from the environment variable named by ``sasl_password_env``."""
    problems: list[Problem] = []
    base_line = getattr(node, "line", 0)

    def line(key: str) -> int:
        line_of = getattr(node, "line_of", None)
        return line_of(key) if line_of else base_line

    if not isinstance(node, dict):
        return None, [Problem(file, base_line, "irc network: expected a mapping")]
    label = f"irc network {node['name']!r}" if isinstance(node.get("name"), str) else "irc network"

    def problem(key: str | None, message: str) -> None:
        problems.append(Problem(file, line(key) if key else base_line, f"{label}: {message}"))

    for key in node:
        if key == "sasl_password":
            problem(key, "sasl_password: secrets are not written in config files; "
                         "put it in an environment variable and name it with sasl_password_env")
        elif key not in _KEYS:
            problem(key, f"unknown key {key!r} (expected {', '.join(_KEYS)})")

    def get(key: str, kind: type | tuple[type, ...], default: Any, check: Callable[[Any], str | None] | None = None,
            required: bool = False) -> Any:
        if key not in node:
            if required:
                problem(None, f"missing {key!r}")
            return default
        value = node[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(k.__name__ for k in kinds)
            problem(key, f"{key}: expected {names}, got {value!r}")
            return default
        message = check(value) if check else None
        if message:
            problem(key, f"{key}: {message}")
            return default
        return value

    def duration(key: str, default: float) -> float:
        if key not in node:
            return default
        try:
            seconds = parse_duration(node[key])
        except ValueError as exc:
            problem(key, f"{key}: {exc}")
            return default
        if seconds <= 0:
            problem(key, f"{key}: must be more than 0")
            return default
        return seconds

    name = get("name", str, None, lambda v: None if v.strip() else "must not be empty", required=True)
    host = get("host", str, None, lambda v: None if v.strip() and " " not in v else "a host name or address",
               required=True)
    port = get("port", int, None, lambda v: None if 0 < v < 65536 else "expected 1-65535")
    tls = get("tls", bool, True)
    tls_verify = get("tls_verify", bool, True)
    ca_file = get("ca_file", str, None, lambda v: None if os.path.isfile(v) else "no such file")
    if ca_file is not None and tls is False:
        problem("ca_file", "ca_file: needs tls: true (a CA is only used to check a TLS server)")
    nick = get("nick", str, None, lambda v: None if _NICK.match(v) else "not a valid IRC nick", required=True)
    username = get("username", str, None, lambda v: None if re.match(r"^[^\s@!:]+$", v) else
                   "no spaces, '@', '!' or ':'")
    realname = get("realname", str, "release bot", lambda v: None if "\n" not in v and "\r" not in v else
                   "one line")
    account = get("sasl_account", str, None, lambda v: None if v.strip() and " " not in v else "one word")
    env = get("sasl_password_env", str, None, lambda v: None if _ENV.match(v) else
              "the name of an environment variable")
    password = None
    if env is not None:
        password = os.environ.get(env)
        if not password:
            problem("sasl_password_env", f"sasl_password_env: environment variable {env} is not set")
        if account is None and "sasl_account" not in node:
            account = nick
    elif account is not None:
        problem("sasl_account", "sasl_account: needs sasl_password_env (the variable holding its password)")
    if env is not None and tls is False and host is not None and not is_loopback(host):
        problem("sasl_password_env", "sasl_password_env: SASL PLAIN sends the password readable by anyone "
                                     "on the way; needs tls: true (plain text only to a loopback host)")
    channels = get("channels", list, [])
    good_channels: list[str] = []
    for ch in channels:
        if isinstance(ch, str) and _CHANNEL.match(ch):
            good_channels.append(ch)
        else:
            problem("channels", f"channels: {ch!r} is not a channel name like '#ops'")
    prefix = get("command_prefix", str, "!", lambda v: None if v and not any(c.isspace() for c in v) else
                 "a non-blank word")
    rate = get("pacing_rate", (int, float), DEFAULT_RATE, lambda v: None if v > 0 else "must be more than 0")
    burst = get("pacing_burst", int, DEFAULT_BURST, lambda v: None if v >= 1 else "at least 1")
    rmin = duration("reconnect_min", 1.0)
    rmax = duration("reconnect_max", 300.0)
    if rmin > rmax:
        problem("reconnect_min", "reconnect_min: must not exceed reconnect_max")
    allow_hostmask = get("allow_hostmask", bool, True)
    use_notice = get("use_notice", bool, False)
    ping_interval = duration("ping_interval", 60.0)
    ping_timeout = duration("ping_timeout", 30.0)
    if problems:
        return None, problems
    return IrcConfig(name=name, host=host, nick=nick, port=port, tls=tls, tls_verify=tls_verify, ca_file=ca_file,
                     username=username, realname=realname, sasl_account=account, sasl_password=password,
                     channels=tuple(good_channels), command_prefix=prefix, pacing_rate=float(rate),
                     pacing_burst=burst, reconnect_min=rmin, reconnect_max=rmax,
                     allow_hostmask=allow_hostmask, use_notice=use_notice, ping_interval=ping_interval,
                     ping_timeout=ping_timeout), []


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: traffic that never leaves the machine."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# -- text helpers --------------------------------------------------------------------------

def casefolder(casemapping: str) -> Callable[[str], str]:
    """Nick/channel comparison per the server's ISUPPORT CASEMAPPING."""
    upper, lower = "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz"
    if casemapping == "ascii":
        table = str.maketrans(upper, lower)
    elif casemapping == "strict-rfc1459":
        table = str.maketrans(upper + "[]\\", lower + "{}|")
    else:   # rfc1459, the default
        table = str.maketrans(upper + "[]\\~", lower + "{}|^")
    return lambda s: s.translate(table)


def split_utf8(text: str, limit: int) -> tuple[str, str]:
    """(head, rest): head fits in ``limit`` bytes of UTF-8 and never ends inside
    a character; a break at a space is preferred (that one space is dropped)."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text, ""
    cut = max(limit, 1)
    while cut > 0 and (data[cut] & 0xC0) == 0x80:     # a continuation byte: back up
        cut -= 1
    if cut == 0:                                       # limit smaller than one character
        cut = len(text[0].encode("utf-8"))
    head = data[:cut].decode("utf-8")
    space = head.rfind(" ")
    if space > len(head) * 2 // 3:
        return head[:space], text[space + 1:]
    return head, text[len(head):]


def clean_lines(text: str) -> list[str]:
    """One IRC line per line of text; NUL cannot travel, blank lines carry nothing."""
    return [line.replace("\x00", "\ufffd") for line in text.splitlines() if line.strip()]


# -- the library, adapted ------------------------------------------------------------------

class _Protocol(irc.client_aio.IrcProtocol):
    def connection_made(self, transport: Any) -> None:
        # CAP LS goes out before NICK/USER, so the server holds registration
        # until CAP END and SASL can finish first.
        transport.write(b"CAP LS 302\r\n")
        self._sock = transport.get_extra_info("socket")

    def data_received(self, data: bytes) -> None:
        # ACK at once: a server without TCP_NODELAY (ngircd) otherwise holds its
        # next line to us until our delayed ACK (40 ms) for a line we did not
        # answer, such as the PONG to a confirmation marker.
        if _QUICKACK is not None and self._sock is not None:
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                pass
        super().data_received(data)


_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)     # Linux only


class _Connection(irc.client_aio.AioConnection):
    protocol_class = _Protocol
    # Undecodable bytes from some client must not kill the connection
    # (the default buffer raises UnicodeDecodeError inside data_received).
    buffer_class = irc_buffer.LenientDecodingLineBuffer

    def _process_line(self, line: str) -> None:
        try:
            super()._process_line(line)
        except Exception:   # one bad line (or a bug in a handler) must not drop the connection
            log.exception("cannot handle a line from the server: %r", sanitise(line))


class _Reactor(irc.client_aio.AioReactor):
    connection_class = _Connection


class _Bucket(TokenBucket):
    def tokens(self) -> float:
        """Tokens available now."""
        self._refill()
        return self._tokens


@dataclass
class _Line:
    command: str                 # PRIVMSG | NOTICE
    target: str
    text: str
    seq: int = 0                 # set when written
    written: float = 0.0


class _Session:
    """One connection attempt: its own reactor, connection and IRC state."""

    def __init__(self, owner: "IrcTransport", number: int) -> None:
        self.owner = owner
        self.number = number
        loop = asyncio.get_running_loop()
        self.reactor = _Reactor(loop=loop)
        self.conn: _Connection = self.reactor.server()
        self.reactor.add_global_handler("all_events", self._on_event, 0)
        self.registered = asyncio.Event()
        self.lost = asyncio.Event()
        self.nick = owner.config.nick
        self.nick_tries = 0
        self.user: str | None = None
        self.host: str | None = None
        self.offered: dict[str, str | None] = {}
        self.caps: set[str] = set()
        self.cap_ended = False
        self.sasl_started = False                     # SASL tried while registering
        self.ls_fresh = False                         # a CAP LS re-check is under way: forget the old list
        self.late_sasl: str | None = None             # after registration: requested | authenticating | done | failed
        self.late_sasl_since = 0.0
        self.quitting: str | None = None              # QUIT with this once every written line is confirmed
        self.relogin = False                          # left with that QUIT, to log in while registering again
        self.isupport: dict[str, str | bool] = {}
        self.fold: Callable[[str], str] = casefolder("rfc1459")
        self.control: deque[str] = deque()            # JOIN/WHO/PING, ahead of messages
        self.marker: tuple[str, int] | None = None    # outstanding confirmation PING: (token, last seq)
        self.marker_count = 0
        self.last_rx = owner.clock()
        self.last_ping = 0.0
        self.next_nick_try = 0.0
        self.next_sasl_check = 0.0
        self.pending_joins: set[str] = set()
        self.joined: set[str] = set()
        # account tracking without account-tag: nick -> account (None: known logged out)
        self.accounts: dict[str, str | None] = {}
        self.members: dict[str, set[str]] = {}        # nick -> shared channels

    # -- writing ------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        transport = getattr(self.conn, "transport", None)
        return not self.lost.is_set() and transport is not None and not transport.is_closing()

    def write(self, line: str) -> None:
        """Hand one line to the socket now (no pacing: callers pace)."""
        try:
            self.conn.send_raw(line)
        except (irc.client.IRCError, OSError, AttributeError) as exc:
            raise TransportError(f"cannot write to {self.owner.config.name}: {exc}") from exc

    def write_lines(self, lines: list[str]) -> None:
        """Hand several lines to the socket in one write: one TCP segment, so a
        server that relays them without TCP_NODELAY (ngircd) sends them on
        together instead of holding all but the first for the reader's
        delayed ACK (~40 ms per answer of more than one line)."""
        for line in lines:
            if "\r" in line or "\n" in line or "\0" in line:
                raise TransportError(f"{self.owner.config.name}: refusing to write a line with CR, LF or NUL")
        try:
            self.conn.transport.write(b"".join(line.encode("utf-8") + b"\r\n" for line in lines))
        except (OSError, AttributeError) as exc:
            raise TransportError(f"cannot write to {self.owner.config.name}: {exc}") from exc

    def budget(self, command: str, target: str) -> int:
        """Bytes of text that fit in one line as the server relays it, with our
        own nick!user@host in front (unknown host: assume the longest)."""
        user = self.user or "~" + (self.owner.config.username or self.owner.config.nick)[:10]
        prefix = f":{self.nick}!{user}@{self.host or 'x' * MAX_HOST} {command} {target} :"
        return IRC_LINE_BYTES - 2 - len(prefix.encode("utf-8"))

    def abort(self) -> None:
        transport = getattr(self.conn, "transport", None)
        if transport is not None:
            transport.abort()
        self.lost.set()

    def close(self, message: str = "") -> None:
        try:
            self.conn.disconnect(message)
        except Exception:   # already gone
            pass
        self.lost.set()

    # -- reading ------------------------------------------------------------------

    def _on_event(self, conn: Any, event: Any) -> None:
        if self.lost.is_set() and event.type != "disconnect":
            return
        self.last_rx = self.owner.clock()
        handler = getattr(self, "_ev_" + event.type, None)
        if handler is not None:
            try:
                handler(event)
            except Exception:
                log.exception("%s: cannot handle %s from the server", self.owner.config.name, event.type)

    def _ev_disconnect(self, event: Any) -> None:
        if not self.lost.is_set():
            self.lost.set()
            self.owner._wake.set()

    def _ev_error(self, event: Any) -> None:
        log.warning("%s: server says: %s", self.owner.config.name,
                    sanitise(" ".join(str(a) for a in [event.target, *event.arguments] if a)))

    def _ev_cap(self, event: Any) -> None:
        args = [str(a) for a in event.arguments]
        if not args:
            return
        sub, more = args[0].upper(), len(args) >= 3 and args[1] == "*"
        caps = args[-1].split()
        cfg = self.owner.config
        if sub == "LS":
            if self.ls_fresh:
                self.offered.clear()
                self.ls_fresh = False
            for cap in caps:
                key, _, value = cap.partition("=")
                self.offered[key] = value or None
            if more:
                return
            if self.cap_ended:                      # the answer to a re-check after registration
                self.try_late_sasl()
                return
            want = [c for c in cfg.request_caps if c in self.offered]
            if self.wants_sasl():
                if self.offers_sasl_plain():
                    want.append("sasl")
                else:
                    log.warning("%s: the server offers no SASL PLAIN (services down or still linking?); "
                                "continuing without logging in as %s until it does", cfg.name, cfg.sasl_account)
                    if "cap-notify" in self.offered:    # implied by CAP LS 302; asked for if listed
                        want.append("cap-notify")
            if want:
                self.write("CAP REQ :" + " ".join(want))
            else:
                self.end_cap()
        elif sub == "ACK":
            for cap in caps:
                if cap.startswith("-"):
                    self.caps.discard(cap[1:])
                else:
                    self.caps.add(cap)
            if more:
                return
            if self.cap_ended:
                if "sasl" in caps and self.late_sasl == "requested":
                    self._late_authenticate()
                return
            if "sasl" in self.caps and not self.sasl_started:
                self.sasl_started = True
                self.write("AUTHENTICATE PLAIN")
            else:
                self.end_cap()
        elif sub == "NAK":
            if self.cap_ended and "sasl" in caps and self.late_sasl == "requested":
                self.owner._relogin(self, "CAP REQ sasl refused")
                return
            log.warning("%s: the server refused capabilities %s", cfg.name, sanitise(" ".join(caps)))
            self.end_cap()
        elif sub == "NEW":
            for cap in caps:
                key, _, value = cap.partition("=")
                self.offered[key] = value or None
            want = [c for c in caps if c.partition("=")[0] in cfg.request_caps
                    and c.partition("=")[0] not in self.caps]
            if want and self.cap_ended:
                self.control.append("CAP REQ :" + " ".join(c.partition("=")[0] for c in want))
                self.owner._wake.set()
            if any(c.partition("=")[0] == "sasl" for c in caps):
                self.try_late_sasl()
        elif sub == "DEL":
            for cap in caps:
                self.caps.discard(cap)
                self.offered.pop(cap, None)

    def wants_sasl(self) -> bool:
        cfg = self.owner.config
        return bool(cfg.sasl_account and cfg.sasl_password) and self.owner.account is None

    def offers_sasl_plain(self) -> bool:
        if "sasl" not in self.offered:
            return False
        mechs = self.offered["sasl"]
        return mechs is None or "PLAIN" in mechs.upper().split(",")

    def recheck_caps(self) -> None:
        """Ask for the server's capabilities again (SASL may be offered now)."""
        self.ls_fresh = True
        self.control.append("CAP LS 302")
        self.owner._wake.set()

    def try_late_sasl(self) -> None:
        """Log in after registration, once the server offers SASL (IRCv3 allows
        it; InspIRCd 3 does it).  Only when it was not offered while registering:
        a refusal then (a wrong password) stands."""
        if (not self.registered.is_set() or not self.wants_sasl() or self.sasl_started
                or self.late_sasl is not None or self.quitting is not None or not self.offers_sasl_plain()):
            return
        log.info("%s: the server offers SASL now; logging in as %s", self.owner.config.name,
                 self.owner.config.sasl_account)
        self.late_sasl_since = self.owner.clock()
        if "sasl" in self.caps:
            self._late_authenticate()
        else:
            self.late_sasl = "requested"
            self.control.append("CAP REQ :sasl")
            self.owner._wake.set()

    def _late_authenticate(self) -> None:
        self.late_sasl = "authenticating"
        self.late_sasl_since = self.owner.clock()
        self.control.append("AUTHENTICATE PLAIN")
        self.owner._wake.set()

    def _late_refused(self, event: Any) -> None:
        # A server that does not take SASL after registration: 421 for
        # AUTHENTICATE or CAP, 462, or FAIL AUTHENTICATE (standard replies).
        if self.late_sasl not in ("requested", "authenticating"):
            return
        words = [str(event.target or "").upper(), *(str(a).upper() for a in event.arguments[:1])]
        if event.type == "alreadyregistered" or "AUTHENTICATE" in words or "CAP" in words:
            self.owner._relogin(self, f"{event.type} {sanitise(' '.join(map(str, event.arguments)), 80)}")

    _ev_alreadyregistered = _ev_unknowncommand = _ev_fail = _late_refused

    def end_cap(self) -> None:
        if not self.cap_ended:
            self.cap_ended = True
            self.write("CAP END")

    def _ev_authenticate(self, event: Any) -> None:
        if event.target != "+":
            return
        cfg = self.owner.config
        payload = base64.b64encode(f"\0{cfg.sasl_account}\0{cfg.sasl_password}".encode("utf-8")).decode()
        chunks = [payload[i:i + 400] for i in range(0, len(payload), 400)]
        if not chunks or len(chunks[-1]) == 400:
            chunks.append("+")
        for chunk in chunks:
            # Straight to the socket: the library's send_raw logs every line at DEBUG.
            self.conn.transport.write(f"AUTHENTICATE {chunk}\r\n".encode("ascii"))

    def _ev_loggedin(self, event: Any) -> None:
        account = str(event.arguments[1]) if len(event.arguments) > 1 else "?"
        self.owner.account = account
        log.info("%s: logged in as %s", self.owner.config.name, account)

    def _ev_saslsuccess(self, event: Any) -> None:
        if self.late_sasl == "authenticating":
            self.late_sasl = "done"
        self.end_cap()

    def _sasl_failed(self, event: Any) -> None:
        if self.late_sasl in ("requested", "authenticating"):
            # After registration a refusal may only mean "not now": ask again while registering.
            self.owner._relogin(self, sanitise(" ".join(map(str, event.arguments[-1:]))))
            return
        log.error("%s: SASL login as %s failed (%s); continuing without an account", self.owner.config.name,
                  self.owner.config.sasl_account, sanitise(" ".join(map(str, event.arguments))))
        self.owner.account = None
        self.end_cap()

    _ev_saslfail = _ev_sasltoolong = _ev_saslaborted = _ev_nicklocked = _sasl_failed

    def _ev_saslalready(self, event: Any) -> None:
        self.end_cap()

    def _ev_welcome(self, event: Any) -> None:
        self.nick = str(event.target)
        self.cap_ended = True
        cfg = self.owner.config
        if cfg.sasl_account and cfg.sasl_password and not self.sasl_started and "sasl" in self.offered:
            log.error("%s: registered without logging in as %s", cfg.name, cfg.sasl_account)
        elif cfg.sasl_account and cfg.sasl_password and not self.offered:
            log.error("%s: the server does not negotiate capabilities; no SASL login as %s",
                      cfg.name, cfg.sasl_account)
        self.registered.set()

    def _ev_featurelist(self, event: Any) -> None:
        for token in event.arguments[:-1]:
            key, sep, value = str(token).partition("=")
            self.isupport[key.upper()] = value if sep else True
        if "CASEMAPPING" in self.isupport:
            self.fold = casefolder(str(self.isupport["CASEMAPPING"]).lower())

    def _bad_nick(self, event: Any) -> None:
        if self.registered.is_set():     # our own NICK to regain the configured nick: try again later
            log.debug("%s: nick %s is still taken", self.owner.config.name, self.owner.config.nick)
            return
        self.nick_tries += 1
        base = self.owner.config.nick
        self.nick = (base + "_" * self.nick_tries if self.nick_tries <= 3
                     else f"{base[:20]}{random.randint(100, 99999)}")
        log.warning("%s: nick %s is not available; trying %s", self.owner.config.name,
                    sanitise(str(event.arguments[0]) if event.arguments else base), self.nick)
        self.write(f"NICK {self.nick}")

    _ev_nicknameinuse = _ev_unavailresource = _ev_erroneusnickname = _ev_nickcollision = _bad_nick

    def _ev_pong(self, event: Any) -> None:
        token = str(event.arguments[-1]) if event.arguments else ""
        if self.marker and token == self.marker[0]:
            self.owner._confirm(self.marker[1])
            self.marker = None
            self.owner._wake.set()

    # membership and account tracking (used only when there is no account-tag)

    def _is_me(self, nick: str) -> bool:
        return self.fold(nick) == self.fold(self.nick)

    def _ev_join(self, event: Any) -> None:
        source = event.source
        channel = str(event.target)
        nick = self.fold(source.nick)
        if self._is_me(source.nick):
            self.user, self.host = source.user, source.host
            self.joined.add(self.fold(channel))
            log.info("%s: joined %s", self.owner.config.name, sanitise(channel))
            if self._needs_tracking() and self.isupport.get("WHOX"):
                # Ready only once we know who is logged in there (at the end of WHO).
                self.control.append(f"WHO {channel} %tcna,{WHOX_TOKEN}")
                self.owner._wake.set()
            else:
                self.pending_joins.discard(self.fold(channel))
                self.owner._check_ready(self)
            return
        self.members.setdefault(nick, set()).add(self.fold(channel))
        if "extended-join" in self.caps and event.arguments:
            account = str(event.arguments[0])
            self.accounts[nick] = None if account == "*" else account
        elif self._needs_tracking() and self.isupport.get("WHOX"):
            self.accounts.pop(nick, None)
            self.control.append(f"WHO {source.nick} %tcna,{WHOX_TOKEN}")
            self.owner._wake.set()

    def _ev_whospcrpl(self, event: Any) -> None:
        args = [str(a) for a in event.arguments]
        if len(args) != 4 or args[0] != WHOX_TOKEN:
            return
        _, channel, nick, account = args
        if self._is_me(nick):
            return
        if channel != "*":
            self.members.setdefault(self.fold(nick), set()).add(self.fold(channel))
        self.accounts[self.fold(nick)] = None if account == "0" else account

    def _ev_endofwho(self, event: Any) -> None:
        if event.arguments:
            self.pending_joins.discard(self.fold(str(event.arguments[0])))
            self.owner._check_ready(self)

    def _ev_account(self, event: Any) -> None:
        account = str(event.target)
        self.accounts[self.fold(event.source.nick)] = None if account == "*" else account

    def _ev_nick(self, event: Any) -> None:
        old, new = event.source.nick, str(event.target)
        if self._is_me(old):
            self.nick = new
            if self.has_own_nick():
                log.info("%s: regained the nick %s", self.owner.config.name, sanitise(new))
            return
        if self._holds_our_nick(old):
            self.regain_nick()
        for table in (self.accounts, self.members):
            if self.fold(old) in table:
                table[self.fold(new)] = table.pop(self.fold(old))  # type: ignore[assignment]
            else:
                table.pop(self.fold(new), None)

    def _forget(self, nick: str) -> None:
        self.accounts.pop(self.fold(nick), None)
        self.members.pop(self.fold(nick), None)

    def _ev_quit(self, event: Any) -> None:
        self._forget(event.source.nick)
        if self._holds_our_nick(event.source.nick):
            self.regain_nick()

    # our own nick, taken at connect (by someone, or by our own ghost)

    def has_own_nick(self) -> bool:
        return self.fold(self.nick) == self.fold(self.owner.config.nick)

    def _holds_our_nick(self, nick: str) -> bool:
        return not self.has_own_nick() and self.fold(nick) == self.fold(self.owner.config.nick)

    def regain_nick(self) -> None:
        if not self.registered.is_set() or self.has_own_nick() or self.quitting is not None:
            return
        self.next_nick_try = self.owner.clock() + self.owner.nick_retry * (2 / 3 + self.owner.rng() * 2 / 3)
        self.control.append(f"NICK {self.owner.config.nick}")
        self.owner._wake.set()

    def _left(self, nick: str, channel: str) -> None:
        chan = self.fold(channel)
        if self._is_me(nick):
            self.joined.discard(chan)
            for other in list(self.members):
                self.members[other].discard(chan)
                if not self.members[other]:
                    self._forget(other)
            log.warning("%s: no longer in %s", self.owner.config.name, sanitise(channel))
            return
        channels = self.members.get(self.fold(nick), set())
        channels.discard(chan)
        if not channels:   # no shared channel: account-notify would not tell us about changes
            self._forget(nick)

    def _ev_part(self, event: Any) -> None:
        self._left(event.source.nick, str(event.target))

    def _ev_kick(self, event: Any) -> None:
        if event.arguments:
            self._left(str(event.arguments[0]), str(event.target))

    def _join_failed(self, event: Any) -> None:
        channel = str(event.arguments[0]) if event.arguments else "?"
        log.error("%s: cannot join %s: %s", self.owner.config.name, sanitise(channel),
                  sanitise(" ".join(map(str, event.arguments[1:]))))
        self.pending_joins.discard(self.fold(channel))
        self.owner._check_ready(self)

    _ev_channelisfull = _ev_inviteonlychan = _ev_bannedfromchan = _ev_badchannelkey = _join_failed
    _ev_nosuchchannel = _ev_toomanychannels = _join_failed

    def _not_delivered(self, event: Any) -> None:
        # The server processed the line and refused it: it is not sent again.
        log.warning("%s: the server did not deliver a line to %s: %s", self.owner.config.name,
                    sanitise(str(event.arguments[0]) if event.arguments else "?"),
                    sanitise(" ".join(map(str, event.arguments[1:]))))

    _ev_cannotsendtochan = _ev_nosuchnick = _not_delivered

    def _needs_tracking(self) -> bool:
        return "account-tag" not in self.caps and "account-notify" in self.caps

    def account_of(self, nick: str, tags: list[dict[str, Any]] | None) -> str | None:
        """The services account vouched for by the server, or None."""
        if "account-tag" in self.caps:
            for tag in tags or ():
                if tag.get("key") == "account" and tag.get("value"):
                    return str(tag["value"])
            return None
        if self._needs_tracking():
            # Only trusted while account-notify keeps it current: without it a
            # logout would go unnoticed.
            return self.accounts.get(self.fold(nick))
        return None

    # messages

    def _ev_pubmsg(self, event: Any) -> None:
        self.owner._incoming(self, event, str(event.target))

    def _ev_pubnotice(self, event: Any) -> None:    # notices are never commands: only our echoes count
        if event.arguments and self._is_me(getattr(event.source, "nick", "") or ""):
            self.owner._echoed(self, "NOTICE", str(event.target), str(event.arguments[0]))

    _ev_privnotice = _ev_pubnotice

    def _ev_privmsg(self, event: Any) -> None:
        target = str(event.target)
        statusmsg = self.isupport.get("STATUSMSG")
        chantypes = self.isupport.get("CHANTYPES")
        chantypes = chantypes if isinstance(chantypes, str) and chantypes else "#&+!"
        if (isinstance(statusmsg, str) and len(target) > 1 and target[0] in statusmsg
                and target[1] in chantypes):
            # "@#ops": to the channel's ops only, and so is the answer (the room is "@#ops")
            self.owner._incoming(self, event, target)
        else:
            self.owner._incoming(self, event, None)


# -- the transport ------------------------------------------------------------------------------

class IrcTransport:
    """One IRC network.  ``start`` returns at once; the connection is made,
    kept alive and remade in the background.

    Delivery guarantee of ``send``: lines go out in order, paced, over one
    connection at a time.  A line leaves the outbox when it is written to a
    registered connection, and is forgotten only once the server confirmed
    that it processed it: by echoing it (IRCv3 echo-message), or by answering
    a ``PING :marker`` written after it (servers process a client's lines in
    order).  Lines still unconfirmed when a connection dies (written into a
    socket that was already dead, or whose confirmation died with it) are
    sent again, first and in order, once reconnected.  So no queued line is
    lost while the bot runs, and the only possible duplicate is a line the
    server processed just as the connection died, before its confirmation
    came back: with echo-message the lines of about one round trip; without
    it the lines written since the last answered marker, which is about one
    round trip's worth too while the token bucket has a token to spare, and
    at most MARKER_LINES lines (or MARKER_AGE seconds) while lines wait for
    tokens.  Lines still queued when ``close`` gives up flushing are logged
    as not delivered.

    Also kept up in the background: the configured nick (regained when its
    holder leaves, or tried every ``nick_retry`` seconds), and the SASL login
    when the server could not offer it at connect (see SASL_RECHECK).
    """

    protocol = "irc"

    def __init__(self, config: IrcConfig, *, clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[], float] = random.random, nick_retry: float = NICK_RETRY,
                 sasl_recheck: float = SASL_RECHECK) -> None:
        self.config = config
        self.network = config.name
        self.clock = clock
        self.rng = rng
        self.nick_retry = nick_retry              # seconds between tries to regain the configured nick
        self.sasl_recheck = sasl_recheck          # seconds between CAP LS while SASL is not offered
        self._relogin_at: float | None = None     # when the bot last reconnected to log in
        self.account: str | None = None          # the bot's own services account, once logged in
        self.disconnects = 0                      # registered connections lost (not counting close())
        self.connections = 0                      # registered connections made
        self._outbox: deque[_Line] = deque()
        self._unconfirmed: deque[_Line] = deque()
        self._seq = 0
        self._session: _Session | None = None
        self._ready = asyncio.Event()
        self._wake = asyncio.Event()
        self._handler: MessageHandler | None = None
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._closed = False

    # -- the Transport contract -----------------------------------------------------------

    async def start(self, on_message: MessageHandler) -> None:
        if self._task is not None:
            raise TransportError(f"{self.network}: already started")
        self._handler = on_message
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"irc-{self.network}")

    async def send(self, target: Target, text: str) -> None:
        if self._closed or self._stopping:
            raise TransportError(f"{self.network}: closed")
        if target.protocol != "irc" or target.network != self.network:
            raise TransportError(f"{self.network}: cannot send to {target} (another network)")
        name = target.name if isinstance(target, Room) else target.handle
        if not name or any(c in name for c in " ,\r\n\0") or len(name.encode("utf-8")) > 200:
            raise TransportError(f"{self.network}: bad target {sanitise(name, 60)!r}")
        command = "NOTICE" if self.config.use_notice else "PRIVMSG"
        for line in clean_lines(text):
            self._outbox.append(_Line(command, name, line))
        self._wake.set()

    async def close(self, flush_timeout: float = 5.0) -> None:
        """Flush what can be flushed (for up to ``flush_timeout`` seconds while
        connected), then QUIT and stop reconnecting."""
        if self._closed:
            return
        self._stopping = True
        deadline = self.clock() + flush_timeout
        while (self._outbox or self._unconfirmed) and self.clock() < deadline:
            session = self._session
            if session is None or not session.alive:
                break
            await asyncio.sleep(0.02)
        left = len(self._outbox) + len(self._unconfirmed)
        if left:
            log.warning("%s: closing with %d line(s) not delivered", self.network, left)
        self._closed = True
        session = self._session
        if session is not None:
            session.close("releasebot stopping")
        self._wake.set()
        for task in [self._task, *self._tasks]:
            if task is not None and not task.done():
                task.cancel()
        for task in [self._task, *self._tasks]:
            if task is not None:
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        log.info("%s: closed", self.network)

    # -- extras for the app, tests and benchmarks --------------------------------------------

    @property
    def connected(self) -> bool:
        session = self._session
        return session is not None and session.alive and session.registered.is_set()

    @property
    def nick(self) -> str:
        return self._session.nick if self._session else self.config.nick

    async def wait_ready(self, timeout: float = 15.0) -> None:
        """Until registered and every configured channel is joined (or refused)."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            raise TransportError(f"{self.network}: not ready after {timeout}s") from None

    def pending(self) -> int:
        """Lines queued or awaiting the server's confirmation."""
        return len(self._outbox) + len(self._unconfirmed)

    def unconfirmed(self) -> int:
        """Lines written but not yet confirmed: what a crash now could make the server see twice."""
        return len(self._unconfirmed)

    # -- connection supervision ---------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        cap = min(self.config.reconnect_max, self.config.reconnect_min * (2 ** min(attempt, 30)))
        return cap / 2 + self.rng() * cap / 2      # "equal jitter": never 0, never in lockstep

    async def _run(self) -> None:
        attempt = 0
        number = 0
        while not self._closed:
            number += 1
            self.account = None
            session = _Session(self, number)
            started = self.clock()
            workers: list[asyncio.Task[None]] = []
            try:
                await self._open(session)
                self._session = session
                self.connections += 1
                log.info("%s: connected to %s:%d as %s (%s)", self.network, self.config.host,
                         self.config.server_port, session.nick,
                         f"account {self.account}" if "sasl" in session.caps and self.account
                         else "no account")
                if self.config.channels:
                    session.pending_joins = {session.fold(c) for c in self.config.channels}
                    session.control.append("JOIN " + ",".join(self.config.channels))
                self._check_ready(session)
                workers = [asyncio.create_task(self._pump(session)), asyncio.create_task(self._maintain(session))]
                await session.lost.wait()
                if session.relogin:
                    log.info("%s: left %s:%d to log in again", self.network, self.config.host,
                             self.config.server_port)
                elif not self._closed:
                    self.disconnects += 1
                    log.warning("%s: disconnected from %s:%d", self.network, self.config.host,
                                self.config.server_port)
            except TransportError as exc:
                log.warning("%s: %s", self.network, exc)
            finally:
                for task in workers:
                    task.cancel()
                for task in workers:
                    try:
                        await task
                    except (asyncio.CancelledError, Exception):
                        pass
                self._ready.clear()
                if self._session is session:
                    self._session = None
                session.close()
                self._requeue()
            if self._closed:
                return
            if self.clock() - started >= STABLE_AFTER:
                attempt = 0
            delay = self._backoff(attempt)
            attempt += 1
            log.info("%s: reconnecting in %.1fs (%d line(s) waiting)", self.network, delay, self.pending())
            await asyncio.sleep(delay)

    async def _open(self, session: _Session) -> None:
        cfg = self.config
        if cfg.tls:
            try:
                context = ssl.create_default_context()          # the system's CAs ...
                if cfg.ca_file:
                    context.load_verify_locations(cafile=cfg.ca_file)    # ... plus a private one (as for XMPP)
            except (OSError, ssl.SSLError) as exc:      # the file vanished or is not PEM since start-up
                raise TransportError(f"cannot use ca_file {cfg.ca_file}: {exc}") from exc
            if not cfg.tls_verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            factory = irc.connection.AioFactory(ssl=context)
        else:
            factory = irc.connection.AioFactory()
        try:
            await asyncio.wait_for(session.conn.connect(cfg.host, cfg.server_port, session.nick,
                                                        username=cfg.username or cfg.nick,
                                                        ircname=cfg.realname, connect_factory=factory),
                                   REGISTRATION_TIMEOUT)
        except ssl.SSLCertVerificationError as exc:
            raise TransportError(
                f"TLS: refused the certificate of {cfg.host}:{cfg.server_port} "
                f"({exc.verify_message or exc.reason or exc}); "
                + (f"checked against ca_file {cfg.ca_file}" if cfg.ca_file else
                   "checked against the system's CAs: set ca_file to the CA that signed it "
                   "(or tls_verify: false, for a test server only)")) from exc
        except (OSError, asyncio.TimeoutError, irc.client.IRCError) as exc:
            raise TransportError(f"cannot connect to {cfg.host}:{cfg.server_port}: "
                                 f"{exc or type(exc).__name__}") from exc
        registered = asyncio.ensure_future(session.registered.wait())
        lost = asyncio.ensure_future(session.lost.wait())
        try:
            await asyncio.wait({registered, lost}, timeout=REGISTRATION_TIMEOUT,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            registered.cancel()
            lost.cancel()
        if not session.registered.is_set() or session.lost.is_set():
            session.abort()
            raise TransportError(f"{cfg.host}:{cfg.server_port} did not let us register")

    def _requeue(self) -> None:
        # Unconfirmed lines go out again first (see the class docstring).
        if self._unconfirmed:
            log.info("%s: %d unconfirmed line(s) will be sent again", self.network, len(self._unconfirmed))
            self._outbox.extendleft(reversed(self._unconfirmed))
            self._unconfirmed.clear()

    def _confirm(self, seq: int) -> None:
        while self._unconfirmed and self._unconfirmed[0].seq <= seq:
            self._unconfirmed.popleft()

    def _echoed(self, session: _Session, command: str, target: str, text: str) -> None:
        """Our own line came back: it, and every line written before it, was processed."""
        if session is not self._session:
            return
        for line in self._unconfirmed:
            if line.command == command and line.text == text and session.fold(line.target) == session.fold(target):
                self._confirm(line.seq)
                return

    def _relogin(self, session: _Session, why: str) -> None:
        """SASL after registration did not work: QUIT (once every written line
        is confirmed) and reconnect, to log in while registering; at most once
        per RELOGIN_INTERVAL, otherwise go on without an account."""
        if session.late_sasl == "failed" or session.quitting is not None:
            return
        session.late_sasl = "failed"
        cfg = self.config
        now = self.clock()
        if self._relogin_at is not None and now - self._relogin_at < RELOGIN_INTERVAL:
            log.warning("%s: logging in as %s after registration failed (%s); continuing without an account "
                        "for now, trying again in %.0fs", self.network, cfg.sasl_account, why,
                        self._relogin_at + RELOGIN_INTERVAL - now)
            session.late_sasl = None                  # the periodic check tries again once the interval is over
            session.next_sasl_check = self._relogin_at + RELOGIN_INTERVAL
            return
        self._relogin_at = now
        log.warning("%s: logging in as %s after registration failed (%s); reconnecting to log in while "
                    "registering", self.network, cfg.sasl_account, why)
        session.quitting = "reconnecting to log in"
        self._wake.set()

    def _check_ready(self, session: _Session) -> None:
        if session is self._session and session.registered.is_set() and not session.pending_joins:
            self._ready.set()

    async def _pump(self, session: _Session) -> None:
        try:
            await self._write_loop(session)
        except TransportError as exc:
            log.warning("%s: %s", self.network, exc)
            session.abort()
            self._wake.set()

    async def _write_loop(self, session: _Session) -> None:
        """The one writer of a connection: control lines first, then a
        confirmation marker when one is due, then messages; every line spends a
        token.  Lines that may go at once are written together, before the
        writer next waits."""
        bucket = _Bucket(self.config.pacing_rate, self.config.pacing_burst, self.clock)
        batch: list[str] = []

        def flush() -> None:
            if batch:
                session.write_lines(batch)
                batch.clear()

        while session.alive:
            outbox, unconfirmed = self._outbox, self._unconfirmed
            quitting = session.quitting is not None
            if quitting and not session.control and not unconfirmed:
                flush()                         # all confirmed: nothing can be lost or doubled by leaving
                session.relogin = True
                session.close(session.quitting or "")
                self._wake.set()
                return
            sending = bool(outbox) and not quitting
            want_marker = self._marker_due(session, bucket, sending)
            if not (session.control or sending or want_marker):
                flush()
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), ECHO_GRACE / 3 if unconfirmed else None)
                except asyncio.TimeoutError:
                    pass
                continue
            delay = bucket.delay()
            if delay > 0 or len(batch) >= MAX_BATCH:
                flush()
                await asyncio.sleep(delay)
                continue
            if session.control:
                batch.append(session.control.popleft())
            elif want_marker:
                session.marker_count += 1
                token = f"rb{session.number}.{session.marker_count}"
                session.marker = (token, unconfirmed[-1].seq)
                batch.append(f"PING :{token}")
            else:
                line = outbox[0]
                budget = session.budget(line.command, line.target)
                head, rest = split_utf8(line.text, budget)
                self._seq += 1
                sent = _Line(line.command, line.target, head, self._seq, self.clock())
                batch.append(f"{line.command} {line.target} :{head}")
                if rest:
                    line.text = rest
                else:
                    outbox.popleft()
                unconfirmed.append(sent)
            bucket.take()

    def _marker_due(self, session: _Session, bucket: "_Bucket", sending: bool) -> bool:
        """Whether to write a confirmation marker now (see MARKER_LINES)."""
        unconfirmed = self._unconfirmed
        if not unconfirmed or session.marker is not None:     # nothing to confirm, or one already on its way
            return False
        if session.quitting is not None:
            return True
        age = self.clock() - unconfirmed[0].written
        if "echo-message" in session.caps:                     # echoes confirm; a marker only for lines never echoed
            return age >= ECHO_GRACE
        spare = bucket.tokens() - len(self._outbox)            # tokens beyond what queued lines need
        return (not sending                                    # nothing else to write
                or spare >= 1                                  # a spare token: the marker delays no line
                or (len(unconfirmed) >= MARKER_LINES and spare < 0)   # pacing holds lines back anyway
                or age >= MARKER_AGE)

    async def _maintain(self, session: _Session) -> None:
        """Keepalive; regaining the configured nick; re-checking for SASL."""
        cfg = self.config
        step = max(0.05, min(cfg.ping_interval, cfg.ping_timeout, self.nick_retry, self.sasl_recheck) / 4)
        now = self.clock()
        session.next_nick_try = now + self.nick_retry * (2 / 3 + self.rng() * 2 / 3)
        session.next_sasl_check = now + self.sasl_recheck * (2 / 3 + self.rng() * 2 / 3)
        while session.alive:
            await asyncio.sleep(step)
            now = self.clock()
            silent = now - session.last_rx
            if silent >= cfg.ping_interval + cfg.ping_timeout:
                log.warning("%s: nothing from the server for %.0fs; dropping the connection",
                            self.network, silent)
                session.abort()
                self._wake.set()
                return
            if silent >= cfg.ping_interval and now - session.last_ping >= cfg.ping_interval:
                session.last_ping = now
                session.control.append(f"PING :keepalive{session.number}")
                self._wake.set()
            if not session.has_own_nick() and now >= session.next_nick_try:
                session.regain_nick()
            if (session.late_sasl in ("requested", "authenticating")
                    and now - session.late_sasl_since >= SASL_LATE_TIMEOUT):
                self._relogin(session, f"no answer in {SASL_LATE_TIMEOUT:.0f}s")
            if (session.wants_sasl() and not session.sasl_started and session.late_sasl is None
                    and session.offered and now >= session.next_sasl_check):
                session.next_sasl_check = now + self.sasl_recheck * (2 / 3 + self.rng() * 2 / 3)
                session.recheck_caps()

    # -- incoming ---------------------------------------------------------------------------------

    def _incoming(self, session: _Session, event: Any, channel: str | None) -> None:
        source = event.source
        if not isinstance(source, irc.client.NickMask) or not source.nick or not event.arguments:
            return
        if session._is_me(source.nick):      # our own line echoed back (echo-message, bouncers)
            self._echoed(session, "PRIVMSG", str(event.target), str(event.arguments[0]))
            return
        text = self._command_text(session, str(event.arguments[0]), channel is not None)
        if text is None:
            return
        account = session.account_of(source.nick, event.tags)
        identity = Identity("irc", self.network, source.nick, account=account,
                            verified_by=VERIFIED_SERVICES if account else UNVERIFIED,
                            hostmask=(f"{source.nick}!{source.user}@{source.host}"
                                      if self.config.allow_hostmask and source.user and source.host else None),
                            origin=source.host or None)
        room = Room("irc", self.network, channel) if channel is not None else None
        log.debug("%s: command %r from %s (%s) in %s", self.network, sanitise(text), identity,
                  account or "no account", room or "private")
        handler = self._handler
        if handler is None:
            return
        task = asyncio.get_running_loop().create_task(self._deliver(handler, Message(identity, text, room)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, handler: MessageHandler, message: Message) -> None:
        try:
            await handler(message)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: handling %r from %s failed", self.network, sanitise(message.text),
                          message.sender)

    def _command_text(self, session: _Session, text: str, in_channel: bool) -> str | None:
        """The command in a line, addressing stripped; None: not for the bot."""
        prefix = self.config.command_prefix
        if text.startswith(prefix):
            rest = text[len(prefix):]
            if rest and not rest[0].isspace():
                return rest.strip()
            return None
        if in_channel:
            match = re.match(r"^\s*([^\s:,]+)\s*[:,]\s*(.*)$", text)
            if match and session._is_me(match.group(1)) and match.group(2).strip():
                return match.group(2).strip()
            return None
        return text.strip() or None


def parse_config(section: "Section") -> IrcConfig | None:
    cfg, problems = _parse_entry(section.node, section.file)
    section.findings.problems += problems
    return cfg


Transport = IrcTransport
