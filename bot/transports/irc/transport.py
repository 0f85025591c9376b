"""The IRC transport: one server connection per configured network, made,
kept alive and remade in the background.

Supervision: connect (TLS policy, registration timeout), reconnect with
``bot.network.Backoff`` (reset after a connection that stayed up a minute),
keepalive PINGs, taking the configured nick back, and the late SASL login
(``caps``).  Incoming lines become ``bot.chat.Message``; outgoing text goes
through ``delivery`` (fair per target, paced, confirmed, only to who asked),
and ``send`` returns the message's receipt (``receipts``).
"""
from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from typing import Any, Awaitable, Callable

import irc.client
import irc.connection

from bot.addressing import command_text
from bot.chat import (UNVERIFIED, VERIFIED_SERVICES, Identity, Message, MessageHandler, NotDelivered, Offline, Outgoing,
                      Person, Room, Target, TransportError, Undeliverable)
from bot.logsafety import sanitise
from bot.network import Backoff
from bot.transports.irc.caps import SASL_LATE_TIMEOUT, Negotiation
from bot.transports.irc.config import IrcConfig
from bot.transports.irc.delivery import Delivery, Dest
from bot.transports.irc.receipts import Receipt
from bot.transports.irc.session import Session
from bot.transports.irc.text import Fold, casefolder, clean_lines, split_all, text_budget

log = logging.getLogger(__name__)

REGISTRATION_TIMEOUT = 60.0     # TCP connect + CAP/SASL + welcome
# While the bot is not on its configured nick (taken at connect, e.g. by its
# own ghost), it asks for it again this often (jittered 2/3..4/3), and at once
# when the holder is seen to quit or change nick.
NICK_RETRY = 45.0
# While SASL is configured but the server did not offer it at registration,
# CAP LS is asked again this often (jittered; see ``caps``).  If the server
# refuses a login after registration, the bot QUITs and reconnects to log in
# while registering, at most once per RELOGIN_INTERVAL.
SASL_RECHECK = 60.0
RELOGIN_INTERVAL = 600.0

Sleep = Callable[[float], Awaitable[None]]


class IrcTransport:
    """One IRC network.  ``start`` returns at once; the connection is made,
    kept alive and remade in the background.  What ``send`` guarantees, and
    when its receipt settles, is in ``delivery``; lines still queued when
    ``close`` gives up flushing are logged as not delivered and their
    receipts fail ``NotDelivered``.  ``ready``: registered on a live
    connection.

    Also kept up in the background: the configured nick (regained when its
    holder leaves, or tried every ``nick_retry`` seconds), and the SASL login
    when the server could not offer it at connect (see ``caps``).
    """

    protocol = "irc"

    def __init__(self, config: IrcConfig, *, clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[], float] = random.random, nick_retry: float = NICK_RETRY,
                 sasl_recheck: float = SASL_RECHECK, sleep: Sleep = asyncio.sleep) -> None:
        self.config = config
        self.network = config.name
        self.clock = clock
        self.rng = rng
        self.nick_retry = nick_retry              # seconds between tries to regain the configured nick
        self.sasl_recheck = sasl_recheck          # seconds between CAP LS while SASL is not offered
        self.backoff = Backoff(config.reconnect_min, config.reconnect_max, rng=rng)
        self._sleep = sleep
        self._relogin_at: float | None = None     # when the bot last reconnected to log in
        self.account: str | None = None          # the bot's own services account, once logged in
        self.disconnects = 0                      # registered connections lost (not counting close())
        self.connections = 0                      # registered connections made
        self.fold: Fold = casefolder("rfc1459")   # the last server's CASEMAPPING
        self.delivery = Delivery(config.name, config.max_queued_lines, clock)
        self._session: Session | None = None
        self._ready = asyncio.Event()
        self._wake = asyncio.Event()
        self._handler: MessageHandler | None = None
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._closed = False

    # -- the Transport contract -----------------------------------------------------------------

    async def start(self, on_message: MessageHandler) -> None:
        if self._task is not None:
            raise TransportError(f"{self.network}: already started")
        self._handler = on_message
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"irc-{self.network}")

    async def send(self, target: Target, text: str | Outgoing) -> asyncio.Future[None]:
        """Queue ``text`` for ``target`` and return its receipt (``delivery`` says
        what it means).  Raises only for what no retry can mend (another
        network, a malformed name: Undeliverable) and after ``close``
        (NotDelivered); everything else settles the receipt.  A ``Person``
        is reached only at a nick the server vouches for now (``_person``)."""
        if self._closed or self._stopping:
            raise NotDelivered(f"{self.network}: closed")
        if target.protocol != "irc" or target.network != self.network:
            raise Undeliverable(f"{self.network}: cannot send to {target} (another network)")
        body = text.text if isinstance(text, Outgoing) else text
        receipt = Receipt(target.user if isinstance(target, Person) else None)
        if isinstance(target, Person):
            dest = self._person(target, receipt)
            if dest is None:
                return receipt.future
        else:
            name = target.name if isinstance(target, Room) else target.handle
            _check_name(self.network, name)
            dest = self._dest(target, name)
        command = "NOTICE" if self.config.use_notice else "PRIVMSG"
        budget = self._budget(command, dest.name)
        pieces = [piece for line in clean_lines(body) for piece in split_all(line, budget)]
        self.delivery.put(dest, command, pieces, receipt)
        self._wake.set()
        return receipt.future

    def _person(self, person: Person, receipt: Receipt) -> Dest | None:
        """Where to reach ``person`` now: the nick the roster knows is logged
        into one of their accounts (or, where users.yaml allows it, matches
        one of their hostmasks; ``roster.Roster.holder`` chooses), bound to
        that account or user@host so every line is checked before it leaves.
        Failing that, the nick they were last seen at (``handle``), or one
        named like their first account, bound to their accounts: the server
        is asked (WHO) before anything goes, and unless it vouches for the
        account the message fails NotDelivered.  None: ``receipt`` failed."""
        offline = f"{person.user or person} is not online on {self.network} under a verified nick"
        if not person.accounts and not person.hostmasks:
            receipt.fail(Undeliverable(f"{person.user or person} has no IRC account or hostmask on {self.network}"))
            return None
        session = self._session
        if session is None or not session.alive or not session.registered.is_set():
            receipt.fail(NotDelivered(f"{offline} (not connected)"))
            return None
        hint: str = getattr(person, "handle", "") or ""
        if hint and not _good_name(hint):
            hint = ""
        found = session.roster.holder(person.accounts, person.hostmasks, hint)
        if found is not None:
            nick, account, userhost = found
            if _good_name(nick):
                return Dest(self.fold(nick), nick, True, account=account, userhost=userhost)
        nick = hint or (person.accounts[0] if person.accounts else "")
        if not person.accounts or not _good_name(nick):
            receipt.fail(Offline(offline))      # a hostmask alone says nothing of a nick we do not see
            return None
        return Dest(self.fold(nick), nick, True, account=person.accounts[0], more_accounts=person.accounts[1:])

    def _dest(self, target: Identity | Room, name: str) -> Dest:
        if isinstance(target, Room):
            return Dest(self.fold(name), name)
        # A person is bound to what the server vouched for when they asked (see delivery).
        if target.verified_by == VERIFIED_SERVICES and target.account:
            return Dest(self.fold(name), name, True, account=target.account)
        userhost = target.hostmask.split("!", 1)[1] if target.hostmask and "!" in target.hostmask else None
        return Dest(self.fold(name), name, True, userhost=userhost)

    def _budget(self, command: str, target: str) -> int:
        session = self._session
        if session is not None and session.registered.is_set():
            return session.budget(command, target)
        # Not connected: as if with a longer nick than ours; a line that still does
        # not fit once connected is cut again when written.
        cfg = self.config
        return text_budget(cfg.nick + "_" * 3, "~" + (cfg.username or cfg.nick)[:10], None, command, target)

    async def close(self, flush_timeout: float = 5.0) -> None:
        """Flush what can be flushed (for up to ``flush_timeout`` seconds while
        connected), then QUIT and stop reconnecting."""
        if self._closed:
            return
        self._stopping = True
        deadline = self.clock() + flush_timeout
        while self.delivery.pending() and self.clock() < deadline:
            session = self._session
            if session is None or not session.alive:
                break
            await asyncio.sleep(0.02)
        left = self.delivery.pending()
        if left:
            log.warning("%s: closing with %d line(s) not delivered", self.network, left)
        self._closed = True
        self.delivery.fail_open(NotDelivered(f"{self.network}: closed before the server confirmed the message"))
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

    # -- extras for the app, tests and benchmarks --------------------------------------------------

    @property
    def ready(self) -> bool:
        """Registered on a connection that is alive (and not closing): lines written now go out."""
        return self.connected and not self._stopping

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
        return self.delivery.pending()

    def unconfirmed(self) -> int:
        """Lines written but not yet confirmed: what a crash now could make the server see twice."""
        return len(self.delivery.unconfirmed)

    # -- what sessions call --------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def clear_wake(self) -> None:
        self._wake.clear()

    async def woken(self) -> None:
        await self._wake.wait()

    def check_ready(self, session: Session) -> None:
        if session is self._session and session.registered.is_set() and not session.pending_joins:
            self._ready.set()

    def relogin(self, negotiation: Negotiation, why: str) -> None:
        """SASL after registration did not work: QUIT (once every written line
        is confirmed) and reconnect, to log in while registering; at most once
        per RELOGIN_INTERVAL, otherwise go on without an account."""
        if negotiation.late_sasl == "failed" or negotiation.link.quitting is not None:
            return
        negotiation.late_sasl = "failed"
        cfg = self.config
        now = self.clock()
        if self._relogin_at is not None and now - self._relogin_at < RELOGIN_INTERVAL:
            log.warning("%s: logging in as %s after registration failed (%s); continuing without an account "
                        "for now, trying again in %.0fs", self.network, cfg.sasl_account, why,
                        self._relogin_at + RELOGIN_INTERVAL - now)
            negotiation.late_sasl = None              # the periodic check tries again once the interval is over
            negotiation.next_sasl_check = self._relogin_at + RELOGIN_INTERVAL
            return
        self._relogin_at = now
        log.warning("%s: logging in as %s after registration failed (%s); reconnecting to log in while "
                    "registering", self.network, cfg.sasl_account, why)
        negotiation.link.quitting = "reconnecting to log in"
        self._wake.set()

    # -- connection supervision -----------------------------------------------------------------------

    async def _run(self) -> None:
        number = 0
        while not self._closed:
            number += 1
            self.account = None
            session = Session(self, number)
            registered_at: float | None = None
            workers: list[asyncio.Task[None]] = []
            try:
                await self._open(session)
                registered_at = self.clock()
                self._session = session
                self.connections += 1
                log.info("%s: connected to %s:%d as %s (%s)", self.network, self.config.host,
                         self.config.server_port, session.nick,
                         f"account {self.account}" if "sasl" in session.caps and self.account
                         else "no account")
                if self.config.channels:
                    session.pending_joins = {session.fold(c) for c in self.config.channels}
                    session.control.append("JOIN " + ",".join(self.config.channels))
                self.check_ready(session)
                workers = [asyncio.create_task(session.pump()), asyncio.create_task(self._maintain(session))]
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
                self.delivery.requeue()
            if self._closed:
                return
            if registered_at is not None:
                # Only a connection that was up a while ends an outage: a server that
                # takes long to refuse (a registration timeout) still backs off.
                self.backoff.connection_ended(self.clock() - registered_at)
            delay = self.backoff.delay()
            log.info("%s: reconnecting in %.1fs (%d line(s) waiting)", self.network, delay, self.pending())
            await self._sleep(delay)

    async def _open(self, session: Session) -> None:
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

    async def _maintain(self, session: Session) -> None:
        """Keepalive; regaining the configured nick; re-checking for SASL; held
        lines whose WHO was never answered."""
        cfg = self.config
        step = max(0.05, min(cfg.ping_interval, cfg.ping_timeout, self.nick_retry, self.sasl_recheck) / 4)
        now = self.clock()
        neg = session.neg
        session.next_nick_try = now + self.nick_retry * (2 / 3 + self.rng() * 2 / 3)
        neg.next_sasl_check = now + self.sasl_recheck * (2 / 3 + self.rng() * 2 / 3)
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
                session.queue_control(f"PING :keepalive{session.number}")
            if not session.has_own_nick() and now >= session.next_nick_try:
                session.regain_nick()
            if neg.late_overdue(now):
                self.relogin(neg, f"no answer in {SASL_LATE_TIMEOUT:.0f}s")
            if neg.may_recheck(now):
                neg.next_sasl_check = now + self.sasl_recheck * (2 / 3 + self.rng() * 2 / 3)
                neg.recheck()
            self.delivery.release_stale(now)

    # -- incoming -------------------------------------------------------------------------------------

    def incoming(self, session: Session, event: Any, channel: str | None) -> None:
        source = event.source
        if not isinstance(source, irc.client.NickMask) or not source.nick or not event.arguments:
            return
        if session.is_me(source.nick):      # our own line echoed back (echo-message, bouncers)
            self.delivery.echoed("PRIVMSG", str(event.target), str(event.arguments[0]), session.fold)
            return
        account = session.account_of(source.nick, event.tags)
        userhost = f"{source.user}@{source.host}" if source.user and source.host else None
        session.roster.spoke(source.nick, userhost, account, "account-tag" in session.caps)
        text = command_text(str(event.arguments[0]), self.config.command_prefix, in_room=channel is not None,
                            is_own_nick=session.is_me)
        if text is None:
            return
        identity = Identity("irc", self.network, source.nick, account=account,
                            verified_by=VERIFIED_SERVICES if account else UNVERIFIED,
                            hostmask=(f"{source.nick}!{userhost}" if self.config.allow_hostmask and userhost
                                      else None),
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


def _good_name(name: str) -> bool:
    """Whether ``name`` can be a PRIVMSG target as it is (no space, comma, CR, LF, NUL; not huge)."""
    return bool(name) and not any(c in name for c in " ,\r\n\0") and len(name.encode("utf-8")) <= 200


def _check_name(network: str, name: str) -> None:
    if not _good_name(name):
        raise Undeliverable(f"{network}: bad target {sanitise(name, 60)!r}")
