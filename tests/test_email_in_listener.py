"""The SMTP listener (bot/transports/email/listener.py) on 127.0.0.1, driven
by ``swaks``, an SMTP client that is not ours, writing into the durable inbox
of a real SQLite store."""
from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import pytest

from bot.transports.email.inbound import Inbox
from bot.transports.email.listener import ListenerSettings, MailListener, Received
from bot.transports.email.tokens import ReplyTokens
from engine.participant_runtime import Storage
from tests.servers.mailin import handle_pending, hostile_mails

pytestmark = pytest.mark.servers


class Swaks:
    def __init__(self, binary: str, port: int, tmp: Path) -> None:
        self.binary, self.port, self.tmp, self.count = binary, port, tmp, 0

    async def send(self, raw: bytes | None = None, mail_from: str = "alice@example.org",
                   to: str = "bot@example.org", *extra: str) -> tuple[int, str]:
        """swaks' exit code and the server's last answer before QUIT."""
        args = [self.binary, "--server", "127.0.0.1", "--port", str(self.port), "--from", mail_from or "<>",
                "--to", to, "--timeout", "10", *extra]
        if raw is not None:
            self.count += 1
            path = self.tmp / f"mail{self.count}.eml"
            path.write_bytes(raw)
            args += ["--data", f"@{path}"]
        result = await asyncio.to_thread(subprocess.run, args, capture_output=True, timeout=30)
        answers = [line for line in result.stdout.decode(errors="replace").splitlines()
                   if line.startswith(("<-", "<**")) and "221" not in line]
        return result.returncode, answers[-1].split(None, 1)[1] if answers else ""


Start = Callable[..., Awaitable[tuple[MailListener, Swaks]]]


@pytest.fixture
async def listen(swaks: str, tmp_path: Path) -> AsyncIterator[Start]:
    listeners: list[MailListener] = []

    async def start(accept: Callable[[Received], Awaitable[None]], **settings: object) -> tuple[MailListener, Swaks]:
        options: dict = {"addresses": ("bot@example.org",), "port": 0, **settings}
        listener = MailListener(ListenerSettings(**options), accept)
        await listener.start()
        listeners.append(listener)
        return listener, Swaks(swaks, listener.port, tmp_path)

    yield start
    for listener in listeners:
        await listener.stop()


def into(inbox: Inbox) -> Callable[[Received], Awaitable[None]]:
    async def accept(mail: Received) -> None:
        await inbox.accept("smtp", mail.raw, envelope_from=mail.mail_from, envelope_to=mail.rcpt_tos)
    return accept


async def test_every_hostile_mail_is_taken_or_refused_and_none_blocks_the_others(
        listen: Start, email_storage: Storage) -> None:
    inbox = Inbox(email_storage)
    tokens = ReplyTokens(email_storage, "bot@example.org")
    address, ops = tokens.issue("alice", "thread", "#12", 3600)
    await email_storage.write(*ops)
    _, swaks = await listen(into(inbox))
    expected: dict[str, str] = {}
    for case, raw, sender, outcome in hostile_mails(address):
        rc, answer = await swaks.send(raw, sender, address)
        if case == "over-size":
            assert (rc, answer[:3]) == (26, "552"), answer      # refused during DATA, nothing stored
            continue
        assert (rc, answer[:3]) == (0, "250"), (case, answer)
        expected[f"mid:{case}.0@example.org"] = outcome
    outcomes = await handle_pending(email_storage, inbox, tokens)
    assert outcomes == expected
    assert await inbox.count() == (0, len(expected))


async def test_a_mail_is_in_sqlite_before_the_250(listen: Start, email_storage: Storage) -> None:
    inbox = Inbox(email_storage)
    release = asyncio.Event()
    seen: list[int] = []

    async def slow(mail: Received) -> None:
        await into(inbox)(mail)
        seen.append(len(await inbox.pending()))
        await release.wait()

    _, swaks = await listen(slow)
    sending = asyncio.ensure_future(swaks.send(None, "alice@example.org", "bot+abc@example.org"))
    for _ in range(200):
        if seen:
            break
        await asyncio.sleep(0.02)
    assert seen == [1] and not sending.done()          # written, and swaks still waits for its answer
    release.set()
    assert await sending == (0, "250 2.0.0 Message accepted")


async def test_a_mail_that_cannot_be_stored_gets_451_and_nothing_is_kept(listen: Start) -> None:
    async def broken(mail: Received) -> None:
        raise OSError("disk full")

    _, swaks = await listen(broken)
    rc, answer = await swaks.send()
    assert rc != 0 and answer.startswith("451 4.3.0")


async def test_only_the_bots_addresses_are_accepted(listen: Start, email_storage: Storage) -> None:
    inbox = Inbox(email_storage)
    _, swaks = await listen(into(inbox), addresses=("bot@example.org", "releases@example.org"))
    # a source route is dropped (RFC 5321 4.1.1.3 lets a server ignore it): the mail stays here
    for to in ("BOT@Example.ORG", "bot+k7qd2m9xw4ab@example.org", "releases@example.org", "@relay.test:bot@example.org"):
        assert (await swaks.send(None, "alice@example.org", to))[0] == 0, to
    for to in ("alice@example.org", "bot@evil.test", "bot@example.org.evil.test", "postmaster@example.org",
               "bot%evil.test@example.org", "bot+@evil.test"):
        rc, answer = await swaks.send(None, "alice@example.org", to)
        assert rc != 0 and answer[:3] in ("550", "553", "501"), (to, answer)
    assert len(await inbox.pending()) == 4


async def test_an_over_size_mail_gets_552_and_the_size_parameter_is_checked(listen: Start,
                                                                            email_storage: Storage) -> None:
    inbox = Inbox(email_storage)
    _, swaks = await listen(into(inbox), max_size=10_000)
    head = b"From: alice@example.org\r\nSubject: big\r\n\r\n"
    rc, answer = await swaks.send(head + (b"x" * 70 + b"\r\n") * 150)        # 10.8 kB
    assert rc != 0 and answer.startswith("552"), answer
    assert (await swaks.send(head + (b"x" * 70 + b"\r\n") * 130))[0] == 0   # 9.4 kB
    assert len(await inbox.pending()) == 1


async def test_a_sender_over_its_rate_gets_450(listen: Start, email_storage: Storage) -> None:
    inbox = Inbox(email_storage)
    _, swaks = await listen(into(inbox), rate=2, window=3600.0)
    assert [(await swaks.send())[0] for _ in range(2)] == [0, 0]
    rc, answer = await swaks.send()
    assert rc != 0 and answer.startswith("450 4.7.1"), answer
    assert (await swaks.send(None, "bob@example.org"))[0] == 0          # others are not held up


async def test_a_retried_mail_is_kept_once_and_a_bounce_is_never_answered(listen: Start,
                                                                          email_storage: Storage) -> None:
    inbox = Inbox(email_storage)
    tokens = ReplyTokens(email_storage, "bot@example.org")
    _, swaks = await listen(into(inbox))
    raw = b"From: alice@example.org\r\nTo: bot@example.org\r\nMessage-ID: <same@example.org>\r\n" \
          b"Subject: status 1\r\n\r\nstatus 1\r\n"
    assert (await swaks.send(raw))[0] == 0
    assert (await swaks.send(raw))[0] == 0              # as after a 250 that was lost on the way
    bounce = raw.replace(b"<same@", b"<bounce@")
    assert (await swaks.send(bounce, ""))[0] == 0
    rows = await inbox.pending()
    assert [(r.key, r.envelope_from) for r in rows] == [("mid:same@example.org", "alice@example.org"),
                                                       ("mid:bounce@example.org", "")]
    outcomes = await handle_pending(email_storage, inbox, tokens)
    assert outcomes == {"mid:same@example.org": "unverified", "mid:bounce@example.org": "loop"}
