"""The XMPP transport: one account's connection, kept up for as long as the bot runs.

It connects (STARTTLS, direct TLS or, to loopback only, plaintext), keeps an
idle connection alive with pings, reconnects with backoff (reset once a
connection stayed healthy for a minute), resumes the stream where the server
offers XEP-0198, rejoins the configured rooms on every new session, and
wires slixmpp's events to ``Delivery`` (outbound), ``Inbound`` (commands) and
``Rooms`` (what the rooms show).  A server that refuses the credentials or
the certificate at start stops ``start`` with a ``TransportError``.

``send`` returns a receipt that the server's confirmation settles (see
``delivery``): resolved once the server has every stanza of the message,
failed by a bounce, a target that went away, or ``close``.  Whoever awaits
it may count on this: a resolved receipt means the server took the whole
message on; the message may reach its target once more than that, at most
once per stream lost before the server's confirmation reached us.
"""
from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

from bot.chat import (Identity, Message, MessageHandler, NotDelivered, Outgoing, Person, Room, Target,
                      TransportError, Undeliverable)
from bot.logsafety import sanitise
from bot.network import Backoff
from bot.transports.xmpp.config import XmppConfig
from bot.transports.xmpp.delivery import Delivery
from bot.transports.xmpp.inbound import Inbound
from bot.transports.xmpp.receipts import settled
from bot.transports.xmpp.roomtrust import PROTOCOL, Departure
from bot.transports.xmpp.rooms import Rooms

log = logging.getLogger(__name__)

PING_TIMEOUT = 30.0            # at most; shorter when the keepalive is


class XmppTransport:
    """One XMPP account: direct messages plus the configured rooms (see
    ``delivery`` for what a receipt means)."""

    protocol = PROTOCOL

    def __init__(self, config: XmppConfig, *, rng: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from slixmpp.jid import JID

        self.config = config
        self.network = config.name
        self.online = asyncio.Event()       # session up and rooms (re)joined
        self.connections = 0                # sessions started (not resumed) so far
        self._clock = clock
        self._backoff = Backoff(config.reconnect_min, config.reconnect_max, rng=rng)
        self._delivery = Delivery(config, self.online)
        self._rooms = Rooms(config, [JID(room).bare for room in config.rooms], lambda: self._client,
                            self._current_session, self._departed, self._spawn)
        self.trust = self._rooms.trust
        self._inbound = Inbound(config.name, JID(config.jid).bare, config.command_prefix, self.trust,
                                self._delivery, self._dispatch, self._reply_later, self._spawn)
        self._lost = asyncio.Event()
        self._session = asyncio.Event()     # authenticated and bound (rooms perhaps not yet)
        self._session_since = 0.0           # when the current session started or resumed
        self._generation = 0                # bumped by every session start and disconnect
        self._tasks: set[asyncio.Task[Any]] = set()
        self._client: Any = None
        self._on_message: MessageHandler | None = None
        self._first: asyncio.Future[str] | None = None
        self._auth_error: str | None = None   # credentials or certificate refused: retrying will not help
        self._last_error = ""
        self._closing = False

    @property
    def undelivered(self) -> int:
        """Messages queued or sent but not yet acknowledged by the server."""
        return self._delivery.undelivered

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
        self._delivery.client = self._client
        self._first = asyncio.get_running_loop().create_future()
        self._spawn(self._delivery.pump(), "pump")
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

    @property
    def ready(self) -> bool:
        """The stream is up and the configured rooms were (re)joined: sending now."""
        return self.online.is_set() and not self._closing

    async def send(self, target: Target, text: str | Outgoing) -> asyncio.Future[None]:
        """Queue ``text`` (an ``Outgoing``'s ``.text``) for ``target`` and return
        its receipt (``delivery`` says when it settles).  Never truncated (an
        overlong line is split), but capped per target (``max_queued_lines``).
        A ``Person`` gets a chat message at each of their bare JIDs: the server
        routes it to that account's resources only, or stores it offline (so
        never ``Offline``); their ``handle`` hint is not used, as a room nick is
        nobody's identity and the bare JID reaches every resource.  Raises
        TransportError only for a target of another network."""
        if target.protocol != PROTOCOL or target.network != self.network:
            raise TransportError(f"xmpp {self.network}: cannot send to {target}")
        body = text.text if isinstance(text, Outgoing) else text
        if self._closing:
            return settled(NotDelivered(f"xmpp {self.network}: closed"))
        if isinstance(target, Person):
            jids = self._person_jids(target)
            if isinstance(jids, Undeliverable):
                return settled(jids)
            return self._delivery.put_all(jids, "chat", body)
        if isinstance(target, Room):
            address, mtype = self._address_of(target.name, room=True), "groupchat"
        else:
            address, mtype = self._address_of(self.trust.private_address(target), room=False), "chat"
        if isinstance(address, Undeliverable):
            return settled(address)
        return self._delivery.put(address, mtype, body)

    def _address_of(self, name: str, *, room: bool) -> str | Undeliverable:
        """``name`` as slixmpp writes it (bounces are compared to it), or why it is no address."""
        from slixmpp.jid import JID, InvalidJID

        try:
            jid = JID(name)
        except InvalidJID as exc:
            return Undeliverable(f"xmpp {self.network}: {sanitise(name)!r} is not a JID ({exc})")
        if room and (not jid.user or jid.resource):
            return Undeliverable(f"xmpp {self.network}: {sanitise(name)!r} is not a room JID")
        if not jid.domain:
            return Undeliverable(f"xmpp {self.network}: {sanitise(name)!r} is not a JID")
        return str(jid.full)

    def _person_jids(self, person: Person) -> list[str] | Undeliverable:
        """The bare JIDs to message ``person`` at.  Never a room or a room
        occupant: a nickname is not a person."""
        from slixmpp.jid import JID, InvalidJID

        who = person.user or str(person)
        if not person.accounts:
            return Undeliverable(f"{who} has no JID on {self.network}")
        jids: list[str] = []
        for account in person.accounts:
            try:
                jid = JID(account)
            except InvalidJID as exc:
                return Undeliverable(f"xmpp {self.network}: {who}'s JID {sanitise(account)!r} is not valid ({exc})")
            if not jid.user or jid.resource:
                return Undeliverable(f"xmpp {self.network}: {who}'s JID {sanitise(account)!r} is not a bare JID "
                                     "like name@example.org")
            if self.trust.is_room(jid.bare):
                return Undeliverable(f"xmpp {self.network}: {who}'s JID {sanitise(account)!r} is a room, "
                                     "not a person")
            if jid.bare not in jids:
                jids.append(jid.bare)
        return jids

    async def close(self, flush_timeout: float = 2.0) -> None:
        """Flush what can be flushed (while connected), say goodbye, disconnect;
        receipts still open fail with NotDelivered."""
        if self._closing and self._client is None:
            return
        deadline = time.monotonic() + flush_timeout
        while self._delivery.undelivered and self.online.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._closing = True
        if self._delivery.undelivered:
            log.warning("xmpp %s: closing with %d undelivered message(s)", self.network,
                        self._delivery.undelivered)
        self._delivery.close("closed before the server confirmed it")
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
        client.add_filter("out_sync", self._delivery.outgoing)   # after xep_0198's own out_sync filter
        client.add_event_handler("session_start", self._session_start)
        client.add_event_handler("session_resumed", self._session_resumed)
        client.add_event_handler("session_end", self._session_end)
        client.add_event_handler("disconnected", self._disconnected)
        client.add_event_handler("failed_all_auth", self._failed_auth)
        client.add_event_handler("connection_failed", self._connection_failed)
        client.add_event_handler("ssl_invalid_chain", self._tls_failed)    # STARTTLS handshake refused
        client.add_event_handler("sm_enabled", lambda _: log.debug("xmpp %s: stream management on",
                                                                   self.network))
        client.add_event_handler("stanza_acked", self._delivery.acked)
        client.add_event_handler("message", self._inbound.message)
        client.add_event_handler("groupchat_presence", self._rooms.presence)
        client.add_event_handler("groupchat_config_status", self._rooms.config_status)
        client.add_event_handler("message_error", self._message_error)
        return client

    def _address(self) -> tuple[str | None, int | None]:
        cfg = self.config
        if cfg.host is None and cfg.port is None:
            return None, None
        return cfg.host or cfg.domain, cfg.port or (5223 if cfg.tls == "direct" else 5222)

    def _settle_first(self, outcome: str | BaseException) -> None:
        if self._first is not None and not self._first.done():
            if isinstance(outcome, BaseException):
                self._first.set_exception(outcome)
            else:
                self._first.set_result(outcome)

    async def _supervise(self) -> None:
        while not self._closing:
            try:
                delay = await self._attempt()
            except asyncio.CancelledError:
                raise
            except Exception:   # a bug here must not end reconnecting for good
                log.exception("xmpp %s: connection attempt failed unexpectedly", self.network)
                self._client.abort()
                delay = self._reconnect_delay(None, "unexpected error")
            if delay is None:
                return
            await asyncio.sleep(delay)

    def _reconnect_delay(self, lasted: float | None, reason: str) -> float:
        """The wait before the next attempt, after a connection whose session
        lasted ``lasted`` seconds (None: there was none).  A session that
        stayed up a minute ends the outage it followed: the next loss starts
        again at ``reconnect_min``; a shorter one keeps backing off, so a server
        that drops the bot right after login is not hammered."""
        if lasted is not None:
            self._backoff.connection_ended(lasted)
        delay = self._backoff.delay()
        log.warning("xmpp %s: %s; reconnecting in %.1fs", self.network, reason, delay)
        return delay

    async def _attempt(self) -> float | None:
        """One connection, from connecting until it is lost; returns the wait
        before the next (None: give up, start() reports why)."""
        client = self._client
        host, port = self._address()
        self._lost.clear()
        self._auth_error = None
        self._last_error = ""
        lasted: float | None = None
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
            lasted = await self._connected_period()
            reason = "connection lost"
        self.online.clear()
        if self._auth_error:
            error = TransportError(f"xmpp {self.network}: {self._auth_error}")
            if self._first is not None and not self._first.done():
                self._settle_first(error)
                return None
            log.error("%s", error)
            self._backoff.attempt = max(self._backoff.attempt, 30)   # keep trying, slowly: a password may be fixed
        else:
            self._settle_first(reason)
        return self._reconnect_delay(lasted, reason)

    async def _connected_period(self) -> float | None:
        """From TCP connect until the connection is lost: wait for the
        session (authenticated and bound), then keep it alive with pings.
        Returns how long the session lasted, None if there was none."""
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
        return self._clock() - self._session_since if had_session else None

    async def _ping(self) -> None:
        from slixmpp.exceptions import IqError, IqTimeout

        try:
            await self._client.plugin["xep_0199"].ping(timeout=min(PING_TIMEOUT, self.config.keepalive))
        except IqTimeout:
            log.warning("xmpp %s: no answer to a keepalive ping; dropping the connection", self.network)
            self._client.abort()
        except IqError:
            pass            # an error reply is still a reply: the server is there
        except Exception as exc:  # e.g. the session died meanwhile: the supervisor sees it
            log.debug("xmpp %s: keepalive ping: %r", self.network, exc)

    def _current_session(self) -> int | None:
        """The current session's number, None while there is none."""
        return self._generation if self._session.is_set() and not self._lost.is_set() else None

    def _session_up(self) -> None:
        self._session_since = self._clock()
        self._session.set()

    # --- slixmpp events ------------------------------------------------------

    async def _session_start(self, _event: Any) -> None:
        client = self._client
        self.connections += 1
        encrypted = client.transport is not None and client.transport.get_extra_info("ssl_object") is not None
        log.info("xmpp %s: session started as %s (TLS: %s)", self.network, client.boundjid,
                 "yes" if encrypted else "NO")
        self._generation += 1
        generation = self._generation
        self._session_up()
        client.send_presence()
        for room in self._rooms.room_jids:
            if await self._rooms.join(room):
                # occupants who left while we were away get nothing sent to their room nick
                self._delivery.keep_occupants(room, self.trust.present(room))
            else:
                dropped = self._delivery.drop_room(room)
                if dropped:
                    log.warning("xmpp %s: not in %s: dropped %d queued message(s) for it",
                                self.network, room, dropped)
        # a session that died while we were joining must not mark its successor online
        if generation == self._generation and client.is_connected() and not self._lost.is_set():
            self._set_online()

    def _session_resumed(self, _event: Any) -> None:
        # Rooms stay joined on the server across a resumed stream.
        self._delivery.session_resumed()
        self._session_up()
        log.info("xmpp %s: stream resumed", self.network)
        self._set_online()

    def _session_end(self, _event: Any) -> None:
        self.online.clear()
        if not self._closing:
            self._delivery.session_ended()

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
        domain = self.config.domain
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
        queued = len(self._delivery.queue)
        self.online.set()
        self._delivery.wake()
        self._settle_first("online")
        if queued:
            log.info("xmpp %s: online; delivering %d queued message(s)", self.network, queued)

    def _departed(self, departure: Departure) -> None:
        room, nick = departure.room, departure.nick
        if nick is None:
            dropped = self._delivery.drop_room(room)
            if not self._closing:
                log.warning("xmpp %s: I am no longer in %s; dropped %d queued message(s) for it",
                            self.network, room, dropped)
        elif departure.new_nick is not None:
            self._delivery.rename_occupant(room, nick, departure.new_nick)
        else:
            self._delivery.drop_occupant(room, nick)

    # --- commands in, answers out -------------------------------------------------

    def _dispatch(self, message: Message) -> None:
        log.debug("xmpp %s: command %r from %s", self.network, sanitise(message.text), message.sender)
        handler = self._on_message
        if handler is not None:
            self._spawn(handler(message), "command")

    def _reply_later(self, ident: Identity, text: str) -> None:
        self._spawn(self.send(ident, text), "reply")

    def _message_error(self, msg: Any) -> None:
        error = msg["error"]
        self._delivery.bounced(msg["id"], str(msg["from"]), error["condition"], error["text"], error["type"])

    def _spawn(self, coro: Awaitable[Any], what: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("xmpp %s: %s task failed", self.network, what, exc_info=t.exception())
        task.add_done_callback(done)
        return task
