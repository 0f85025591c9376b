"""One connection attempt: the ``irc`` library adapted to asyncio, and the
server's lines turned into calls on the parts that care (capabilities and
SASL, the roster, delivery, the transport).

``irc.client_aio`` gives the socket and line parsing; each connection gets
its own reactor (the library's SASL handlers are reactor-global).  Nothing
from the library leaves this package: library errors become
``TransportError``.
"""
from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections import deque
from typing import TYPE_CHECKING, Any

import irc.client
import irc.client_aio
from jaraco.stream import buffer as irc_buffer

from bot.chat import TransportError
from bot.logsafety import sanitise
from bot.transports.irc.caps import Negotiation
from bot.transports.irc.delivery import Dest, Pause, Writer
from bot.transports.irc.roster import WHOX_TOKEN, Roster
from bot.transports.irc.text import casefolder, text_budget

if TYPE_CHECKING:
    from bot.transports.irc.transport import IrcTransport

log = logging.getLogger(__name__)

_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)     # Linux only


class _Protocol(irc.client_aio.IrcProtocol):  # type: ignore[misc]  # the irc library has no type hints
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


class _Connection(irc.client_aio.AioConnection):  # type: ignore[misc]  # the irc library has no type hints
    protocol_class = _Protocol
    # Undecodable bytes from some client must not kill the connection
    # (the default buffer raises UnicodeDecodeError inside data_received).
    buffer_class = irc_buffer.LenientDecodingLineBuffer

    def _process_line(self, line: str) -> None:
        try:
            super()._process_line(line)
        except Exception:   # one bad line (or a bug in a handler) must not drop the connection
            log.exception("cannot handle a line from the server: %r", sanitise(line))


class _Reactor(irc.client_aio.AioReactor):  # type: ignore[misc]  # the irc library has no type hints
    connection_class = _Connection


def _args(event: Any) -> list[str]:
    return [str(a) for a in event.arguments]


class Session:
    """One connection: its own reactor, connection and IRC state."""

    def __init__(self, owner: "IrcTransport", number: int) -> None:
        self.owner = owner
        self.config = owner.config
        self.number = number
        self.reactor = _Reactor(loop=asyncio.get_running_loop())
        self.conn: _Connection = self.reactor.server()
        self.reactor.add_global_handler("all_events", self._on_event, 0)
        self.registered = asyncio.Event()
        self.lost = asyncio.Event()
        self.nick = owner.config.nick
        self.nick_tries = 0
        self.user: str | None = None
        self.host: str | None = None
        self.quitting: str | None = None              # QUIT with this once every written line is confirmed
        self.relogin = False                          # left with that QUIT, to log in while registering again
        self.isupport: dict[str, str | bool] = {}
        self.control: deque[str] = deque()            # JOIN/WHO/PING/CAP, ahead of messages
        self.marker: tuple[str, int] | None = None    # outstanding confirmation PING: (token, last seq)
        self.marker_count = 0
        self.last_rx = owner.clock()
        self.last_ping = 0.0
        self.next_nick_try = 0.0
        self.pending_joins: set[str] = set()
        self.neg = Negotiation(owner.config, self, owner, owner.clock)
        self.roster = Roster(owner.clock)
        self.roster.caps = self.neg.caps
        self.roster.fold = self.fold = owner.fold
        self.writer = Writer(owner.delivery, self, owner.config.pacing_rate, owner.config.pacing_burst,
                             owner.clock)

    # -- writing (the delivery.Link and caps.Link contracts) ----------------------------------------

    @property
    def alive(self) -> bool:
        transport = getattr(self.conn, "transport", None)
        return not self.lost.is_set() and transport is not None and not transport.is_closing()

    @property
    def caps(self) -> set[str]:
        return self.neg.caps

    @property
    def echo(self) -> bool:
        return "echo-message" in self.neg.caps

    def write(self, line: str) -> None:
        """Hand one line to the socket now (no pacing: callers pace)."""
        try:
            self.conn.send_raw(line)
        except (irc.client.IRCError, OSError, AttributeError) as exc:
            raise TransportError(f"cannot write to {self.config.name}: {exc}") from exc

    def write_secret(self, line: str) -> None:
        # Straight to the socket: the library's send_raw logs every line at DEBUG.
        self.conn.transport.write(line.encode("utf-8") + b"\r\n")

    def queue_control(self, line: str) -> None:
        self.control.append(line)
        self.owner.wake()

    def write_lines(self, lines: list[str]) -> None:
        """Hand several lines to the socket in one write: one TCP segment, so a
        server that relays them without TCP_NODELAY (ngircd) sends them on
        together instead of holding all but the first for the reader's
        delayed ACK (~40 ms per answer of more than one line)."""
        for line in lines:
            if "\r" in line or "\n" in line or "\0" in line:
                raise TransportError(f"{self.config.name}: refusing to write a line with CR, LF or NUL")
        try:
            self.conn.transport.write(b"".join(line.encode("utf-8") + b"\r\n" for line in lines))
        except (OSError, AttributeError) as exc:
            raise TransportError(f"cannot write to {self.config.name}: {exc}") from exc

    def budget(self, command: str, target: str) -> int:
        """Bytes of text that fit in one line as the server relays it, with our
        own nick!user@host in front (unknown host: assume the longest)."""
        user = self.user or "~" + (self.config.username or self.config.nick)[:10]
        return text_budget(self.nick, user, self.host, command, target)

    def verify(self, dest: Dest, answered: bool) -> str:
        return self.roster.verify(dest.name, dest.account, dest.userhost, answered=answered,
                                  more_accounts=dest.more_accounts)

    def ask(self, nick: str) -> str | None:
        return self.roster.ask(nick)

    def leave(self) -> None:
        self.relogin = True
        self.close(self.quitting or "")
        self.owner.wake()

    async def pump(self) -> None:
        """Run the writer until the connection ends."""
        try:
            while self.alive:
                pause: Pause = self.writer.step()
                if pause.stop:
                    return
                if pause.wake:
                    self.owner.clear_wake()
                    try:
                        await asyncio.wait_for(self.owner.woken(), pause.seconds)
                    except asyncio.TimeoutError:
                        pass
                else:
                    await asyncio.sleep(pause.seconds or 0.0)
        except TransportError as exc:
            log.warning("%s: %s", self.config.name, exc)
            self.abort()
            self.owner.wake()

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

    # -- our own nick, taken at connect (by someone, or by our own ghost) -----------------------------

    def is_me(self, nick: str) -> bool:
        return self.fold(nick) == self.fold(self.nick)

    def has_own_nick(self) -> bool:
        return self.fold(self.nick) == self.fold(self.config.nick)

    def _holds_our_nick(self, nick: str) -> bool:
        return not self.has_own_nick() and self.fold(nick) == self.fold(self.config.nick)

    def regain_nick(self) -> None:
        if not self.registered.is_set() or self.has_own_nick() or self.quitting is not None:
            return
        owner = self.owner
        self.next_nick_try = owner.clock() + owner.nick_retry * (2 / 3 + owner.rng() * 2 / 3)
        self.queue_control(f"NICK {self.config.nick}")

    # -- reading ------------------------------------------------------------------------------------

    def _on_event(self, conn: Any, event: Any) -> None:
        if self.lost.is_set() and event.type != "disconnect":
            return
        self.last_rx = self.owner.clock()
        handler = getattr(self, "_ev_" + event.type, None)
        if handler is not None:
            try:
                handler(event)
            except Exception:
                log.exception("%s: cannot handle %s from the server", self.config.name, event.type)

    def _ev_disconnect(self, event: Any) -> None:
        if not self.lost.is_set():
            self.lost.set()
            self.owner.wake()

    def _ev_error(self, event: Any) -> None:
        log.warning("%s: server says: %s", self.config.name,
                    sanitise(" ".join(str(a) for a in [event.target, *event.arguments] if a)))

    # capabilities and SASL (caps.Negotiation)

    def _ev_cap(self, event: Any) -> None:
        self.neg.on_cap(_args(event))

    def _ev_authenticate(self, event: Any) -> None:
        self.neg.on_authenticate(str(event.target))

    def _ev_loggedin(self, event: Any) -> None:
        self.neg.on_loggedin(_args(event))

    def _ev_saslsuccess(self, event: Any) -> None:
        self.neg.on_success()

    def _sasl_failed(self, event: Any) -> None:
        self.neg.on_failed(_args(event))

    _ev_saslfail = _ev_sasltoolong = _ev_saslaborted = _ev_nicklocked = _sasl_failed

    def _ev_saslalready(self, event: Any) -> None:
        self.neg.end_cap()

    def _late_refused(self, event: Any) -> None:
        self.neg.on_refused(event.type, str(event.target or ""), _args(event))

    _ev_alreadyregistered = _ev_unknowncommand = _ev_fail = _late_refused

    def _ev_welcome(self, event: Any) -> None:
        self.nick = str(event.target)
        self.neg.on_welcome()
        self.registered.set()

    def _ev_featurelist(self, event: Any) -> None:
        for token in _args(event)[:-1]:
            key, sep, value = token.partition("=")
            self.isupport[key.upper()] = value if sep else True
        if "CASEMAPPING" in self.isupport:
            self.fold = self.roster.fold = casefolder(str(self.isupport["CASEMAPPING"]).lower())
            self.owner.fold = self.fold
        self.roster.whox = bool(self.isupport.get("WHOX"))
        prefix = self.isupport.get("PREFIX")
        if isinstance(prefix, str) and ")" in prefix:
            self.roster.prefixes = prefix.split(")", 1)[1]

    def _bad_nick(self, event: Any) -> None:
        if self.registered.is_set():     # our own NICK to regain the configured nick: try again later
            log.debug("%s: nick %s is still taken", self.config.name, self.config.nick)
            return
        self.nick_tries += 1
        base = self.config.nick
        self.nick = (base + "_" * self.nick_tries if self.nick_tries <= 3
                     else f"{base[:20]}{random.randint(100, 99999)}")
        log.warning("%s: nick %s is not available; trying %s", self.config.name,
                    sanitise(str(event.arguments[0]) if event.arguments else base), self.nick)
        self.write(f"NICK {self.nick}")

    _ev_nicknameinuse = _ev_unavailresource = _ev_erroneusnickname = _ev_nickcollision = _bad_nick

    def _ev_pong(self, event: Any) -> None:
        token = str(event.arguments[-1]) if event.arguments else ""
        if self.marker and token == self.marker[0]:
            self.owner.delivery.confirm(self.marker[1])
            self.marker = None
            self.owner.wake()

    # who is where, logged in as what (roster.Roster); delivery follows people and channels

    def _tracking(self) -> bool:
        """Whether to ask WHO on joins: logins are announced (account-notify),
        so what WHOX says now stays true."""
        return self.roster.tracks_accounts() and self.roster.whox

    def _ev_join(self, event: Any) -> None:
        source = event.source
        channel = str(event.target)
        if self.is_me(source.nick):
            self.user, self.host = source.user, source.host
            self.roster.joined_channel(channel)
            log.info("%s: joined %s", self.config.name, sanitise(channel))
            if self._tracking():
                # Ready only once we know who is logged in there (at the end of WHO).
                self.queue_control(self.roster.who_channel(channel))
            else:
                self.pending_joins.discard(self.fold(channel))
                self.owner.check_ready(self)
                # who is there, with user@host (NAMES gives nicks only): what a hostmask
                # identity is matched against when a message is meant for that person
                self.queue_control(self.roster.who_channel(channel) if self.roster.whox else f"WHO {channel}")
            return
        userhost = f"{source.user}@{source.host}" if source.user and source.host else None
        if "extended-join" in self.caps and event.arguments:
            account = str(event.arguments[0])
            self.roster.joined_by(source.nick, userhost, channel, None if account == "*" else account, True)
        else:
            self.roster.joined_by(source.nick, userhost, channel)
            if self._tracking():
                self.queue_control(f"WHO {source.nick} %tcuhna,{WHOX_TOKEN}")

    def _ev_namreply(self, event: Any) -> None:
        args = _args(event)
        if len(args) >= 3:
            self.roster.names(args[1], args[2].split())

    def _ev_whospcrpl(self, event: Any) -> None:
        args = _args(event)
        if len(args) != 6 or args[0] != WHOX_TOKEN:
            return
        _, channel, user, host, nick, account = args
        if not self.is_me(nick):
            self.roster.who_reply(channel, nick, f"{user}@{host}", None if account == "0" else account, True)

    def _ev_whoreply(self, event: Any) -> None:
        args = _args(event)       # channel user host server nick flags :hops realname
        if len(args) >= 5 and not self.is_me(args[4]):
            self.roster.who_reply(args[0], args[4], f"{args[1]}@{args[2]}")

    def _ev_endofwho(self, event: Any) -> None:
        if not event.arguments:
            return
        mask = str(event.arguments[0])
        if self.roster.who_end(mask):
            self.writer.checked(self.fold(mask))
            self.owner.wake()
        elif self.fold(mask) in self.pending_joins:
            self.pending_joins.discard(self.fold(mask))
            self.owner.check_ready(self)

    def _ev_account(self, event: Any) -> None:
        account = str(event.target)
        self.roster.account_changed(event.source.nick, None if account == "*" else account)

    def _ev_nick(self, event: Any) -> None:
        old, new = event.source.nick, str(event.target)
        if self.is_me(old):
            self.nick = new
            if self.has_own_nick():
                log.info("%s: regained the nick %s", self.config.name, sanitise(new))
            return
        if self._holds_our_nick(old):
            self.regain_nick()
        self.roster.renamed(old, new)
        self.owner.delivery.person_renamed(self.fold(old), self.fold(new), new)

    def _ev_quit(self, event: Any) -> None:
        nick = event.source.nick
        self.roster.quit(nick)
        self.owner.delivery.person_gone(self.fold(nick), "they quit")
        if self._holds_our_nick(nick):
            self.regain_nick()

    def _left(self, nick: str, channel: str, why: str) -> None:
        if self.is_me(nick):
            self.roster.left_channel(channel)
            self.owner.delivery.channel_left(self.fold(channel), why)
            log.warning("%s: no longer in %s", self.config.name, sanitise(channel))
            return
        self.roster.left(nick, channel)

    def _ev_part(self, event: Any) -> None:
        self._left(event.source.nick, str(event.target), "the bot left the channel")

    def _ev_kick(self, event: Any) -> None:
        if event.arguments:
            self._left(str(event.arguments[0]), str(event.target), "the bot was kicked from the channel")

    def _join_failed(self, event: Any) -> None:
        channel = str(event.arguments[0]) if event.arguments else "?"
        log.error("%s: cannot join %s: %s", self.config.name, sanitise(channel),
                  sanitise(" ".join(map(str, event.arguments[1:]))))
        self.pending_joins.discard(self.fold(channel))
        self.owner.check_ready(self)

    _ev_channelisfull = _ev_inviteonlychan = _ev_bannedfromchan = _ev_badchannelkey = _join_failed
    _ev_toomanychannels = _join_failed

    def _join_or_send_failed(self, event: Any) -> None:
        """403 (no such channel) and 477 (a registered nick needed) answer a JOIN
        or a message: ours for a channel we are joining are about the JOIN."""
        channel = str(event.arguments[0]) if event.arguments else ""
        if self.fold(channel) in self.pending_joins:
            self._join_failed(event)
        else:
            self._not_delivered(event)

    _ev_nosuchchannel = _ev_nochanmodes = _join_or_send_failed

    def _not_delivered(self, event: Any) -> None:
        # The server processed the line and refused it: it is not sent again, and
        # its message fails (delivery counts the refusal at the next confirmation).
        target = str(event.arguments[0]) if event.arguments else "?"
        text = " ".join(map(str, event.arguments[1:])) or event.type
        log.warning("%s: the server did not deliver a line to %s: %s", self.config.name, sanitise(target),
                    sanitise(text))
        self.owner.delivery.refused(target, text, self.fold)

    # 401 no such nick/channel, 402 no such server, 404 cannot send to channel, 407 too many
    # targets; 486 (+R: only registered users may message them), 531 (cannot send to user),
    # 716 (+g: server-side ignore) have no name in the irc library.
    _ev_nosuchnick = _ev_nosuchserver = _ev_cannotsendtochan = _ev_toomanytargets = _not_delivered
    _ev_486 = _ev_531 = _ev_716 = _not_delivered

    def account_of(self, nick: str, tags: list[dict[str, Any]] | None) -> str | None:
        """The services account vouched for by the server, or None."""
        if "account-tag" in self.caps:
            for tag in tags or ():
                if tag.get("key") == "account" and tag.get("value"):
                    return str(tag["value"])
            return None
        return self.roster.account_of(nick)

    # messages

    def _ev_pubmsg(self, event: Any) -> None:
        self.owner.incoming(self, event, str(event.target))

    def _ev_pubnotice(self, event: Any) -> None:    # notices are never commands: only our echoes count
        if event.arguments and self.is_me(getattr(event.source, "nick", "") or ""):
            self.owner.delivery.echoed("NOTICE", str(event.target), str(event.arguments[0]), self.fold)

    _ev_privnotice = _ev_pubnotice

    def _ev_privmsg(self, event: Any) -> None:
        target = str(event.target)
        statusmsg = self.isupport.get("STATUSMSG")
        chantypes = self.isupport.get("CHANTYPES")
        chantypes = chantypes if isinstance(chantypes, str) and chantypes else "#&+!"
        if (isinstance(statusmsg, str) and len(target) > 1 and target[0] in statusmsg
                and target[1] in chantypes):
            # "@#ops": to the channel's ops only, and so is the answer (the room is "@#ops")
            self.owner.incoming(self, event, target)
        else:
            self.owner.incoming(self, event, None)
