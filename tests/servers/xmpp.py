"""Pytest fixtures around the XMPP server kit (``tests/serverkit/xmpp``): a
real Prosody on 127.0.0.1 per test and connected humans.  A missing prosody
skips the test (fails it under CI)."""
from __future__ import annotations

from typing import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from tests.servers import need
from tests.serverkit.tls import ThrowawayCA
from tests.serverkit.xmpp import DOMAIN, MUC, USERS, CuttableProxy, Human, Prosody, Received

__all__ = ["DOMAIN", "MUC", "USERS", "CuttableProxy", "Human", "Prosody", "Received", "prosody", "prosody_without_sm", "prosody_tls",
           "xmpp_human"]


def _serve(server_factory: Callable[[], Prosody]) -> Iterator[Prosody]:
    server = need(lambda: server_factory().start())
    try:
        yield server
    finally:
        server.cleanup()
        assert server.leftover_pids() == [], "a prosody process was left behind"


@pytest.fixture
def prosody() -> Iterator[Prosody]:
    yield from _serve(Prosody)


@pytest.fixture
def prosody_without_sm() -> Iterator[Prosody]:
    """A Prosody without XEP-0198 stream management (no ``smacks``)."""
    yield from _serve(lambda: Prosody(smacks=False))


@pytest.fixture
def prosody_tls(tls_ca: ThrowawayCA) -> Iterator[Prosody]:
    """A Prosody that requires STARTTLS; its certificate is signed by ``tls_ca``
    (``prosody_tls.ca_file``), which no system trusts."""
    yield from _serve(lambda: Prosody(tls=True, ca=tls_ca))


@pytest.fixture
async def xmpp_human(prosody: Prosody) -> AsyncIterator[Callable[[str], Awaitable[Human]]]:
    """Factory: ``alice = await xmpp_human("alice")`` is connected and online."""
    humans: list[Human] = []

    async def connect(user: str) -> Human:
        human = await Human(prosody, user).connect()
        humans.append(human)
        return human

    yield connect
    for human in humans:
        await human.close()
