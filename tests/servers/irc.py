"""Pytest fixtures around the real IRC servers of ``tests/serverkit/irc.py``
(ngircd, InspIRCd 3 + Anope 2).  A missing server skips its tests on a
laptop and fails them under CI (``tests.servers.need``).

Also the wiring the IRC front-end's tests share: ``irc_bots`` starts bots
as in production (Router(Dispatcher(real engine, Directory, default
commands)).serve(IrcTransport(config))), ``irc_clients`` connects clients
that play the humans; ``irc_config``/``fast`` build configs for them.

The InspIRCd pair takes ~3 s to link, so it is started once per session;
tests register their NickServ accounts through it (``insp.register``).  A
test that stops or restarts its servers gets a pair of its own
(``own_inspircd_anope``).
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Iterator

import pytest

from bot.access import Directory, User
from bot.commands import Dispatcher, default_registry
from bot.router import Router
from bot.transports.irc import IrcConfig, IrcTransport
from engine.engine import Engine
from tests.servers import need
from tests.servers.tls import ThrowawayCA
if TYPE_CHECKING:
    from tests.engine_fixtures import EngineFactory    # ``engines``: a plugin of tests/conftest.py
from tests.serverkit.irc import (Human, InspircdAnope, IrcLine, Ngircd, RawClient, parse_line,
                                 start_inspircd_anope, start_ngircd)

__all__ = ["BotFactory", "Human", "InspircdAnope", "IrcLine", "Ngircd", "RawClient", "bot_lines", "fast",
           "inspircd_anope", "irc_bots", "irc_clients", "irc_config", "irc_engine", "ngircd", "ngircd_tls",
           "own_inspircd_anope", "parse_line", "wait_for"]

NET = "testnet"
BOT = "releasebot"
WAITING = """\
    description: stays waiting until answered
    steps:
      - participant: hold
"""


@pytest.fixture
def ngircd(tmp_path: Path) -> Iterator[Ngircd]:
    """A fresh ngircd per test, without flood penalties (ready in ~25 ms)."""
    server = need(lambda: start_ngircd(tmp_path / "ngircd"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ngircd_tls(tmp_path: Path, tls_ca: ThrowawayCA) -> Iterator[Ngircd]:
    """An ngircd with a plain ``port`` and a TLS ``tls_port``; its certificate
    (for 127.0.0.1 and localhost) is signed by ``tls_ca``, which no system trusts.
    ngircd reads it as root, before it drops to ``nobody``."""
    server = need(lambda: start_ngircd(tmp_path / "ngircd", tls=tls_ca.issue(tmp_path / "certs")))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def inspircd_anope() -> Iterator[InspircdAnope]:
    """One InspIRCd + Anope pair for the whole session (linked in ~3 s)."""
    pair = need(lambda: start_inspircd_anope("irc-insp-"))
    try:
        yield pair
    finally:
        pair.cleanup()


@pytest.fixture
def own_inspircd_anope() -> Iterator[InspircdAnope]:
    """A pair of the test's own, to stop and restart (``kill_ircd``,
    ``stop_services`` ...) without disturbing the session's pair."""
    pair = need(lambda: start_inspircd_anope("irc-insp-own-"))
    try:
        yield pair
    finally:
        pair.cleanup()


# -- the bot and the humans -----------------------------------------------------------------

def irc_config(port: int, **overrides: Any) -> IrcConfig:
    """A bot on 127.0.0.1:``port`` in #ops, reconnecting quickly, default pacing."""
    settings: dict[str, Any] = dict(name=NET, host="127.0.0.1", port=port, tls=False, nick=BOT,
                                    channels=("#ops",), reconnect_min=0.1, reconnect_max=0.5)
    settings.update(overrides)
    return IrcConfig(**settings)


def fast(port: int, **overrides: Any) -> IrcConfig:
    """For ngircd without flood penalties: pacing out of the way."""
    return irc_config(port, pacing_rate=1000.0, pacing_burst=1000, **overrides)


@pytest.fixture
async def irc_engine(engines: "EngineFactory") -> Engine:
    """A real engine (manual clock) with one process, ``waiting``, that stays waiting."""
    return await engines({"waiting": WAITING})


BotFactory = Callable[..., Awaitable[IrcTransport]]


@pytest.fixture
async def irc_bots(irc_engine: Engine) -> AsyncIterator[BotFactory]:
    """``await irc_bots(config, users=[...], **IrcTransport options)``: a started,
    ready bot answering from ``irc_engine``; closed after the test."""
    started: list[IrcTransport] = []

    async def factory(config: IrcConfig, users: list[User] = (), max_room_lines: int = 4,  # type: ignore[assignment]
                      ready: bool = True, **options: Any) -> IrcTransport:
        transport = IrcTransport(config, **options)
        started.append(transport)
        router = Router(Dispatcher(irc_engine, Directory(list(users)), default_registry()), max_room_lines)
        await router.serve(transport)
        if ready:
            await transport.wait_ready(15)
        return transport

    yield factory
    for transport in started:
        await transport.close(flush_timeout=1)


@pytest.fixture
async def irc_clients() -> AsyncIterator[Callable[..., Awaitable[Human]]]:
    """``await irc_clients(port, nick, caps=..., sasl=...)``: a connected client, closed after the test."""
    made: list[Human] = []

    async def connect(port: int, nick: str, **kwargs: Any) -> Human:
        human = await Human.connect(port, nick, **kwargs)
        made.append(human)
        return human

    yield connect
    for human in made:
        await human.close()


def bot_lines(human: Human, nick: str) -> list[str]:
    """Every PRIVMSG/NOTICE text ``human`` got from ``nick`` so far."""
    return [m.text for m in human.lines if m.command in ("PRIVMSG", "NOTICE") and m.nick == nick]


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)
