#!/usr/bin/env python3
"""XMPP command round trip against a real Prosody started here (loopback).

The real front-end (Router + Dispatcher + XmppTransport, pacing effectively
off) and a real slixmpp client that sends 1,000 ``ps`` direct messages one
at a time, answered from a real engine and SQLite file (3 waiting instances:
3 lines, in one message), each timed from send to the reply arriving, after a
warm-up (the first message on a connection costs ~40 ms).  Then 1,000
one-line messages from the bot to alice, one at a time as the outbox sends
them, each timed from ``send`` to its receipt resolving (the server's
XEP-0198 ack), and the same against a Prosody without stream management
(confirmed by a ping written after the message).  Prints:

  xmpp_command_rtt_p50_ms / xmpp_command_rtt_p99_ms
  xmpp_receipt_ms_p50 / xmpp_receipt_ms_p99                 (XEP-0198 acks)
  xmpp_receipt_ping_ms_p50 / xmpp_receipt_ping_ms_p99       (no stream management)
"""
from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]   # bench/bugzilla.py
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))                                       # is not python-bugzilla

from bench.chat_common import INSTANCES, close, ps_engine  # noqa: E402
from bot.access import Directory, User  # noqa: E402
from bot.chat import Identity, Message  # noqa: E402
from bot.commands import Dispatcher, default_registry  # noqa: E402
from bot.router import Router  # noqa: E402
from bot.transports.xmpp import XmppConfig, XmppTransport  # noqa: E402
from tests.serverkit.xmpp import Human, Prosody  # noqa: E402

COMMANDS = 1000
RECEIPTS = 1000
WARM_UP = 50


def percentiles(name: str, samples: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {f"{name}_p50": statistics.median(samples), f"{name}_p99": cuts[98]}


async def receipt_times(transport: XmppTransport, to: Identity) -> list[float]:
    """Milliseconds from send() to the receipt resolving, one message at a time."""
    times: list[float] = []
    for i in range(WARM_UP + RECEIPTS):
        t0 = time.perf_counter()
        await (await transport.send(to, f"notification {i}"))
        if i >= WARM_UP:
            times.append((time.perf_counter() - t0) * 1000)
    return times


async def receipts_without_sm() -> dict[str, float]:
    server = Prosody(smacks=False).start()
    transport = XmppTransport(XmppConfig(name="bench", jid=server.jid("bot"), password=server.users["bot"],
                                         host="127.0.0.1", port=server.port, tls="plaintext",
                                         rate=1e9, burst=1_000_000))
    try:
        async def nothing(message: Message) -> None:
            pass
        await transport.start(nothing)
        return percentiles("xmpp_receipt_ping_ms",
                           await receipt_times(transport, Identity("xmpp", "bench", server.jid("alice"))))
    finally:
        await transport.close()
        server.cleanup()


async def run() -> dict[str, float]:
    server = Prosody().start()
    transport: XmppTransport | None = None
    alice: Human | None = None
    directory = Path(tempfile.mkdtemp(prefix="bench-xmpp-"))
    engine, store = await ps_engine(directory)
    try:
        cfg = XmppConfig(name="bench", jid=server.jid("bot"), password=server.users["bot"],
                         host="127.0.0.1", port=server.port, tls="plaintext",
                         rate=1e9, burst=1_000_000)                        # pacing effectively off
        transport = XmppTransport(cfg)
        users = Directory([User("alice", xmpp_jids=(server.jid("alice"),), roles={"*": frozenset({"admins"})})])
        router = Router(Dispatcher(engine=engine, directory=users, registry=default_registry()))
        await router.serve(transport)
        alice = await Human(server, "alice").connect()
        bot = server.jid("bot")
        human = alice

        async def ps() -> None:
            human.dm(bot, "ps")
            reply = await human.expect(lambda m: m.sender.split("/")[0] == bot and m.type == "chat")
            assert len(reply.body.split("\n")) == INSTANCES, reply     # one message carries the answer

        for _ in range(WARM_UP):
            await ps()
        rtts: list[float] = []
        for _ in range(COMMANDS):
            t0 = time.perf_counter()
            await ps()
            rtts.append((time.perf_counter() - t0) * 1000)
        cuts = statistics.quantiles(rtts, n=100, method="inclusive")
        results = {"xmpp_command_rtt_p50_ms": statistics.median(rtts), "xmpp_command_rtt_p99_ms": cuts[98]}
        results.update(percentiles("xmpp_receipt_ms",
                                   await receipt_times(transport, Identity("xmpp", "bench", server.jid("alice")))))
        results.update(await receipts_without_sm())
        return results
    finally:
        if alice is not None:
            await alice.close()
        if transport is not None:
            await transport.close()
        server.cleanup()
        await close(engine, store)
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    for name, value in asyncio.run(run()).items():
        print(f"{name}={value:.2f}", flush=True)


if __name__ == "__main__":
    main()
