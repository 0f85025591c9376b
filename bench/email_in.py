#!/usr/bin/env python3
"""Mail in: the SMTP listener and the IMAP watcher writing into the durable
inbox of a real SQLite store (synchronous=FULL), each mail then read,
identified (a reply to a single-use address) and marked handled in its own
commit, as the dispatcher will.  Clients that are not ours: aiosmtplib for
SMTP, Dovecot's LDA for delivery into a real Dovecot.  Median of 3 runs.
Prints:

  email_in_per_s                 mails over SMTP from 10 connections at once, each
                                 accepted (in SQLite before its 250) and handled
  listener_accept_p50_ms         one client: DATA sent -> 250 (the mail is durable then)
  imap_idle_latency_p50_ms       dovecot-lda exits -> the watcher's callback has the mail
                                 committed (Dovecot's IDLE push takes ~500 ms of it)
  imap_in_per_s                  200 mails waiting in the mailbox at start: fetched,
                                 committed and moved to the processed folder
"""
from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]   # bench/bugzilla.py
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))                                       # is not python-bugzilla

import aiosmtplib  # noqa: E402

from bot.transports.email.imap import FetchedMail, ImapSettings, ImapWatcher  # noqa: E402
from bot.transports.email.inbound import Inbox, Sender, identify  # noqa: E402
from bot.transports.email.listener import ListenerSettings, MailListener, Received  # noqa: E402
from bot.transports.email.parse import parse  # noqa: E402
from bot.transports.email.schema import MIGRATIONS, OWNER  # noqa: E402
from bot.transports.email.tokens import ReplyTokens  # noqa: E402
from engine.participant_runtime import Storage  # noqa: E402
from engine.store import Store  # noqa: E402
from tests.serverkit.dovecot import Dovecot  # noqa: E402

RUNS = 3
SMTP_MAILS = 500
SMTP_CLIENTS = 10
IMAP_MAILS = 200
IDLE_SAMPLES = 8
USERS = {"alice": ["alice@example.org"]}


def mail(n: int, to: str) -> bytes:
    return (f"From: Alice <alice@example.org>\r\nTo: {to}\r\nSubject: Re: Build #{n}\r\n"
            f"Message-ID: <bench.{n}.{time.monotonic_ns()}@example.org>\r\n\r\nstatus {n}\r\n\r\n"
            "On Mon, 1 Jan 2026, Release Bot <bot@example.org> wrote:\r\n> Build failed\r\n").encode()


class Pipeline:
    """A store, the inbox, reply tokens, and a worker that handles pending mail."""

    def __init__(self, directory: Path) -> None:
        self.store = Store(directory / "bot.sqlite3")
        self.handled = 0
        self.wake = asyncio.Event()

    async def open(self) -> "Pipeline":
        self.store.open()
        await self.store.migrate_participant(OWNER, MIGRATIONS)
        self.storage = Storage(self.store, OWNER)
        self.inbox = Inbox(self.storage)
        self.tokens = ReplyTokens(self.storage, "bot@example.org")
        self.address, ops = self.tokens.issue("alice", "thread", "#1", 3600)
        await self.storage.write(*ops)
        return self

    async def work(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            for row in await self.inbox.pending(limit=200):
                m = parse(row.raw, is_command=lambda t: t.startswith("status"), own_addresses=("bot@example.org",))
                who = await identify(m, row.envelope_to, self.tokens, None, USERS)
                ops = [self.inbox.handled(row.id, who.user if isinstance(who, Sender) else who.rule)]
                if isinstance(who, Sender):
                    ops.append(self.tokens.spend(who.token, row.key))
                await self.storage.write(*ops)
                self.handled += 1
                self.wake.set()

    def close(self) -> None:
        self.store.close()


async def smtp_run(directory: Path) -> tuple[float, float]:
    pipe = await Pipeline(directory).open()
    worker = asyncio.ensure_future(pipe.work())

    async def accept(received: Received) -> None:
        await pipe.inbox.accept("smtp", received.raw, envelope_from=received.mail_from,
                                envelope_to=received.rcpt_tos)
        pipe.wake.set()

    listener = MailListener(ListenerSettings(addresses=("bot@example.org",), port=0, rate=10_000), accept)
    await listener.start()
    try:
        # one client, one mail at a time: DATA -> 250
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=listener.port, start_tls=False, use_tls=False)
        await client.connect()
        latencies = []
        for n in range(50):
            body = mail(n, pipe.address)
            started = time.perf_counter()
            await client.sendmail("alice@example.org", [pipe.address], body)
            latencies.append(time.perf_counter() - started)
        await client.quit()
        await until(lambda: pipe.handled == 50)
        # ten clients at once
        per_client = SMTP_MAILS // SMTP_CLIENTS

        async def send_many(c: int) -> None:
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=listener.port, start_tls=False, use_tls=False)
            await smtp.connect()
            for n in range(per_client):
                await smtp.sendmail("alice@example.org", [pipe.address], mail(1000 * (c + 1) + n, pipe.address))
            await smtp.quit()

        started = time.perf_counter()
        await asyncio.gather(*(send_many(c) for c in range(SMTP_CLIENTS)))
        await until(lambda: pipe.handled == 50 + SMTP_MAILS)
        rate = SMTP_MAILS / (time.perf_counter() - started)
        return rate, statistics.median(latencies) * 1000
    finally:
        await listener.stop()
        worker.cancel()
        pipe.close()


async def imap_run(directory: Path) -> tuple[float, float]:
    server = Dovecot().start()
    pipe = await Pipeline(directory).open()
    arrived: list[float] = []
    try:
        for n in range(IMAP_MAILS):
            server.deliver(mail(n, pipe.address))

        async def on_mail(m: FetchedMail) -> None:
            await pipe.inbox.accept("imap", m.raw, fallback_key=m.key)
            arrived.append(time.perf_counter())

        watcher = ImapWatcher(ImapSettings(host="127.0.0.1", port=server.port, tls=False, user="bot@example.test",
                                           password="botpw"), on_mail)
        started = time.perf_counter()
        task = asyncio.ensure_future(watcher.run())
        await until(lambda: watcher.handed_over == IMAP_MAILS, 60)
        rate = IMAP_MAILS / (time.perf_counter() - started)
        latencies = []
        for n in range(IDLE_SAMPLES):
            await until(lambda: watcher.waiting.is_set())
            await asyncio.sleep(0.05)                    # IDLE acknowledged
            before = len(arrived)
            await asyncio.to_thread(server.deliver, mail(10_000 + n, pipe.address))
            delivered = time.perf_counter()
            await until(lambda: len(arrived) > before)
            latencies.append(arrived[-1] - delivered)
        await watcher.stop()
        await asyncio.wait_for(task, 5)
        return rate, statistics.median(latencies) * 1000
    finally:
        pipe.close()
        server.cleanup()


async def until(check, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark stalled")
        await asyncio.sleep(0.002)


def main() -> None:
    figures: dict[str, list[float]] = {}
    for _ in range(RUNS):
        directory = Path(tempfile.mkdtemp(prefix="bench-email-in-"))
        try:
            rate, accept_ms = asyncio.run(smtp_run(directory / "smtp"))
            imap_rate, idle_ms = asyncio.run(imap_run(directory / "imap"))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        for name, value in (("email_in_per_s", rate), ("listener_accept_p50_ms", accept_ms),
                            ("imap_idle_latency_p50_ms", idle_ms), ("imap_in_per_s", imap_rate)):
            figures.setdefault(name, []).append(value)
    for name, values in figures.items():
        print(f"{name}={statistics.median(values):.1f}")


if __name__ == "__main__":
    main()
