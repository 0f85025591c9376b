"""Pytest fixtures for incoming mail: a real Dovecot on 127.0.0.1 (plaintext,
TLS, or one that advertises neither IDLE nor MOVE), the ``swaks`` SMTP client,
and the email front-end's tables in a real SQLite store.  A missing dovecot
or swaks skips the test (fails it under CI)."""
from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import pytest

from bot.transports.email.schema import MIGRATIONS, OWNER
from engine.participant_runtime import Storage, check_migrations
from engine.store import Store
from tests.servers import need, require_binary
from tests.serverkit.dovecot import Dovecot
from tests.serverkit.tls import ThrowawayCA

__all__ = ["Dovecot", "dovecot", "dovecot_tls", "dovecot_basic", "email_storage", "imap_client", "swaks"]

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
