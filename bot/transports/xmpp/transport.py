"""The XMPP front-end: direct messages and XEP-0045 multi-user chat rooms.

Who sent a message is what the server stamps on it: in a direct message the
sender's bare JID (``VERIFIED_JID``).  In a room only the occupant's real JID
counts, and only when the room shows it to the bot (rooms the bot created,
where it is owner and so moderator, or non-anonymous rooms); otherwise the
sender is a bare nickname, ``account=None``, and the ``Room`` says it hides
identities, so the dispatcher refuses privileged commands and says why.
What a room shows is re-learned whenever its owner changes who may see real
JIDs (XEP-0045 status 172/173/174, or 104 and a disco#info check): JIDs
learned before the change are forgotten, never carried over.  Private output
for an occupant identified that way goes to their real JID, not to their
nickname in the room, which someone else may hold by then.

slixmpp is imported only in this package; its exceptions become ``TransportError``.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import random
import re
import ssl
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bot.chat import (UNVERIFIED, VERIFIED_JID, Identity, Message, MessageHandler, Room, Target,
                      TransportError)
from bot.logsafety import sanitise
from bot.pacing import TokenBucket
from bot.transports.xmpp.config import XmppConfig

log = logging.getLogger(__name__)

PROTOCOL = "xmpp"
# XEP-0045 status codes that say a room's configuration changed.
NOW_NON_ANONYMOUS, NOW_SEMI_ANONYMOUS, NOW_FULLY_ANONYMOUS, CONFIG_CHANGED = 172, 173, 174, 104
ROOM_CONFIG_CODES = frozenset({NOW_NON_ANONYMOUS, NOW_SEMI_ANONYMOUS, NOW_FULLY_ANONYMOUS, CONFIG_CHANGED})


def split_text(text: str, limit: int) -> list[str]:
    """Messages of at most ``limit`` characters carrying ``text``'s lines:
    consecutive lines share a message while they fit, and a message breaks
    only between lines; a single line longer than ``limit`` is cut at its last
    space within the limit (that one space becomes the break) or, failing
    that, hard at the limit.  Nothing is dropped but empty lines."""
    pieces: list[str] = []
    for line in text.splitlines():
        while len(line) > limit:
            space = line.rfind(" ", 1, limit + 1)
            if space > 0:
                pieces.append(line[:space])
                line = line[space + 1:]
            else:
                pieces.append(line[:limit])
                line = line[limit:]
        if line:
            pieces.append(line)
    out: list[str] = []
    for piece in pieces:
        if out and len(out[-1]) + 1 + len(piece) <= limit:
            out[-1] += "\n" + piece
        else:
            out.append(piece)
    return out


@dataclass
class _Review:
    """A room whose configuration changed, being re-read; its commands wait for ``done``."""

    done: asyncio.Event = field(default_factory=asyncio.Event)
    disco: bool = False         # a 104: ask the room whether who sees real JIDs changed
    resync: bool = False        # re-read the occupant list


@dataclass
class _Line:
    """One outbound chat message, with the stanza currently carrying it."""

    to: str
    mtype: str          # "chat" | "groupchat"
    body: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    stanza: Any = None


class XmppTransport:
    """One XMPP account: direct messages plus the configured rooms.

    Outbound delivery guarantee (what "delivered once" means here):

    * ``send`` only queues.  A line leaves the queue only while a session is
      up and every configured room has been (re)joined, in queue order,
      paced by a token bucket.
    * With XEP-0198 stream management (Prosody 0.12 ``smacks``), a line
      counts as delivered only when the server acknowledges it.  If the
      stream is resumed, slixmpp resends the unacknowledged stanzas; if a
      new session has to be started (server restarted), the unacknowledged
      lines go back to the head of the queue, in order.  Lines queued while
      disconnected are therefore delivered exactly once, in order, after the
      reconnect; a line whose acknowledgement was lost on the wire (the
      server got it, the ack did not reach us) may be delivered twice.
    * Without stream management, a line counts as delivered once it is
      written to a live session's socket: lines queued while disconnected
      are still delivered exactly once, in order, but a line written just
      before the connection died may be lost (at most once).
    * The queue holds at most ``max_queued`` lines; beyond that the oldest
      is dropped with an ERROR log line (a bot offline for very long).
    """

    protocol = PROTOCOL

    def __init__(self, config: XmppConfig, *, max_queued: int = 10_000,
                 rng: Callable[[], float] = random.random) -> None:
        self.config = config
        self.network = config.name
        self.online = asyncio.Event()       # session up and rooms (re)joined
        self.connections = 0                # sessions started (not resumed) so far
        self._max_queued = max_queued
        self._rng = rng
        self._bucket = TokenBucket(config.rate, config.burst)
        self._pending: collections.deque[_Line] = collections.deque()
        self._inflight: dict[str, _Line] = {}      # handed to slixmpp, not yet delivered
        self._sent_ids: collections.deque[str] = collections.deque(maxlen=500)
        self._sent_set: set[str] = set()
        self._nicks: dict[str, str] = {}    # room JID -> our nick in it
        # room JID -> occupant nick -> real bare JID, as the room currently shows it to us;
        # fed only by presences, emptied when the room stops showing real JIDs
        self._real_jids: dict[str, dict[str, str]] = {}
        self._departures: dict[tuple[str, str], int] = {}     # (room, nick) -> times that nick left
        self._non_anonymous: dict[str, bool] = {}   # what the room last said about itself
        self._reviews: dict[str, _Review] = {}     # rooms whose configuration changed: being re-read
        self._wakeup = asyncio.Event()
        self._lost = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._client: Any = None
        self._on_message: MessageHandler | None = None
        self._first: asyncio.Future[str] | None = None
        self._auth_error: str | None = None   # credentials or certificate refused: retrying will not help
        self._last_error = ""
        self._requeued: set[str] = set()    # ids of lines queued again after a dead session
        self._session = asyncio.Event()     # authenticated and bound (rooms perhaps not yet)
        self._ack_timer: asyncio.Handle | None = None
        self._ack_answer: asyncio.Handle | None = None
        self._generation = 0                # bumped by every session start and disconnect
        self._closing = False

    @property
    def undelivered(self) -> int:
        """Lines queued or sent but not yet acknowledged by the server."""
        return len(self._pending) + len(self._inflight)

    # --- the Transport contract --------------------------------------------

    async def start(self, on_message: MessageHandler) -> None:
        """Connect and keep reconnecting in the background.  Returns once the
        first session is up (rooms joined), or after the first failed attempt
        (the bot keeps trying); raises TransportError if the server refused
        the credentials, its certificate is not trusted, or the TLS policy
        cannot be met (retrying is pointless)."""
        if self._client is not None:
            raise TransportError(f"xmpp {self.network}: already started")
        password = self.config.password
        if password is None:
            raise TransportError(f"xmpp {self.network}: no password (the variable password_env names is not set)")
        self._on_message = on_message
        self._client = self._make_client(password)
        loop = asyncio.get_running_loop()
        self._first = loop.create_future()
        self._spawn(self._pump(), "pump")
        supervisor = self._spawn(self._supervise(), "supervisor")
        try:
            outcome = await asyncio.wait_for(asyncio.shield(self._first), self.config.connect_timeout)
        except asyncio.TimeoutError:
            log.warning("xmpp %s: no session after %.0fs; still trying in the background",
                        self.network, self.config.connect_timeout)
            return
        except TransportError:
            supervisor.cancel()
            await self.close()
            raise
        if outcome != "online":
            log.warning("xmpp %s: cannot connect yet (%s); retrying in the background", self.network, outcome)

    async def send(self, target: Target, text: str) -> None:
        """Queue ``text`` for ``target``: one message per line, paced, never
        truncated (an overlong line is split), delivered as described above."""
        if self._closing:
            raise TransportError(f"xmpp {self.network}: closed")
        if target.protocol != PROTOCOL or target.network != self.network:
            raise TransportError(f"xmpp {self.network}: cannot send to {target}")
        if isinstance(target, Room):
            to, mtype = target.name, "groupchat"
        else:
            to, mtype = self._private_address(target), "chat"
        for chunk in split_text(text, self.config.max_line_chars):
            if len(self._pending) >= self._max_queued:
                dropped = self._pending.popleft()
                log.error("xmpp %s: send queue full (%d lines); dropped the oldest line to %s",
                          self.network, self._max_queued, dropped.to)
            self._pending.append(_Line(to, mtype, chunk))
        self._wakeup.set()

    def _private_address(self, ident: Identity) -> str:
        """Where private output for ``ident`` goes.  A room occupant whose real
        JID the room showed us gets a direct message to that JID: ``room/nick``
        is only a nickname, which someone else may hold by the time the line is
        delivered (queued across a reconnect, or after they left); private
        release output must reach the person who asked.  An occupant we could
        not identify keeps the room-private route, the only one there is."""
        room = ident.handle.split("/", 1)[0]
        if ident.account and ident.verified_by == VERIFIED_JID and "/" in ident.handle and room in self._nicks:
            return ident.account
        return ident.handle

    async def close(self, flush_timeout: float = 2.0) -> None:
        """Flush what can be flushed (while connected), say goodbye, disconnect."""
        if self._closing and self._client is None:
            return
        deadline = time.monotonic() + flush_timeout
        while (self._pending or self._inflight) and self.online.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._closing = True
        left = len(self._pending) + len(self._inflight)
        if left:
            log.warning("xmpp %s: closing with %d undelivered line(s)", self.network, left)
        for handle in (self._ack_timer, self._ack_answer):
            if handle is not None:
                handle.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        client, self._client = self._client, None
        if client is not None and client.transport is not None:
            try:
                client.send_presence(ptype="unavailable")
                await asyncio.wait_for(client.disconnect(wait=1.0), 2.0)
            except Exception as exc:  # closing anyway; the library's reason is only logged
                log.debug("xmpp %s: disconnect: %r", self.network, exc)
                client.abort()
        if client is not None:
            client.cancel_connection_attempt()
        self.online.clear()
        log.info("xmpp %s: closed", self.network)

    # --- connection management ---------------------------------------------

    def _make_client(self, password: str) -> Any:
        import slixmpp

        cfg = self.config
        plaintext = cfg.tls == "plaintext"
        # Unencrypted SASL only when plaintext was asked for: with TLS
        # required, a server without TLS never sees the password.
        mechanisms = {"unencrypted_scram": plaintext, "unencrypted_plain": plaintext}
        resource = f"releasebot-{uuid.uuid4().hex[:6]}"
        client = slixmpp.ClientXMPP(f"{cfg.jid}/{resource}", password,
                                    plugin_config={"feature_mechanisms": mechanisms})
        client.enable_direct_tls = cfg.tls == "direct"
        client.enable_starttls = cfg.tls == "starttls"
        client.enable_plaintext = plaintext
        if cfg.ca_file:
            client.ca_certs = Path(cfg.ca_file)
        client.register_plugin("xep_0030")
        client.register_plugin("xep_0045")
        client.register_plugin("xep_0199")     # answers the server's pings; we ping ourselves
        # slixmpp's own ack requests go out *before* the stanza they count
        # (so the last line would stay unacknowledged); we ask after writing.
        client.register_plugin("xep_0198", pconfig={"window": 2 ** 31})
        client.add_filter("out_sync", self._outgoing)   # after xep_0198's own out_sync filter
        client.add_event_handler("session_start", self._session_start)
        client.add_event_handler("session_resumed", self._session_resumed)
        client.add_event_handler("session_end", self._session_end)
        client.add_event_handler("disconnected", self._disconnected)
        client.add_event_handler("failed_all_auth", self._failed_auth)
        client.add_event_handler("connection_failed", self._connection_failed)
        client.add_event_handler("ssl_invalid_chain", self._tls_failed)    # STARTTLS handshake refused
        client.add_event_handler("sm_enabled", lambda _: log.debug("xmpp %s: stream management on",
                                                                   self.network))
        client.add_event_handler("stanza_acked", self._acked)
        client.add_event_handler("message", self._message)
        client.add_event_handler("groupchat_presence", self._room_presence)
        client.add_event_handler("groupchat_config_status", self._room_config_status)
        client.add_event_handler("message_error", self._message_error)
        return client

    def _address(self) -> tuple[str | None, int | None]:
        cfg = self.config
        if cfg.host is None and cfg.port is None:
            return None, None
        host = cfg.host or cfg.jid.split("@", 1)[1]
        return host, cfg.port or (5223 if cfg.tls == "direct" else 5222)

    def _backoff(self, failures: int) -> float:
        cfg = self.config
        base: float = min(cfg.reconnect_max, cfg.reconnect_min * 2 ** min(failures, 30))
        return base / 2 + base / 2 * self._rng()      # "equal jitter": never 0, never in lockstep

    def _settle_first(self, outcome: str | BaseException) -> None:
        if self._first is not None and not self._first.done():
            if isinstance(outcome, BaseException):
                self._first.set_exception(outcome)
            else:
                self._first.set_result(outcome)

    async def _supervise(self) -> None:
        failures = 0
        while not self._closing:
            try:
                failures = await self._attempt(failures)
            except asyncio.CancelledError:
                raise
            except Exception:   # a bug here must not end reconnecting for good
                log.exception("xmpp %s: connection attempt failed unexpectedly", self.network)
                self._client.abort()
                failures = await self._back_off(failures, "unexpected error")
            if failures < 0:
                return

    async def _back_off(self, failures: int, reason: str) -> int:
        delay = self._backoff(failures)
        log.warning("xmpp %s: %s; reconnecting in %.1fs", self.network, reason, delay)
        await asyncio.sleep(delay)
        return failures + 1

    async def _attempt(self, failures: int) -> int:
        """One connection, from connecting until it is lost; returns the new
        failure count (-1: give up, start() reports why)."""
        client = self._client
        host, port = self._address()
        self._lost.clear()
        self._auth_error = None
        self._last_error = ""
        try:
            # a black-holed address would otherwise hang in connect() for minutes
            result = await asyncio.wait_for(asyncio.shield(client.connect(host, port)),
                                            self.config.connect_timeout)
        except asyncio.TimeoutError:
            result, self._last_error = "timeout", "timed out"
        if result is not None or not client.is_connected():
            client.cancel_connection_attempt()     # we back off ourselves, with jitter
            reason = (f"cannot connect to {host or client.boundjid.host}:{port or 'default port'}"
                      + (f" ({self._last_error})" if self._last_error else ""))
        else:
            if await self._connected_period():
                failures = 0                       # a session worked: start over at the minimum
            reason = "connection lost"
        self.online.clear()
        if self._auth_error:
            error = TransportError(f"xmpp {self.network}: {self._auth_error}")
            if self._first is not None and not self._first.done():
                self._settle_first(error)
                return -1
            log.error("%s", error)
            failures = max(failures, 30)           # keep trying, slowly: a password may be fixed
        else:
            self._settle_first(reason)
        return await self._back_off(failures, reason)

    async def _connected_period(self) -> bool:
        """From TCP connect until the connection is lost: wait for the
        session (authenticated and bound), then keep it alive with pings.
        Returns whether a session was established."""
        self._session.clear()
        session = asyncio.ensure_future(self._session.wait())
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            await asyncio.wait({session, lost}, timeout=self.config.connect_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            session.cancel()
            lost.cancel()
        had_session = self._session.is_set()
        if not had_session and not self._lost.is_set():
            log.warning("xmpp %s: no session %.0fs after connecting; dropping the connection",
                        self.network, self.config.connect_timeout)
            self._client.abort()
        while not self._lost.is_set():
            try:
                await asyncio.wait_for(self._lost.wait(), self.config.keepalive or None)
            except asyncio.TimeoutError:
                await self._ping()
        return had_session

    async def _ping(self) -> None:
        from slixmpp.exceptions import IqError, IqTimeout

        try:
            await self._client.plugin["xep_0199"].ping(timeout=min(30.0, self.config.keepalive))
        except IqTimeout:
            log.warning("xmpp %s: no answer to a keepalive ping; dropping the connection", self.network)
            self._client.abort()
        except IqError:
            pass            # an error reply is still a reply: the server is there
        except Exception as exc:  # e.g. the session died meanwhile: the supervisor sees it
            log.debug("xmpp %s: keepalive ping: %r", self.network, exc)

    # --- slixmpp events ------------------------------------------------------

    async def _session_start(self, _event: Any) -> None:
        client = self._client
        self.connections += 1
        encrypted = client.transport is not None and client.transport.get_extra_info("ssl_object") is not None
        log.info("xmpp %s: session started as %s (TLS: %s)", self.network, client.boundjid,
                 "yes" if encrypted else "NO")
        self._generation += 1
        generation = self._generation
        self._session.set()
        client.send_presence()
        for room in self.config.rooms:
            await self._join(room)
        # a session that died while we were joining must not mark its successor online
        if generation == self._generation and client.is_connected() and not self._lost.is_set():
            self._set_online()

    def _session_resumed(self, _event: Any) -> None:
        # Rooms stay joined on the server across a resumed stream.  Lines
        # handed to slixmpp that never reached the socket (they are not in
        # the plugin's unacked queue) are queued again, at the head.
        unacked = {id(s) for _, s in self._client.plugin["xep_0198"].unacked_queue}
        lost = [line for line in self._inflight.values() if id(line.stanza) not in unacked]
        self._requeue(lost)
        self._session.set()
        log.info("xmpp %s: stream resumed", self.network)
        self._set_online()

    def _session_end(self, _event: Any) -> None:
        # A new session is needed: nothing unacknowledged will be resent by
        # the library, so it goes back to the head of our queue, in order.
        self.online.clear()
        if self._closing:
            return
        self._requeue(list(self._inflight.values()))

    def _disconnected(self, reason: Any) -> None:
        self._generation += 1
        self.online.clear()
        self._lost.set()
        if not self._closing:
            log.info("xmpp %s: disconnected (%s)", self.network, sanitise(str(reason or "connection closed")))

    def _connection_failed(self, error: Any) -> None:
        if isinstance(error, ssl.SSLCertVerificationError):    # direct TLS (XEP-0368)
            self._auth_error = self._tls_problem(error)
        self._last_error = sanitise(str(error), 120)

    def _tls_failed(self, error: Any) -> None:
        # Handling this event stops slixmpp's own bare "Invalid certificate trust chain" disconnect.
        self._auth_error = self._tls_problem(error)
        client = self._client
        if client is not None and client.transport is not None:
            client.abort()

    def _tls_problem(self, error: Any) -> str:
        domain = self.config.jid.split("@", 1)[1]
        if isinstance(error, ssl.SSLCertVerificationError):
            why = error.verify_message or error.reason or str(error)
            checked = (f"checked against ca_file {self.config.ca_file}" if self.config.ca_file else
                       "checked against the system's CAs: set ca_file to the CA that signed it")
            return f"TLS: refused the certificate of {domain} ({sanitise(str(why), 200)}); {checked}"
        return f"TLS with {domain} failed: {sanitise(str(error), 200)}"

    def _failed_auth(self, _event: Any) -> None:
        client = self._client
        if client.transport is not None and client.transport.get_extra_info("ssl_object") is None \
                and self.config.tls != "plaintext":
            self._auth_error = (f"the server offered no TLS for {self.config.jid}; refusing to send the "
                                "password unencrypted (set tls: plaintext only for a loopback test server)")
        else:
            self._auth_error = f"authentication as {self.config.jid} failed"

    def _set_online(self) -> None:
        queued = len(self._pending)
        self.online.set()
        self._wakeup.set()
        self._settle_first("online")
        if queued:
            log.info("xmpp %s: online; delivering %d queued line(s)", self.network, queued)

    async def _join(self, room: str) -> None:
        from slixmpp.exceptions import PresenceError
        from slixmpp.jid import JID

        muc = self._client.plugin["xep_0045"]
        nick = self.config.room_nick
        bare = JID(room).bare
        for _ in range(3):
            self._real_jids[bare] = {}      # a new session: learn the occupants afresh
            try:
                pres, _subject, _occupants, _history = await muc.join_muc_wait(
                    JID(room), nick, maxstanzas=0, timeout=self.config.join_timeout)
            except PresenceError as exc:
                if exc.condition == "conflict":
                    nick += "_"
                    continue
                log.warning("xmpp %s: cannot join %s: %s", self.network, room, exc.condition)
                self._real_jids.pop(bare, None)
                return
            except asyncio.TimeoutError:
                log.warning("xmpp %s: no answer joining %s after %.0fs", self.network, room,
                            self.config.join_timeout)
                self._real_jids.pop(bare, None)
                return
            self._nicks[bare] = pres["from"].resource
            # 100 on entering: "any occupant may see your real JID" (a non-anonymous room)
            self._non_anonymous[bare] = 100 in pres["muc"]["status_codes"]
            created = 201 in pres["muc"]["status_codes"]
            if created:
                await self._configure_new_room(room)
            log.info("xmpp %s: joined %s as %s%s", self.network, room, pres["from"].resource,
                     " (created it: I own it and see real JIDs)" if created else "")
            return
        log.warning("xmpp %s: cannot join %s: nickname %s and variants are taken",
                    self.network, room, self.config.room_nick)
        self._real_jids.pop(bare, None)

    async def _configure_new_room(self, room: str) -> None:
        """Accept the default configuration ("instant room"): on servers that
        lock new rooms until configured, this unlocks it for everyone else."""
        from slixmpp.exceptions import IqError, IqTimeout

        client = self._client
        form = client.plugin["xep_0004"].make_form(ftype="submit")
        try:
            await client.plugin["xep_0045"].set_room_config(room, form, timeout=self.config.join_timeout)
        except (IqError, IqTimeout) as exc:
            log.warning("xmpp %s: could not configure the new room %s: %s", self.network, room,
                        getattr(exc, "condition", "timeout"))

    # --- outbound --------------------------------------------------------------

    async def _pump(self) -> None:
        while True:
            if not (self.online.is_set() and self._pending):
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            delay = self._bucket.delay()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            line = self._pending.popleft()
            self._requeued.discard(line.id)
            self._bucket.take()
            try:
                msg = self._client.make_message(mto=line.to, mbody=line.body, mtype=line.mtype)
            except Exception:   # e.g. an invalid JID in a target: drop that line, not the pump
                log.exception("xmpp %s: cannot send to %s", self.network, sanitise(line.to))
                continue
            msg["id"] = line.id
            line.stanza = msg
            self._inflight[line.id] = line
            if line.mtype == "groupchat":
                self._remember_sent(line.id)
            self._client.send(msg)
            log.debug("xmpp %s: -> %s: %s", self.network, line.to, sanitise(line.body))

    def _outgoing(self, stanza: Any) -> Any:
        """Runs just before slixmpp writes a stanza (after xep_0198 counted it)."""
        line = self._inflight.get(stanza["id"]) if stanza.name == "message" else None
        if line is None:
            if stanza.name == "message" and stanza["id"] in self._requeued:
                return None     # a copy from a dead session: the line is queued again
            return stanza
        if line.stanza is not stanza:
            return None
        if self._client.transport is None:
            return None         # the session died: the line stays in flight and is requeued
        if not self._client.plugin["xep_0198"].enabled_out:
            del self._inflight[line.id]      # no acks on this stream: written counts as delivered
        else:
            self._schedule_ack_request()
        return stanza

    def _schedule_ack_request(self) -> None:
        """Ask the server to acknowledge what we wrote, once per batch: the
        call runs after this pass of slixmpp's send loop has written it."""
        if self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_soon(self._request_ack)

    def _request_ack(self) -> None:
        self._ack_timer = None
        client = self._client
        if client is not None and client.transport is not None and client.plugin["xep_0198"].enabled_out:
            client.plugin["xep_0198"].request_ack()

    def _acked(self, stanza: Any) -> None:
        line = self._inflight.get(stanza["id"])
        if line is not None and line.stanza is stanza:
            del self._inflight[line.id]
        if self._ack_answer is None:
            self._ack_answer = asyncio.get_running_loop().call_soon(self._answer_ack)

    def _answer_ack(self) -> None:
        """Answer the server's ack with one byte of whitespace (allowed between
        stanzas).  Otherwise the ack is data nobody answers: our kernel delays
        its TCP ACK by ~40 ms and the server's Nagle holds its next stanza to us
        (the next command) until then, adding ~40 ms to every round trip."""
        self._ack_answer = None
        client = self._client
        if client is not None and client.transport is not None:
            client.send_raw(" ")

    def _requeue(self, lines: list[_Line]) -> None:
        if not lines:
            return
        for line in lines:
            self._inflight.pop(line.id, None)
            self._requeued.add(line.id)
            line.stanza = None
        self._pending.extendleft(reversed(lines))
        log.info("xmpp %s: %d unacknowledged line(s) queued again", self.network, len(lines))
        self._wakeup.set()

    def _remember_sent(self, msg_id: str) -> None:
        if len(self._sent_ids) == self._sent_ids.maxlen:
            self._sent_set.discard(self._sent_ids[0])
        self._sent_ids.append(msg_id)
        self._sent_set.add(msg_id)

    # --- inbound ---------------------------------------------------------------

    def _message(self, msg: Any) -> None:
        mtype = msg["type"]
        body = msg["body"]
        if not body or not body.strip():
            return                      # chat states, receipts, subjects
        if mtype == "groupchat":
            self._room_message(msg, body)
        elif mtype in ("chat", "normal"):
            self._direct_message(msg, body)

    def _direct_message(self, msg: Any, body: str) -> None:
        sender = msg["from"]
        bare = sender.bare
        if not sender.user or not sender.resource or bare == self.config.jid:
            return                      # a service or room (invites), or another session of ours
        room = bare if bare in self._nicks else None
        if room is not None:
            # A private message through a room: only the room's view of the sender counts.
            nick = sender.resource
            if not nick or nick == self._nicks.get(room) or self._held(room, self._direct_message, msg, body):
                return
            ident = self._occupant(room, nick)
        else:
            ident = Identity(PROTOCOL, self.network, str(sender), account=bare, verified_by=VERIFIED_JID)
        text = body.strip()
        if text.startswith(self.config.command_prefix):
            text = text[len(self.config.command_prefix):].strip()
        if not text:
            return
        if msg.get_plugin("delay", check=True) is not None:
            # Stored while we were offline: running it late could surprise its sender.
            log.info("xmpp %s: not running %r from %s, sent while I was offline", self.network,
                     sanitise(text), ident)
            self._reply_later(ident, f"I was offline when you sent {sanitise(text, 60)!r}; "
                                     "not run: send it again if you still want it")
            return
        self._dispatch(Message(ident, text))

    def _room_message(self, msg: Any, body: str) -> None:
        sender = msg["from"]
        room, nick = sender.bare, sender.resource
        if room not in self._nicks or not nick:
            return                      # not our room, or the room itself speaking
        ours = self._nicks[room]
        if nick == ours or msg["id"] in self._sent_set:
            return                      # the room reflecting our own message: never answer it
        if msg.get_plugin("delay", check=True) is not None:
            return                      # history replayed on join
        text = self._addressed(body, ours)
        if text is None or self._held(room, self._room_message, msg, body):
            return
        ident = self._occupant(room, nick)
        where = Room(PROTOCOL, self.network, room, exposes_identities=ident.account is not None)
        self._dispatch(Message(ident, text, where))

    def _addressed(self, body: str, nick: str) -> str | None:
        """The command in a room message, or None if it is not one."""
        text = body.strip()
        prefix = self.config.command_prefix
        if text.startswith(prefix):
            text = text[len(prefix):].strip()
            return text or None
        match = re.match(rf"{re.escape(nick)}\s*[:,]\s*(.+)$", text, re.IGNORECASE | re.DOTALL)
        if match:
            return match.group(1).strip() or None
        return None

    def _occupant(self, room: str, nick: str) -> Identity:
        """A room occupant: their real bare JID only if the room shows it to us now."""
        account = self._real_jids.get(room, {}).get(nick)
        return Identity(PROTOCOL, self.network, f"{room}/{nick}", account=account,
                        verified_by=VERIFIED_JID if account else UNVERIFIED)

    # --- what a room shows us: occupants' real JIDs and configuration changes ----

    def _room_presence(self, pres: Any) -> None:
        """Every occupant presence replaces what we knew of that nick: its real
        JID if the room shows it to us (non-anonymous, or we are a moderator),
        else nothing.  A nick someone else takes therefore never inherits it."""
        room, nick = pres["from"].bare, pres["from"].resource
        occupants = self._real_jids.get(room)
        if occupants is None or not nick or pres["type"] == "error":
            return
        real = pres["muc"]["jid"]
        if pres["type"] == "unavailable" and room in self._reviews:     # only held commands ask
            self._departures[(room, nick)] = self._departures.get((room, nick), 0) + 1
        if pres["type"] == "unavailable" or not real or not real.bare:
            occupants.pop(nick, None)
        else:
            occupants[nick] = real.bare
        codes = set(pres["muc"]["status_codes"]) & ROOM_CONFIG_CODES
        if codes:
            self._room_config_changed(room, codes)

    def _room_config_status(self, msg: Any) -> None:
        """A status message from the room itself, e.g. 173 after its owner hid real JIDs."""
        room = msg["from"].bare
        if msg["from"].resource or room not in self._real_jids:
            return
        codes = set(msg["muc"]["status_codes"]) & ROOM_CONFIG_CODES
        if codes:
            self._room_config_changed(room, codes)

    def _room_config_changed(self, room: str, codes: set[int]) -> None:
        """The owner changed the room's configuration.  Runs as the stanza is
        handled, so a command right behind a 173 is already judged by it;
        commands arriving until the room is re-read are held (``_held``)."""
        review = self._reviews.get(room)
        new = review is None
        if review is None:
            review = self._reviews[room] = _Review()
        if codes & {NOW_SEMI_ANONYMOUS, NOW_FULLY_ANONYMOUS}:
            code = NOW_FULLY_ANONYMOUS if NOW_FULLY_ANONYMOUS in codes else NOW_SEMI_ANONYMOUS
            self._non_anonymous[room] = False
            self._stop_trusting(room, f"is now {'fully' if code == NOW_FULLY_ANONYMOUS else 'semi'}-anonymous "
                                      f"(status {code})")
            review.resync = True                # as a moderator or owner we may still see real JIDs
        elif NOW_NON_ANONYMOUS in codes:
            self._non_anonymous[room] = True
            log.info("xmpp %s: %s is now non-anonymous (status 172); re-reading its occupants",
                     self.network, room)
            review.resync = True
        else:                                   # 104: something changed, perhaps who sees real JIDs
            review.disco = True
        if new:
            self._spawn(self._review_room(room, review), "room review")

    async def _review_room(self, room: str, review: _Review) -> None:
        try:
            while review.disco or review.resync:
                if review.disco:
                    review.disco = False
                    if await self._anonymity_changed(room):
                        review.resync = True
                else:
                    review.resync = False
                    await self._resync_room(room)
        finally:
            del self._reviews[room]
            review.done.set()

    def _held(self, room: str, handler: Callable[[Any, str], None], msg: Any, body: str) -> bool:
        """While a room is being re-read, hold its commands until we know what
        it shows us: neither trusted on stale JIDs nor refused for a moment."""
        review = self._reviews.get(room)
        if review is None:
            return False
        nick = msg["from"].resource
        departures = self._departures.get((room, nick), 0)

        async def later() -> None:
            await review.done.wait()
            if self._departures.get((room, nick), 0) != departures:
                # its sender left meanwhile: the nick may be someone else's now
                log.info("xmpp %s: not running a command from %s/%s held while the room was re-read: "
                         "that nick left meanwhile", self.network, room, nick)
                return
            handler(msg, body)
        self._spawn(later(), "held command")
        return True

    def _others_shown(self, room: str) -> int:
        """How many occupants' real JIDs we know in ``room``, not counting our own."""
        return sum(1 for nick in self._real_jids.get(room, {}) if nick != self._nicks.get(room))

    def _stop_trusting(self, room: str, why: str) -> None:
        forgotten = self._others_shown(room)
        if room in self._real_jids:
            self._real_jids[room] = {}
        log.info("xmpp %s: %s %s; forgot %d occupant JID(s): privileged commands from it are refused "
                 "while it does not show me real JIDs", self.network, room, why, forgotten)

    async def _anonymity_changed(self, room: str) -> bool:
        """After a 104: ask the room (disco#info) whether it still shows real
        JIDs to everyone.  If that changed, or the room cannot say, what we
        knew is forgotten and True asks for a re-read."""
        from slixmpp.exceptions import IqError, IqTimeout

        non_anonymous: bool | None = None
        try:
            info = await self._client.plugin["xep_0030"].get_info(jid=room, timeout=self.config.join_timeout)
            non_anonymous = "muc_nonanonymous" in info["disco_info"]["features"]
        except (IqError, IqTimeout) as exc:
            log.warning("xmpp %s: cannot ask %s about its configuration: %s", self.network, room,
                        getattr(exc, "condition", "timeout"))
        except Exception as exc:   # e.g. the session died meanwhile: a new session rejoins afresh
            log.debug("xmpp %s: disco#info of %s: %r", self.network, room, exc)
        if non_anonymous is not None and non_anonymous == self._non_anonymous.get(room):
            return False                        # an unrelated change: what we knew still holds
        if non_anonymous:
            self._non_anonymous[room] = True
            log.info("xmpp %s: %s is now non-anonymous (disco#info); re-reading its occupants",
                     self.network, room)
        else:
            self._non_anonymous[room] = False
            self._stop_trusting(room, "is now semi-anonymous (disco#info)" if non_anonymous is False
                                else "changed its configuration and may hide real JIDs now")
        return True

    async def _resync_room(self, room: str) -> None:
        """Re-read the occupant list as the room shows it to us now: a join
        presence while already joined makes the server send every occupant's
        presence again (Prosody treats it as a desynced client; the others see
        only a presence update from the bot, no leave and join)."""
        from slixmpp.exceptions import PresenceError
        from slixmpp.jid import JID

        nick = self._nicks.get(room)
        client = self._client
        if nick is None or client is None or not self._session.is_set():
            return                              # a new session joins afresh anyway
        generation = self._generation
        self._real_jids[room] = {}
        try:
            await client.plugin["xep_0045"].join_muc_wait(JID(room), nick, maxstanzas=0,
                                                           timeout=self.config.join_timeout)
        except (PresenceError, asyncio.TimeoutError) as exc:
            log.warning("xmpp %s: could not re-read the occupants of %s: %s", self.network, room,
                        getattr(exc, "condition", "timeout"))
            return
        except Exception as exc:   # e.g. the session died meanwhile: a new session rejoins afresh
            log.debug("xmpp %s: re-reading %s: %r", self.network, room, exc)
            return
        if generation == self._generation:
            log.info("xmpp %s: re-read the occupants of %s: it shows me %d real JID(s)",
                     self.network, room, self._others_shown(room))

    def _dispatch(self, message: Message) -> None:
        log.debug("xmpp %s: command %r from %s", self.network, sanitise(message.text), message.sender)
        handler = self._on_message
        if handler is not None:
            self._spawn(handler(message), "command")

    def _reply_later(self, ident: Identity, text: str) -> None:
        self._spawn(self.send(ident, text), "reply")

    def _message_error(self, msg: Any) -> None:
        log.warning("xmpp %s: message to %s bounced: %s", self.network, msg["from"],
                    msg["error"]["condition"])

    def _spawn(self, coro: Any, what: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("xmpp %s: %s task failed", self.network, what, exc_info=t.exception())
        task.add_done_callback(done)
        return task
