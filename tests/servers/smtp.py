"""Pytest fixtures around the SMTP sink (``tests/serverkit/smtp``): a real
aiosmtpd on 127.0.0.1, plain or with TLS from the throwaway CA.  Without
aiosmtpd the test is skipped (failed under CI)."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest

from tests.servers import need
from tests.serverkit.smtp import DEFAULT_REFUSALS, Received, SmtpSink
from tests.serverkit.tls import ServerCert, ThrowawayCA

__all__ = ["DEFAULT_REFUSALS", "Received", "SmtpSink", "smtp_cert", "smtp_sink", "smtp_sinks"]


@pytest.fixture(scope="session")
def smtp_cert(tls_ca: ThrowawayCA) -> ServerCert:
    """A certificate for localhost and 127.0.0.1, signed by ``tls_ca``."""
    return tls_ca.issue(tls_ca.dir / "smtp")


@pytest.fixture
def smtp_sinks() -> Iterator[Callable[..., SmtpSink]]:
    """Factory: ``smtp_sinks(security="starttls", cert=..., users={...})`` is
    listening; every sink made is stopped after the test."""
    sinks: list[SmtpSink] = []

    def make(**options: Any) -> SmtpSink:
        sink = SmtpSink(**options)
        sinks.append(sink)
        return need(sink.start)

    yield make
    for sink in sinks:
        sink.cleanup()


@pytest.fixture
def smtp_sink(smtp_sinks: Callable[..., SmtpSink]) -> SmtpSink:
    """A plaintext sink without AUTH (the bot may use plaintext to loopback)."""
    return smtp_sinks()
