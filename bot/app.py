"""The assembled bot: config -> store, engine, participants, dispatcher,
front-ends.  ``run_bot.py`` is the command line around it; tests and
benchmarks build it the same way."""
from __future__ import annotations

import asyncio
import gc
import logging
from dataclasses import dataclass, field
from typing import Any

from bot.access import Directory
from bot.chat import Person, TransportError
from bot.commands import Dispatcher, default_registry
from bot.config import BotConfig
from bot.pacing import Cooldown
from bot.router import Router
from bot.transports import front_end
from engine.engine import Engine
from engine.participant_runtime import ParticipantEnv, Storage
from engine.participants import ParticipantRegistry
from engine.store import Store
from notifiers.outbox import Outbox, Settings
from notifiers.routing import Flusher, Routing
from participants import discover

log = logging.getLogger(__name__)


# The bot is one long-running process that keeps many small objects for long (instances, step
# runs, specs) and makes many short-lived ones per transition.  With CPython's default collector
# thresholds (700, 10, 10) the cyclic collector rescans everything every few thousand allocations:
# a third of the engine's CPU at a few thousand transitions a second (bench/engine.py, measured
# with the collector off).  Few of the bot's objects form cycles, so collecting less often costs
# little memory.
GC_THRESHOLDS = (20_000, 20, 20)
CLOSE_TIMEOUT = 8       # seconds a front-end may take to close (its own flush waits are shorter)


def tune_gc() -> None:
    """The bot process's collector settings: what start-up built (modules, config, definitions)
    is frozen out of every later scan, and young objects are collected less often."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def reacher(cfg: BotConfig) -> Any:
    """(user, network) -> the ``Person`` to deliver to: the identities users.yaml gives them there."""
    users = {u.name: u for u in cfg.users}
    networks = {n.name: n for n in cfg.networks}

    def reach(name: str, network: str) -> Person | None:
        user, net = users.get(name), networks.get(network)
        if user is None or net is None:
            return None
        if net.protocol == "irc":
            ids = user.irc.get(network)
            if ids is None or not (ids.accounts or ids.hostmasks):
                return None
            return Person("irc", network, name, ids.accounts, ids.hostmasks if net.allow_hostmask else ())
        addresses = user.xmpp_jids if net.protocol == "xmpp" else user.emails if net.protocol == "email" else ()
        return Person(net.protocol, network, name, tuple(addresses)) if addresses else None
    return reach


def message_domain(cfg: BotConfig) -> str:
    """The right-hand side of the Message-IDs of the bot's mail: its own address's domain."""
    for net in cfg.networks:
        domain = getattr(getattr(net, "sender", None), "domain", None)
        if net.protocol == "email" and isinstance(domain, str) and domain:
            return domain.lower()
    return "releasebot.invalid"


def transport_for(cfg: Any) -> Any:
    """The adapter for one network's config, constructed with it (injected, not subclassed)."""
    return front_end(cfg.protocol).Transport(cfg)


@dataclass
class App:
    config: BotConfig
    participants: ParticipantRegistry = field(default_factory=lambda: ParticipantRegistry(discover()))
    store: Store = field(init=False)
    engine: Engine = field(init=False)
    dispatcher: Dispatcher = field(init=False)
    router: Router = field(init=False)
    transports: list[Any] = field(default_factory=list)
    outbox: Outbox = field(init=False)
    routing: Routing = field(init=False)
    flusher: Flusher = field(init=False)

    def __post_init__(self) -> None:
        cfg = self.config
        self.store = Store(cfg.database, synchronous=cfg.durability.upper())
        directory = Directory(cfg.users)
        settings = cfg.outbox
        book = cfg.book                 # built once: the outbox and the fallback share it
        self.outbox = Outbox(self.store, book, reacher(cfg), settings=Settings(
            retry_min=settings.retry_min, retry_max=settings.retry_max, give_up=settings.give_up, keep=settings.keep,
            message_domain=message_domain(cfg)) if settings is not None else None)
        # each participant's checked section of bot.yaml, the users and the outbox reach its setup(services)
        env = ParticipantEnv(config=cfg.participant_config, users=directory, outbox=self.outbox)
        self.engine = Engine(self.store, cfg.specs, self.participants, schedules=cfg.schedules,
                             timezone=cfg.timezone, participant_env=env)
        self.routing = Routing(self.store, self.outbox, cfg.notifications, timezone=cfg.timezone)
        self.engine.watch(self.routing.rows_for)       # events routed in the commit that makes them
        self.flusher = Flusher(self.routing, interval=min(5.0, cfg.notifications.flood_window / 2))
        mail_networks = set(book.email_networks())

        def fallback_to(user: str) -> str | None:
            if user not in self.routing.fallback:
                return None
            on = sorted(book.users.get(user, frozenset()) & mail_networks)
            return on[0] if on else None
        self.outbox.fallback_to = fallback_to
        self.dispatcher = Dispatcher(self.engine, directory, default_registry(),
                                     cooldown=Cooldown(cfg.rate_commands, cfg.rate_window), outbox=self.outbox,
                                     routing=self.routing)
        self.router = Router(self.dispatcher, max_room_lines=cfg.max_room_lines, outbox=self.outbox)

    async def start(self, extra_transports: list[Any] = ()) -> None:  # type: ignore[assignment]
        await asyncio.to_thread(self.store.open)
        await self.outbox.open()            # its tables exist before any step can write to them
        await self.routing.open()           # and the subscriptions are known before any event
        await self.engine.start()
        tune_gc()
        log.info("engine ready: %s, database %s", self.config.summary(), self.config.database)
        for cfg in self.config.networks:
            self.transports.append(transport_for(cfg))
        self.transports.extend(extra_transports)
        await self._mail_in()
        for transport in self.transports:
            try:
                await self.router.serve(transport)
            except TransportError:
                # Refused credentials or an unmeetable TLS policy: retrying cannot help, and
                # a bot silently missing from a network is worse than one that will not start.
                await self.stop()
                raise
        self.outbox.attach({t.network: t for t in self.transports if t.protocol != "console"})
        # any committed transition may have queued messages (a notify step, a watcher's routes)
        self.engine.bus.subscribe(self._committed)
        await self.outbox.start()
        await self.flusher.start()

    async def _mail_in(self) -> None:
        """The email front-ends that take mail get the database (their ``email`` tables),
        the users' addresses and the command parser; the outbox gets their reply addresses."""
        receiving = {t.network: t for t in self.transports if getattr(t, "protocol", "") == "email"
                     and getattr(t.config, "receives", False)}
        if not receiving:
            return
        from bot.transports.email.schema import MIGRATIONS, OWNER
        await self.store.migrate_participant(OWNER, MIGRATIONS)
        users = {u.name: tuple(u.emails) for u in self.config.users if u.emails}
        commands = self.dispatcher.registry.commands

        def is_command(text: str) -> bool:
            words = text.split()
            return bool(words) and words[0].lower() in commands
        for transport in receiving.values():
            transport.use(Storage(self.store, OWNER), users, is_command,
                          rate=(self.config.rate_commands, self.config.rate_window))

        def issue_token(network: str, user: str, purpose: str, ref: str, expires: float) -> Any:
            transport = receiving.get(network)
            return transport.issue_token(user, purpose, ref, expires) if transport is not None else None
        self.outbox.issue_token = issue_token

    async def _committed(self, _event: Any) -> None:
        self.outbox.wake()

    async def stop(self) -> None:
        log.info("stopping")
        await self.flusher.stop()
        await self.outbox.stop()
        for transport in self.transports:
            name = getattr(transport, "network", transport)
            try:
                # a front-end that cannot say goodbye in time must not keep the bot from stopping:
                # what it had not sent is still in the outbox, or was an answer nobody waits for
                await asyncio.wait_for(transport.close(), CLOSE_TIMEOUT)
            except asyncio.TimeoutError:
                log.error("closing %s took more than %ds; left behind", name, CLOSE_TIMEOUT)
            except Exception:
                log.exception("closing %s failed", name)
        await self.engine.stop()
        await asyncio.to_thread(self.store.close)
        log.info("stopped")
