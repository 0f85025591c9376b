#!/usr/bin/env python3
"""Mail out: messages through the email transport to a real aiosmtpd sink on
loopback (``tests/serverkit/smtp``, in its own thread and event loop).

Sent as the outbox sends: 20 destinations in parallel, each with one message
in flight at a time (send, await the receipt, send the next), 1,000 messages
in all after a warm-up, over the one reused connection.  The sink runs in
this process, so it shares the interpreter with the bot: the figures are
lower than against a separate server.  Median of 3 runs.  Prints:

  email_delivered_per_s            plaintext to loopback (goal: >= 200)
  email_delivered_per_s_starttls   STARTTLS with the throwaway CA and AUTH
  email_connections                SMTP connections one run opened (1: reused)
"""
from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]   # bench/bugzilla.py
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))                                       # is not python-bugzilla

from bot.chat import Outgoing, Person  # noqa: E402
from bot.transports.email import EmailConfig, EmailTransport  # noqa: E402
from bot.transports.email.message import mailbox  # noqa: E402
from tests.serverkit.smtp import SmtpSink  # noqa: E402
from tests.serverkit.tls import ServerCert, ThrowawayCA  # noqa: E402

MESSAGES = 1000
DESTINATIONS = 20
WARM_UP = 50
RUNS = 3
PASSWORD = "bench-pw"
BODY = ("The release 2.4.1 of project example is published.\n"
        "Artifacts: https://example.test/releases/2.4.1/\n" * 10)


async def deliver(transport: EmailTransport, count: int) -> float:
    """Seconds to deliver ``count`` messages, outbox-style; every receipt must resolve."""
    per_destination = count // DESTINATIONS

    async def destination(d: int) -> None:
        target = Person(protocol="email", network="bench", user=f"user{d}", accounts=(f"user{d}@example.test",))
        for i in range(per_destination):
            receipt = await transport.send(target, Outgoing(BODY, subject=f"release {d}.{i}",
                                                            message_id=f"<bench.{d}.{i}.{time.time_ns()}@bench.test>"))
            await receipt

    start = time.perf_counter()
    await asyncio.gather(*(destination(d) for d in range(DESTINATIONS)))
    return time.perf_counter() - start


async def one_run(sink: SmtpSink, security: str) -> tuple[float, int]:
    before = len(sink.received)
    cfg = EmailConfig(name="bench", smtp_host="127.0.0.1", smtp_port=sink.port, security=security,
                      sender=mailbox("Release Bot <bot@bench.test>"), helo="bot.bench.test",   # type: ignore[arg-type]
                      user="bot" if security != "plaintext" else None,
                      password=PASSWORD if security != "plaintext" else None,
                      ca_file=str(sink.cert.ca_file) if sink.cert else None, idle_timeout=30.0)
    transport = EmailTransport(cfg)

    async def no_incoming(message: object) -> None:
        return None
    await transport.start(no_incoming)    # type: ignore[arg-type]
    try:
        await deliver(transport, WARM_UP)
        seconds = await deliver(transport, MESSAGES)
        assert len(sink.received) - before == WARM_UP // DESTINATIONS * DESTINATIONS + MESSAGES
        return MESSAGES / seconds, transport.connections
    finally:
        await transport.close()


async def run() -> dict[str, float]:
    results: dict[str, float] = {}
    plain = SmtpSink().start()
    ca_dir = Path(tempfile.mkdtemp(prefix="bench-smtp-ca-"))
    tls: SmtpSink | None = None
    try:
        rates, connections = [], []
        for _ in range(RUNS):
            rate, opened = await one_run(plain, "plaintext")
            rates.append(rate)
            connections.append(opened)
        results["email_delivered_per_s"] = statistics.median(rates)
        results["email_connections"] = max(connections)
        ca = ThrowawayCA.create(ca_dir)
        cert: ServerCert = ca.issue(ca_dir / "smtp")
        tls = SmtpSink(security="starttls", cert=cert, users={"bot": PASSWORD}).start()
        rates = [(await one_run(tls, "starttls"))[0] for _ in range(RUNS)]
        results["email_delivered_per_s_starttls"] = statistics.median(rates)
    finally:
        plain.cleanup()
        if tls is not None:
            tls.cleanup()
        if os.environ.get("KEEP_SERVER_DIRS") != "1":
            shutil.rmtree(ca_dir, ignore_errors=True)
    return results


def main() -> None:
    for name, value in asyncio.run(run()).items():
        print(f"{name}={value:.0f}" if name != "email_connections" else f"{name}={value:g}")


if __name__ == "__main__":
    main()
