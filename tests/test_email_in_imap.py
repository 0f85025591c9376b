"""The IMAP watcher (bot/transports/email/imap.py) against a real Dovecot on
127.0.0.1: mail handed over into the durable inbox of a real SQLite store,
then moved to the processed folder.  Mail arrives through Dovecot's own LDA,
as an MTA would deliver it."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from bot.transports.email.imap import FLAG, FetchedMail, ImapSettings, ImapWatcher
from bot.transports.email.inbound import Inbox
from bot.transports.email.tokens import ReplyTokens
from engine.participant_runtime import Storage
from tests.servers.mailin import Dovecot, handle_pending, hostile_mails

pytestmark = pytest.mark.servers
ROOT = Path(__file__).resolve().parent.parent


def raw(n: int, extra: str = "") -> bytes:
    return (f"From: Alice <alice@example.org>\r\nTo: bot@example.org\r\nSubject: status {n}\r\n"
            f"Message-ID: <m{n}@example.org>\r\n{extra}\r\nstatus {n}\r\n").encode()


def settings(server: Dovecot, **kw: Any) -> ImapSettings:
    options: dict[str, Any] = {"host": "127.0.0.1", "port": server.port, "tls": False, "user": "bot@example.test",
                               "password": "botpw", "timeout": 5.0, "backoff_min": 0.05, "backoff_max": 0.2, **kw}
    return ImapSettings(**options)


Watch = Callable[..., Awaitable[ImapWatcher]]


@pytest.fixture
async def watch() -> AsyncIterator[Watch]:
    """Factory: a running watcher; stopped (and its task awaited) at the end."""
    running: list[tuple[ImapWatcher, asyncio.Task[None]]] = []

    async def start(s: ImapSettings, on_mail: Callable[[FetchedMail], Awaitable[None]],
                    wait_connected: bool = True) -> ImapWatcher:
        watcher = ImapWatcher(s, on_mail)
        running.append((watcher, asyncio.ensure_future(watcher.run())))
        if wait_connected:
            await asyncio.wait_for(watcher.connected.wait(), 10)
        return watcher

    yield start
    for watcher, task in running:
        await watcher.stop()
        try:
            await asyncio.wait_for(task, 5)
        except asyncio.TimeoutError:
            task.cancel()


def into(inbox: Inbox, taken: list[FetchedMail] | None = None) -> Callable[[FetchedMail], Awaitable[None]]:
    async def on_mail(mail: FetchedMail) -> None:
        await inbox.accept("imap", mail.raw, fallback_key=mail.key)
        if taken is not None:
            taken.append(mail)
    return on_mail


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def folder_counts(client: Any) -> tuple[int, int]:
    """(messages in INBOX, messages in Processed) as the server counts them."""
    counts = []
    for box in ("INBOX", "Processed"):
        status = await client.status(box, "(MESSAGES)")
        line = b" ".join(l for l in status.lines if isinstance(l, bytes))
        counts.append(int(line.split(b"MESSAGES ")[1].split(b")")[0]) if b"MESSAGES " in line else -1)
    return counts[0], counts[1]


async def test_mail_that_arrived_while_down_is_taken_once_and_moved(dovecot: Dovecot, email_storage: Storage,
                                                                     watch: Watch, imap_client: Any) -> None:
    for n in range(3):
        dovecot.deliver(raw(n))
    dovecot.deliver(raw(0))                              # the same mail delivered twice: one row
    inbox = Inbox(email_storage)
    taken: list[FetchedMail] = []
    watcher = await watch(settings(dovecot), into(inbox, taken))
    await until(lambda: len(taken) == 4)
    assert [m.uid for m in taken] == [1, 2, 3, 4] and len({m.uidvalidity for m in taken}) == 1
    assert [r.key for r in await inbox.pending()] == ["mid:m0@example.org", "mid:m1@example.org", "mid:m2@example.org"]
    client = await imap_client(dovecot)
    await until(lambda: watcher.handed_over == 4)
    assert await folder_counts(client) == (0, 4)
    await watcher.stop()
    again: list[FetchedMail] = []
    await watch(settings(dovecot), into(inbox, again))   # a restart finds nothing left to take
    dovecot.deliver(raw(7))
    await until(lambda: len(again) == 1)
    assert again[0].raw.endswith(b"status 7\r\n") and len(await inbox.pending()) == 4


async def test_idle_over_tls_hands_new_mail_over(dovecot_tls: Dovecot, email_storage: Storage,
                                                 watch: Watch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)                      # aioimaplib logs every line it sends at DEBUG
    inbox = Inbox(email_storage)
    arrived: list[float] = []

    async def on_mail(mail: FetchedMail) -> None:
        await into(inbox)(mail)
        arrived.append(time.monotonic())

    watcher = await watch(settings(dovecot_tls, port=dovecot_tls.tls_port, tls=True, ca_file=dovecot_tls.ca_file),
                          on_mail)
    assert watcher.idle_supported is True
    latencies = []
    for n in range(2):
        await asyncio.sleep(0.05)                        # the watcher is back in IDLE
        delivered = time.monotonic()
        await asyncio.to_thread(dovecot_tls.deliver, raw(n))
        await until(lambda: len(arrived) == n + 1)
        latencies.append(arrived[-1] - delivered)
    print(f"imap_idle_latency_ms={1000 * max(latencies):.0f}")     # bench/email_in.py measures it properly
    assert len(await inbox.pending()) == 2
    assert "LOGIN bot@example.test" in caplog.text and "botpw" not in caplog.text


async def test_tls_with_an_untrusted_certificate_never_logs_in(dovecot_tls: Dovecot, watch: Watch) -> None:
    taken: list[FetchedMail] = []

    async def on_mail(mail: FetchedMail) -> None:
        taken.append(mail)

    dovecot_tls.deliver(raw(1))
    watcher = await watch(settings(dovecot_tls, port=dovecot_tls.tls_port, tls=True), on_mail, wait_connected=False)
    await asyncio.sleep(0.5)
    assert (watcher.sessions, taken) == (0, [])
    assert "Login: user=<bot@example.test>" not in dovecot_tls.log_text()


def test_plaintext_is_refused_to_anything_but_loopback() -> None:
    with pytest.raises(ValueError, match="password in clear"):
        ImapSettings(host="imap.example.org", port=143, tls=False, user="bot", password="secret")
    with pytest.raises(ValueError, match="must differ"):
        ImapSettings(host="imap.example.org", user="bot", password="s", processed="INBOX")
    assert "secret" not in repr(ImapSettings(host="localhost", tls=False, user="bot", password="secret"))


async def test_without_idle_and_move_it_polls_and_copies(dovecot_basic: Dovecot, email_storage: Storage,
                                                         watch: Watch, imap_client: Any) -> None:
    inbox = Inbox(email_storage)
    taken: list[FetchedMail] = []
    watcher = await watch(settings(dovecot_basic, poll_interval=0.1), into(inbox, taken))
    assert watcher.idle_supported is False
    dovecot_basic.deliver(raw(1))
    dovecot_basic.deliver(raw(2))
    await until(lambda: watcher.handed_over == 2)
    assert await folder_counts(await imap_client(dovecot_basic)) == (0, 2)
    assert "MOVE" not in dovecot_basic.log_text()


async def test_without_a_processed_folder_mail_is_flagged(dovecot: Dovecot, email_storage: Storage,
                                                         watch: Watch, imap_client: Any) -> None:
    dovecot.deliver(raw(1))
    inbox = Inbox(email_storage)
    taken: list[FetchedMail] = []
    watcher = await watch(settings(dovecot, processed=None), into(inbox, taken))
    await until(lambda: watcher.handed_over == 1)
    await watcher.stop()
    client = await imap_client(dovecot)
    await client.select("INBOX")
    flagged = await client.uid_search("KEYWORD", FLAG, charset=None)
    assert flagged.lines[0] == b"1"
    await watch(settings(dovecot, processed=None), into(inbox, taken))
    dovecot.deliver(raw(2))
    await until(lambda: len(taken) == 2)
    assert [m.uid for m in taken] == [1, 2]


async def test_a_mail_the_caller_fails_on_does_not_hold_up_the_others(dovecot: Dovecot, email_storage: Storage,
                                                                     watch: Watch, imap_client: Any) -> None:
    inbox = Inbox(email_storage)
    attempts: list[int] = []

    async def on_mail(mail: FetchedMail) -> None:
        if b"<m1@" in mail.raw:
            attempts.append(mail.uid)
            raise RuntimeError("cannot handle this one")
        await into(inbox)(mail)

    for n in range(3):
        dovecot.deliver(raw(n))
    watcher = await watch(settings(dovecot, backoff_max=60.0), on_mail)
    await until(lambda: watcher.handed_over == 2 and watcher.waiting.is_set())
    assert attempts == [2]
    dovecot.deliver(raw(3))                              # the next pass tries the failed one again, once
    await until(lambda: watcher.handed_over == 3)
    await until(lambda: watcher.waiting.is_set())
    assert attempts == [2, 2]
    assert await folder_counts(await imap_client(dovecot)) == (1, 3)
    await watcher.stop()
    attempts.clear()                                     # a new session: retried after backoff_max, 3 times at most
    watcher = await watch(settings(dovecot, backoff_max=0.05), on_mail)
    await until(lambda: len(attempts) == 3)
    await asyncio.sleep(0.3)
    assert attempts == [2, 2, 2] and watcher.handed_over == 0


async def test_it_reconnects_after_the_server_went_away(dovecot: Dovecot, email_storage: Storage,
                                                        watch: Watch) -> None:
    inbox = Inbox(email_storage)
    taken: list[FetchedMail] = []
    watcher = await watch(settings(dovecot), into(inbox, taken))
    dovecot.kill()
    await until(lambda: not watcher.connected.is_set())
    dovecot.start()
    await until(lambda: watcher.connected.is_set())
    dovecot.deliver(raw(1))
    await until(lambda: len(taken) == 1)
    assert watcher.sessions == 2


async def test_every_hostile_mail_through_imap_is_taken_or_refused(dovecot: Dovecot, email_storage: Storage,
                                                                   watch: Watch) -> None:
    inbox = Inbox(email_storage)
    tokens = ReplyTokens(email_storage, "bot@example.org")
    address, ops = tokens.issue("alice", "thread", "#12", 3600)
    await email_storage.write(*ops)
    cases = hostile_mails(address)
    for case, mail, sender, _ in cases:
        if case == "bounce":                             # as an MTA delivering a bounce writes it
            mail = b"Return-Path: <>\r\n" + mail
        dovecot.deliver(mail, sender=sender or "MAILER-DAEMON")
    taken: list[FetchedMail] = []
    await watch(settings(dovecot), into(inbox, taken))
    await until(lambda: len(taken) == len(cases))
    [big] = [m for m in taken if m.truncated]
    assert big.size > 1_000_000 and len(big.raw) == 1_000_001
    outcomes = await handle_pending(email_storage, inbox, tokens)
    assert outcomes == {f"mid:{case}.0@example.org": expected for case, _, _, expected in cases}


CRASHING = """
import asyncio, os, signal, sys
sys.path.insert(0, {root!r})
from bot.transports.email.imap import ImapSettings, ImapWatcher
from bot.transports.email.inbound import Inbox
from bot.transports.email.schema import MIGRATIONS, OWNER
from engine.participant_runtime import Storage
from engine.store import Store

async def main():
    store = Store({db!r}); store.open()
    await store.migrate_participant(OWNER, MIGRATIONS)
    inbox = Inbox(Storage(store, OWNER))
    async def on_mail(mail):
        await inbox.accept("imap", mail.raw, fallback_key=mail.key)
        if mail.uid == 2:                  # committed, not yet moved
            os.kill(os.getpid(), signal.SIGKILL)
    await ImapWatcher(ImapSettings(host="127.0.0.1", port={port}, tls=False, user="bot@example.test",
                                   password="botpw"), on_mail).run()
asyncio.run(main())
"""


async def test_a_sigkill_between_commit_and_move_loses_nothing_and_keeps_one_row(
        dovecot: Dovecot, tmp_path: Path, watch: Watch, imap_client: Any) -> None:
    for n in range(4):
        dovecot.deliver(raw(n))
    db = tmp_path / "crash" / "bot.sqlite3"
    proc = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", CRASHING.format(
        root=str(ROOT), db=str(db), port=dovecot.port)], capture_output=True, timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert await folder_counts(await imap_client(dovecot)) == (3, 1)     # the first moved, the second not
    from bot.transports.email.schema import MIGRATIONS, OWNER
    from engine.store import Store
    store = Store(db)
    store.open()
    try:
        await store.migrate_participant(OWNER, MIGRATIONS)
        inbox = Inbox(Storage(store, OWNER))
        taken: list[FetchedMail] = []
        watcher = await watch(settings(dovecot), into(inbox, taken))
        await until(lambda: watcher.handed_over == 3)
        assert [m.uid for m in taken] == [2, 3, 4]                     # the second again, harmlessly
        assert [r.key for r in await inbox.pending()] == [f"mid:m{n}@example.org" for n in range(4)]
        await watcher.stop()
    finally:
        store.close()
    assert os.path.exists(db)
