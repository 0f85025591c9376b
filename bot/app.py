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
from bot.chat import TransportError
from bot.commands import Dispatcher, default_registry
from bot.config import BotConfig
from bot.pacing import Cooldown
from bot.router import Router
from bot.transports import front_end
from engine.engine import Engine
from engine.participant_runtime import ParticipantEnv
from engine.participants import ParticipantRegistry
from engine.store import Store
from participants import discover

log = logging.getLogger(__name__)


# The bot is one long-running process that keeps many small objects for long (instances, step
# runs, specs) and makes many short-lived ones per transition.  With CPython's default collector
# thresholds (700, 10, 10) the cyclic collector rescans everything every few thousand allocations:
# a third of the engine's CPU at a few thousand transitions a second (bench/engine.py, measured
# with the collector off).  Few of the bot's objects form cycles, so collecting less often costs
# little memory.
GC_THRESHOLDS = (20_000, 20, 20)


def tune_gc() -> None:
    """The bot process's collector settings: what start-up built (modules, config, definitions)
    is frozen out of every later scan, and young objects are collected less often."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


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

    def __post_init__(self) -> None:
        cfg = self.config
        self.store = Store(cfg.database, synchronous=cfg.durability.upper())
        directory = Directory(cfg.users)
        # each participant's checked section of bot.yaml and the users reach its setup(services)
        env = ParticipantEnv(config=cfg.participant_config, users=directory)
        self.engine = Engine(self.store, cfg.specs, self.participants, schedules=cfg.schedules,
                             timezone=cfg.timezone, participant_env=env)
        self.dispatcher = Dispatcher(self.engine, directory, default_registry(),
                                     cooldown=Cooldown(cfg.rate_commands, cfg.rate_window))
        self.router = Router(self.dispatcher, max_room_lines=cfg.max_room_lines)

    async def start(self, extra_transports: list[Any] = ()) -> None:  # type: ignore[assignment]
        await asyncio.to_thread(self.store.open)
        await self.engine.start()
        tune_gc()
        log.info("engine ready: %s, database %s", self.config.summary(), self.config.database)
        for cfg in self.config.networks:
            self.transports.append(transport_for(cfg))
        self.transports.extend(extra_transports)
        for transport in self.transports:
            try:
                await self.router.serve(transport)
            except TransportError:
                # Refused credentials or an unmeetable TLS policy: retrying cannot help, and
                # a bot silently missing from a network is worse than one that will not start.
                await self.stop()
                raise

    async def stop(self) -> None:
        for transport in self.transports:
            try:
                await transport.close()
            except Exception:
                log.exception("closing %s failed", getattr(transport, "network", transport))
        await self.engine.stop()
        await asyncio.to_thread(self.store.close)
        log.info("stopped")
