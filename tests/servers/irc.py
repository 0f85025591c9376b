"""Pytest fixtures around the real IRC servers of ``tests/serverkit/irc.py``
(ngircd, InspIRCd 3 + Anope 2).  A missing server skips its tests on a
laptop and fails them under CI (``tests.servers.need``).

The InspIRCd pair takes ~3 s to link, so it is started once per session;
tests register their NickServ accounts through it (``insp.register``).  A
test that stops or restarts its servers gets a pair of its own
(``own_inspircd_anope``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.servers import need
from tests.servers.tls import ThrowawayCA
from tests.serverkit.irc import (Human, InspircdAnope, IrcLine, Ngircd, RawClient, parse_line,
                                 start_inspircd_anope, start_ngircd)

__all__ = ["Human", "InspircdAnope", "IrcLine", "Ngircd", "RawClient", "inspircd_anope", "ngircd", "ngircd_tls",
           "own_inspircd_anope", "parse_line"]


@pytest.fixture
def ngircd(tmp_path: Path) -> Iterator[Ngircd]:
    """A fresh ngircd per test, without flood penalties (ready in ~25 ms)."""
    server = need(lambda: start_ngircd(tmp_path / "ngircd"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ngircd_tls(tmp_path: Path, tls_ca: ThrowawayCA) -> Iterator[Ngircd]:
    """An ngircd with a plain ``port`` and a TLS ``tls_port``; its certificate
    (for 127.0.0.1 and localhost) is signed by ``tls_ca``, which no system trusts.
    ngircd reads it as root, before it drops to ``nobody``."""
    server = need(lambda: start_ngircd(tmp_path / "ngircd", tls=tls_ca.issue(tmp_path / "certs")))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def inspircd_anope() -> Iterator[InspircdAnope]:
    """One InspIRCd + Anope pair for the whole session (linked in ~3 s)."""
    pair = need(lambda: start_inspircd_anope("irc-insp-"))
    try:
        yield pair
    finally:
        pair.cleanup()


@pytest.fixture
def own_inspircd_anope() -> Iterator[InspircdAnope]:
    """A pair of the test's own, to stop and restart (``kill_ircd``,
    ``stop_services`` ...) without disturbing the session's pair."""
    pair = need(lambda: start_inspircd_anope("irc-insp-own-"))
    try:
        yield pair
    finally:
        pair.cleanup()
