"""Pytest fixtures for incoming mail: a real Dovecot on 127.0.0.1 (plaintext,
TLS, or one that advertises neither IDLE nor MOVE), the ``swaks`` SMTP client,
and the email front-end's tables in a real SQLite store.  A missing dovecot
or swaks skips the test (fails it under CI)."""
from __future__ import annotations

import base64
import ssl
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import pytest

from bot.transports.email.inbound import Inbox, Sender, identify
from bot.transports.email.parse import MAX_BYTES, parse
from bot.transports.email.schema import MIGRATIONS, OWNER
from bot.transports.email.tokens import ReplyTokens
from bot.transports.email.verify import Trust
from engine.participant_runtime import Storage, check_migrations
from engine.store import Store
from tests.servers import need, require_binary
from tests.serverkit.dovecot import Dovecot
from tests.serverkit.tls import ThrowawayCA

__all__ = ["Dovecot", "dovecot", "dovecot_tls", "dovecot_basic", "email_storage", "handle_pending", "hostile_mails", "imap_client", "swaks"]

#: The capabilities of a server without IDLE and MOVE (and UIDPLUS kept, so the fallback uses UID EXPUNGE).
BASIC_CAPABILITIES = "IMAP4rev1 LITERAL+ UIDPLUS"


def _serve(factory: Callable[[], Dovecot]) -> Iterator[Dovecot]:
    server = need(lambda: factory().start())
    try:
        yield server
    finally:
        server.cleanup()
        assert server.leftover_pids() == [], "a dovecot process was left behind"


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    """Plaintext IMAP on 127.0.0.1 (``dovecot.port``), user bot@example.test / botpw."""
    yield from _serve(Dovecot)


@pytest.fixture
def dovecot_tls(tls_ca: ThrowawayCA) -> Iterator[Dovecot]:
    """IMAPS on ``dovecot_tls.tls_port``, its certificate signed by ``tls_ca``."""
    yield from _serve(lambda: Dovecot(ca=tls_ca))


@pytest.fixture
def dovecot_basic() -> Iterator[Dovecot]:
    """A Dovecot that advertises neither IDLE nor MOVE."""
    yield from _serve(lambda: Dovecot(capabilities=BASIC_CAPABILITIES))


@pytest.fixture
def swaks() -> str:
    return require_binary("swaks")


@pytest.fixture
async def email_storage(tmp_path: Path) -> AsyncIterator[Storage]:
    """The email front-end's tables, migrated, in a real store under ``tmp_path``."""
    check_migrations(OWNER, MIGRATIONS)
    store = Store(tmp_path / "bot.sqlite3")
    store.open()
    try:
        await store.migrate_participant(OWNER, MIGRATIONS)
        yield Storage(store, OWNER)
    finally:
        store.close()


@pytest.fixture
async def imap_client() -> AsyncIterator[Callable[..., Any]]:
    """Factory: ``c = await imap_client(server)``, a logged-in aioimaplib client (the test's own)."""
    import aioimaplib

    clients: list[Any] = []

    async def connect(server: Dovecot, tls: bool = False) -> Any:
        context = ssl.create_default_context(cafile=str(server.ca_file)) if tls else None
        client = aioimaplib.IMAP4(host="127.0.0.1", port=server.tls_port if tls else server.port,
                                  timeout=5, ssl_context=context)
        await client.wait_hello_from_server()
        await client.login("bot@example.test", server.users["bot@example.test"])
        clients.append(client)
        return client

    yield connect
    for client in clients:
        try:
            await client.logout()
        except Exception:
            pass


# -- the hostile mail the issue lists, for every way in --------------------------------

def _mail(headers: list[str], body: bytes) -> bytes:
    return "\r\n".join(headers).encode("latin-1") + b"\r\n\r\n" + body


def hostile_mails(reply_to: str, n: int = 0) -> list[tuple[str, bytes, str, str]]:
    """(case, raw, envelope sender, expected) for each robustness case of the
    issue, with Message-IDs unique per ``n``.  ``reply_to`` is a thread reply
    address issued to alice; ``expected`` is "alice" (her command runs) or the
    ``inbound.Refused.rule`` the mail must get.  The over-size case is 1.2 MB."""
    def head(case: str, *extra: str, sender: str = "Alice <alice@example.org>", to: str = reply_to) -> list[str]:
        return [f"From: {sender}", f"To: {to}", f"Subject: Re: Build #12 ({case})",
                f"Message-ID: <{case}.{n}@example.org>", *extra]

    html = b"<html><body><p>status&nbsp;12</p><blockquote>launch evil</blockquote></body></html>"
    report = (b"--r\r\nContent-Type: text/plain\r\n\r\nDelivery failed.\r\n--r\r\n"
              b"Content-Type: message/delivery-status\r\n\r\nStatus: 5.1.1\r\n--r--\r\n")
    return [
        ("plain", _mail(head("plain"), b"status 12\r\n"), "alice@example.org", "alice"),
        ("html-only", _mail(head("html-only", "MIME-Version: 1.0", "Content-Type: multipart/alternative; boundary=b"),
                            b"--b\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                            + base64.encodebytes(html).replace(b"\n", b"\r\n") + b"--b--\r\n"),
         "alice@example.org", "alice"),
        ("quoted-printable", _mail(head("quoted-printable", "Content-Type: text/plain; charset=iso-8859-1",
                                        "Content-Transfer-Encoding: quoted-printable"),
                                   b"status =E4=\r\n12\r\n"), "alice@example.org", "alice"),
        ("broken-charset", _mail(head("broken-charset", "Content-Type: text/plain; charset=x-broken-8"),
                                 b"status 12 \xff\xfe\r\n"), "alice@example.org", "alice"),
        ("10000-lines", _mail(head("10000-lines"), b"status 12\r\n" + b"a line of text\r\n" * 10_000),
         "alice@example.org", "alice"),
        ("over-size", _mail(head("over-size"), b"status 12\r\n" + (b"y" * 78 + b"\r\n") * 15_000),
         "alice@example.org", "refused"),
        ("no-from", _mail(head("no-from")[1:], b"status 12\r\n"), "alice@example.org", "refused"),
        ("two-froms", _mail(head("two-froms", "From: mallory@evil.test"), b"status 12\r\n"),
         "alice@example.org", "refused"),
        ("display-name-trick", _mail(head("display-name-trick", sender='"alice@example.org" <mallory@evil.test>'),
                                     b"status 12\r\n"), "mallory@evil.test", "token_replayed"),
        ("own-mail", _mail(head("own-mail", "Auto-Submitted: auto-generated", sender="Release Bot <bot@example.org>",
                                to="alice@example.org"), b"status 12\r\n"), "bot@example.org", "loop"),
        ("auto-reply", _mail(head("auto-reply", "Auto-Submitted: auto-replied"), b"I am away\r\n"),
         "alice@example.org", "loop"),
        ("bulk", _mail(head("bulk", "Precedence: bulk"), b"status 12\r\n"), "alice@example.org", "loop"),
        ("bounce", _mail(head("bounce", "Content-Type: multipart/report; report-type=delivery-status; boundary=r",
                              sender="MAILER-DAEMON@mx.example.org"), report), "", "loop"),
    ]


USERS = {"alice": ["alice@example.org"], "bob": ["bob@example.org"]}


def is_command(text: str) -> bool:
    return text.split(maxsplit=1)[0].lower() in ("status", "launch", "whoami") if text.strip() else False


async def handle_pending(storage: Storage, inbox: Inbox, tokens: ReplyTokens, trust: Trust | None = None,
                         max_bytes: int = MAX_BYTES) -> dict[str, str]:
    """What the dispatcher does with accepted mail, reduced to its bones: each
    pending mail is read, its sender identified, and the outcome committed with
    the mail's handled mark (and its reply address spent).  Returns
    {subject: outcome}, the outcome being the user or the refusal's rule."""
    outcomes: dict[str, str] = {}
    for row in await inbox.pending(limit=1000):
        mail = parse(row.raw, is_command=is_command, own_addresses=("bot@example.org",),
                     envelope_from=row.envelope_from if row.source == "smtp" else None, max_bytes=max_bytes)
        who = await identify(mail, row.envelope_to, tokens, trust, USERS)
        outcome = who.user if isinstance(who, Sender) else who.rule
        ops = [inbox.handled(row.id, outcome)]
        if isinstance(who, Sender) and who.token:
            ops.append(tokens.spend(who.token, row.key))
        await storage.write(*ops)
        outcomes[row.key] = outcome
    return outcomes
