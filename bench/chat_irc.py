#!/usr/bin/env python3
"""IRC front-end benchmark against real servers started here: ngircd with
``MaxPenaltyTime = 0`` (the server does not throttle, so the bot is measured)
and, for fairness, InspIRCd's DEFAULT connect class (which does throttle).

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
  irc_fair_wait_ms_p99               another user's one-line answer (``help whoami`` in a
                                     channel), timed from send to arrival, while the bot
                                     drains a 200-line private answer (capped to
                                     max_queued_lines, topped up) at the default pacing
                                     (1 line/s, burst 5) on InspIRCd's DEFAULT connect
                                     class; FAIR_SAMPLES commands at random moments
                                     (target <= 2000: a one-line answer waits for at
                                     most one token)
  irc_receipt_ms_p50 / _p99          from ``send`` of a one-line message to #bench to its
                                     receipt resolving (ngircd has no echo-message: the
                                     answer to the marker PING written after it), RECEIPTS
                                     messages one at a time, as the outbox sends, after a
                                     warm-up; bot pacing effectively off
  irc_disconnects                    connections the bots lost meanwhile (must be 0)

``python bench/chat_irc.py`` prints ``name=value`` lines.
"""
from __future__ import annotations

import asyncio
import logging
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]   # bench/bugzilla.py
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))                                       # is not python-bugzilla

from bench.chat_common import INSTANCES, close, ps_engine  # noqa: E402
from bot.access import Directory, IrcIds, User  # noqa: E402
from bot.chat import Identity, Room  # noqa: E402
from bot.commands import Dispatcher, default_registry  # noqa: E402
from bot.router import Router  # noqa: E402
from bot.transports.irc import IrcConfig, IrcTransport  # noqa: E402
from engine.engine import Engine  # noqa: E402
from tests.serverkit import ServerMissing  # noqa: E402
from tests.serverkit.irc import Human, start_inspircd_anope, start_ngircd  # noqa: E402

COMMANDS = 1000
RECEIPTS = 1000
WARMUP = 50
PACED_LINES = 60
PACED_RATE = 10.0
PACED_BURST = 5
FAIR_SAMPLES = 30
FLOOD_LINES = 200


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
            assert human is not None
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
        # 2. receipts: one message at a time, awaited
        room = Room("irc", "bench", "#bench")
        receipts: list[float] = []
        for i in range(WARMUP + RECEIPTS):
            start = time.perf_counter()
            await asyncio.wait_for(await bot.send(room, f"receipt {i}"), 10)
            if i >= WARMUP:
                receipts.append((time.perf_counter() - start) * 1000)
        await human.expect(lambda m: m.text == f"receipt {WARMUP + RECEIPTS - 1}", 10)
        human.lines.clear()
        human.pos = 0

        # 3. paced output, measured where it arrives
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

        # 4. fairness, on a server that enforces flood limits
        waits = await _fair_waits(engine, directory, bots)
        return {
            "irc_command_rtt_p50_ms": statistics.median(rtts),
            "irc_command_rtt_p99_ms": _percentile(rtts, 0.99),
            "irc_notice_lines_per_s": rate,
            "irc_fair_wait_ms_p99": _percentile(waits, 0.99),
            "irc_receipt_ms_p50": statistics.median(receipts),
            "irc_receipt_ms_p99": _percentile(receipts, 0.99),
            "irc_disconnects": float(sum(b.disconnects for b in bots)),
        }
    finally:
        if human is not None:
            await human.close()
        for b in bots:
            await b.close(flush_timeout=0)
        server.stop()
        await close(engine, store)
        shutil.rmtree(directory, ignore_errors=True)


async def _fair_waits(engine: Engine, directory: Path, bots: list[IrcTransport]) -> list[float]:
    """Milliseconds from ``!help whoami`` to its answer while another user's long
    answer drains at the default pacing (see the module docstring)."""
    try:
        insp = start_inspircd_anope("bench-insp-", services=False)
    except ServerMissing as exc:
        raise SystemExit(str(exc)) from None
    clients: list[Human] = []
    try:
        bot = await _bot(engine, insp.port, "fairbot", "#fair")          # default pacing
        bots.append(bot)
        flooder, asker = await asyncio.gather(Human.connect(insp.helper_port, "flooder"),
                                              Human.connect(insp.helper_port, "asker"))
        clients += [flooder, asker]
        await asyncio.gather(flooder.join("#fair"), asker.join("#fair"))
        flood = Identity("irc", "bench", "flooder")
        rng = random.Random(7)
        waits: list[float] = []
        for _ in range(FAIR_SAMPLES):
            if bot.pending() < FLOOD_LINES // 10:                         # keep a long answer draining
                await bot.send(flood, "\n".join(f"flood {i:03d}" for i in range(FLOOD_LINES)))
            await asyncio.sleep(rng.uniform(0.2, 1.5))                    # a random moment of the pacing
            start = time.perf_counter()
            asker.say("#fair", "!help whoami")
            await asker.expect(lambda m: m.command == "PRIVMSG" and m.nick == "fairbot"
                               and m.text.startswith("asker: whoami"), 30)
            waits.append((time.perf_counter() - start) * 1000)
        assert bot.disconnects == 0 and bot.connected
        logging.getLogger("bot.transports.irc").setLevel(logging.ERROR)   # the flood left undelivered: expected
        await bot.close(flush_timeout=0)          # before its server goes (and the flooder with it)
        return waits
    finally:
        for client in clients:
            await client.close()
        insp.cleanup()


def main() -> None:
    for name, value in asyncio.run(run()).items():
        print(f"{name}={value:.2f}", flush=True)


if __name__ == "__main__":
    main()
