#!/usr/bin/env python3
"""IRC front-end benchmark against a real ngircd started here
(``MaxPenaltyTime = 0``: the server does not throttle, so the bot is measured).

  irc_command_rtt_p50_ms / _p99_ms   1,000 ``ps`` commands from a real client, one at a
                                     time, answered from a real engine and SQLite file
                                     (3 waiting instances: 3 lines), timed from send to
                                     the last line; bot pacing effectively off; after a
                                     warm-up
  irc_notice_lines_per_s             NOTICE lines/s arriving at the client while the
                                     bot sends 60 lines paced at 10/s, burst 5 (the rate
                                     after the burst; the wire carries 10 messages/s, and
                                     under a backlog one in MARKER_LINES + 1 is a
                                     confirmation PING; target >= 9)
  irc_disconnects                    connections the bots lost meanwhile (must be 0)

``python bench/chat_irc.py`` prints ``name=value`` lines.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.chat_common import INSTANCES, close, ps_engine  # noqa: E402
from bot.access import Directory, IrcIds, User  # noqa: E402
from bot.chat import Room  # noqa: E402
from bot.commands import Dispatcher, default_registry  # noqa: E402
from bot.router import Router  # noqa: E402
from bot.transports.irc import IrcConfig, IrcTransport  # noqa: E402
from engine.engine import Engine  # noqa: E402
from tests.serverkit import ServerMissing  # noqa: E402
from tests.serverkit.irc import Human, start_ngircd  # noqa: E402

COMMANDS = 1000
WARMUP = 50
PACED_LINES = 60
PACED_RATE = 10.0
PACED_BURST = 5


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _bot(engine: Engine, port: int, nick: str, channel: str, **pacing: object) -> IrcTransport:
    # ngircd has no services: the human is known by an explicitly allowed hostmask
    directory = Directory([User("bencher", irc={"bench": IrcIds(hostmasks=("bencher!*@127.0.0.1",))}, roles={"*": frozenset({"admins"})})])
    router = Router(Dispatcher(engine=engine, directory=directory, registry=default_registry()))
    transport = IrcTransport(IrcConfig(name="bench", host="127.0.0.1", port=port, tls=False, nick=nick,
                                       channels=(channel,), **pacing))  # type: ignore[arg-type]
    await router.serve(transport)
    await transport.wait_ready(10)
    return transport


async def run() -> dict[str, float]:
    logging.getLogger("bot").setLevel(logging.WARNING)
    directory = Path(tempfile.mkdtemp(prefix="bench-irc-"))
    try:
        server = start_ngircd(directory, penalties=False)
    except ServerMissing as exc:
        raise SystemExit(str(exc)) from None
    bots: list[IrcTransport] = []
    human: Human | None = None
    engine, store = await ps_engine(directory)
    try:
        # 1. round trips, pacing out of the way
        bot = await _bot(engine, server.port, "benchbot", "#bench", pacing_rate=1e9, pacing_burst=10**9)
        bots.append(bot)
        human = await Human.connect(server.port, "bencher")
        await human.join("#bench")

        async def ps() -> None:
            human.say("#bench", "!ps")
            lines = await human.messages_from("benchbot", INSTANCES, 10)
            assert lines[0].text.startswith("bencher: #") and lines[-1].text.startswith("#"), lines[-1].raw

        for _ in range(WARMUP):
            await ps()
        rtts: list[float] = []
        for _ in range(COMMANDS):
            start = time.perf_counter()
            await ps()
            rtts.append((time.perf_counter() - start) * 1000)
        human.lines.clear()
        human.pos = 0

        # 2. paced output, measured where it arrives
        paced = await _bot(engine, server.port, "pacedbot", "#bench", pacing_rate=PACED_RATE,
                           pacing_burst=PACED_BURST, use_notice=True)
        bots.append(paced)
        await asyncio.sleep(1.0 / PACED_RATE * PACED_BURST)     # let the JOIN's tokens come back
        await paced.send(Room("irc", "bench", "#bench"), "\n".join(f"line {i}" for i in range(PACED_LINES)))
        arrivals: list[float] = []
        for _ in range(PACED_LINES):
            await human.expect(lambda m: m.command == "NOTICE" and m.nick == "pacedbot", 30)
            arrivals.append(time.perf_counter())
        steady = arrivals[PACED_BURST - 1:]          # from the last line of the burst on
        rate = (len(steady) - 1) / (steady[-1] - steady[0])
        return {
            "irc_command_rtt_p50_ms": statistics.median(rtts),
            "irc_command_rtt_p99_ms": _percentile(rtts, 0.99),
            "irc_notice_lines_per_s": rate,
            "irc_disconnects": float(sum(b.disconnects for b in bots)),
        }
    finally:
        if human is not None:
            await human.close()
        for b in bots:
            await b.close(flush_timeout=1)
        server.stop()
        await close(engine, store)
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    for name, value in asyncio.run(run()).items():
        print(f"{name}={value:.2f}", flush=True)


if __name__ == "__main__":
    main()
