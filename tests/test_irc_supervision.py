"""The IRC transport's connection supervision without a server or a sleep:
the reconnect backoff, driven by a fake clock, rng and sleep, with the
connection attempts scripted."""
from __future__ import annotations

import asyncio
from collections import deque

from bot.chat import TransportError
from bot.transports.irc import IrcConfig, IrcTransport
from bot.transports.irc.session import Session


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


async def reconnect_delays(outcomes: list[tuple[str, float]], *, minimum: float = 1.0,
                           maximum: float = 64.0) -> list[float]:
    """The delays the transport waits between attempts when each attempt, in
    turn, ``("refused", seconds it took)`` or ``("up", seconds it stayed up)``."""
    clock = Clock()
    delays: list[float] = []
    script = deque(outcomes)

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        clock.now += seconds

    transport = IrcTransport(IrcConfig(name="testnet", host="127.0.0.1", nick="releasebot", tls=False,
                                       reconnect_min=minimum, reconnect_max=maximum),
                             clock=clock, rng=lambda: 0.0, sleep=sleep)

    async def attempt(session: Session) -> None:
        if not script:
            transport._closed = True
            raise TransportError("the test is over")
        outcome, seconds = script.popleft()
        clock.now += seconds
        if outcome == "refused":
            raise TransportError("did not let us register")
        clock.now -= seconds
        session.registered.set()           # registered now; lost ``seconds`` later

        def lose() -> None:
            clock.now += seconds
            session.lost.set()
        asyncio.get_running_loop().call_soon(lose)

    transport._open = attempt  # type: ignore[method-assign]  # the connection attempts, scripted
    await transport._run()
    return delays


async def test_reconnect_backoff_doubles_with_jitter_up_to_the_maximum() -> None:
    # rng 0: the fixed half of "equal jitter"
    assert await reconnect_delays([("refused", 0.1)] * 8, maximum=8.0) == [0.5, 1, 2, 4, 4, 4, 4, 4]


async def test_the_backoff_starts_over_only_after_a_connection_that_stayed_up_a_minute() -> None:
    delays = await reconnect_delays([
        ("refused", 61), ("refused", 61), ("refused", 61),   # slow refusals (a registration timeout) ...
        ("up", 30),                                          # ... and a short visit: still the same outage
        ("up", 61),                                          # a connection that was healthy for a minute
        ("refused", 0.1), ("refused", 0.1),
    ])
    assert delays == [0.5, 1, 2, 4, 0.5, 1, 2]
