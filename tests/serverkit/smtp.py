"""A real SMTP server for the tests and benchmarks: aiosmtpd on 127.0.0.1.

``SmtpSink`` runs aiosmtpd in its own thread with its own event loop (its
``Controller``), so the client under test never shares a loop with it: a
client that blocks its loop stalls only itself, as against a real server.
It listens on a free port, optionally with STARTTLS or TLS from the first
byte (a certificate from ``tests.serverkit.tls``) and AUTH for one test
user, and records every message it accepts (parsed, with its Message-ID),
every connection and every login.  It can be stopped for a while (the
listener and every open connection closed, as a crashed server would) and
started again on the same port, and it answers chosen recipients, MAIL or
DATA with a chosen 4xx or 5xx.  No pytest here: ``bench/`` uses it too.
"""
from __future__ import annotations

import asyncio
import email
import ssl
import threading
import logging
import time
import warnings
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from typing import Any

from tests.serverkit import ServerMissing, free_port
from tests.serverkit.tls import ServerCert



class _NoDeprecationNoise(logging.Filter):
    """aiosmtpd's own AUTH code sets the attribute it deprecates, and logs a warning at every login."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "login_data is deprecated" not in record.getMessage()


logging.getLogger("mail.log").addFilter(_NoDeprecationNoise())

#: Recipients answered with an error by default: a domain (``@refused.test``)
#: or a whole address, to the SMTP reply it gets.
DEFAULT_REFUSALS = {
    "@refused.test": "550 5.1.1 no such user",
    "@busy.test": "451 4.3.0 mailbox busy, try again later",
}


@dataclass(frozen=True)
class Received:
    """One message the sink accepted."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes                    # as received (CRLF line ends), dots unstuffed
    message: EmailMessage         # parsed with the modern email policy
    connection: int               # which connection brought it (1, 2, ...)
    login: str | None             # the user it logged in as, if any
    tls: bool                     # the connection was encrypted (STARTTLS or TLS)

    @property
    def message_id(self) -> str:
        return str(self.message["Message-ID"] or "")


def _encrypted(server: Any, session: Any) -> bool:
    """STARTTLS sets ``session.ssl``; TLS from the first byte shows on the transport only."""
    return session.ssl is not None or server.transport.get_extra_info("ssl_object") is not None


@dataclass
class _Handler:
    sink: "SmtpSink"

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        if self.sink._drop("MAIL"):
            server.transport.abort()
            return "421 4.4.2 gone"         # never written: the connection is closed
        reply = self.sink.mail_reply
        if reply:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        reply = self.sink.reply_for(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.sink.data_delay:
            await asyncio.sleep(self.sink.data_delay)
        reply = self.sink.data_reply
        if reply:
            return reply
        raw = bytes(envelope.original_content or b"")
        parsed = email.message_from_bytes(raw, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        login = session.auth_data if session.authenticated else None
        self.sink._record(Received(envelope.mail_from, tuple(envelope.rcpt_tos), raw, parsed,
                                   getattr(server, "number", 0), login, _encrypted(server, session)))
        if self.sink._drop("DATA"):          # the message was taken, but the answer never comes
            server.transport.abort()
            return "421 4.4.2 gone"
        return "250 OK queued"


@dataclass
class SmtpSink:
    """aiosmtpd on 127.0.0.1 (see the module docstring).  ``security`` is
    ``plaintext``, ``starttls`` (required before MAIL) or ``tls``; ``users``
    maps login to password and makes AUTH required."""

    security: str = "plaintext"
    cert: ServerCert | None = None
    users: dict[str, str] = field(default_factory=dict)
    refusals: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_REFUSALS))
    mail_reply: str | None = None         # e.g. "451 4.3.2 not now": every MAIL answered so
    data_reply: str | None = None         # e.g. "554 5.6.0 rejected": every DATA answered so
    data_delay: float = 0.0               # seconds the server thinks before answering DATA
    # Connections closed without an answer at the next n MAIL or DATA commands, as a server
    # that timed the connection out, or crashed mid-transaction, would.
    drops: dict[str, int] = field(default_factory=lambda: {"MAIL": 0, "DATA": 0})
    host: str = "127.0.0.1"
    port: int = 0
    received: list[Received] = field(default_factory=list)
    connections: int = 0                  # connections accepted so far, over every start
    logins: list[tuple[str, bool]] = field(default_factory=list)   # (user, accepted)

    def __post_init__(self) -> None:
        if self.security not in ("plaintext", "starttls", "tls"):
            raise ValueError(f"security: {self.security!r}")
        if self.security != "plaintext" and self.cert is None:
            raise ValueError("a TLS sink needs a certificate (tests.serverkit.tls)")
        self._lock = threading.Condition()
        self._controller: Any = None
        self._live: set[Any] = set()      # the SMTP protocol objects of open connections

    # --- life -------------------------------------------------------------------

    def start(self) -> "SmtpSink":
        """Listen (on the port used before, after a ``stop``)."""
        try:
            from aiosmtpd.controller import Controller
            from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
        except ImportError as exc:
            raise ServerMissing(f"aiosmtpd is not installed ({exc}): pip install aiosmtpd") from exc
        if self._controller is not None:
            raise RuntimeError("the sink is running")
        if not self.port:
            self.port = free_port()
        sink = self
        tls = self._server_context() if self.security != "plaintext" else None

        def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
            ok = (isinstance(data, LoginPassword)
                  and sink.users.get(data.login.decode()) == data.password.decode())
            with sink._lock:
                sink.logins.append((data.login.decode() if isinstance(data, LoginPassword) else "?", ok))
            return AuthResult(success=ok, handled=False, auth_data=data.login.decode() if ok else None)

        class CountingSMTP(SMTP):  # type: ignore[misc]  # aiosmtpd is untyped
            """Counts a connection at its first EHLO or HELO: the controller's start-up
            probe connects without one, and STARTTLS repeats EHLO on the same connection."""

            number = 0

            def connection_made(self, transport: Any) -> None:
                super().connection_made(transport)
                sink._live.add(self)

            def connection_lost(self, error: Any) -> None:
                sink._live.discard(self)
                super().connection_lost(error)

            def _count(self) -> None:
                if not self.number:
                    with sink._lock:
                        sink.connections += 1
                        self.number = sink.connections

            async def smtp_EHLO(self, hostname: str) -> None:
                self._count()
                await super().smtp_EHLO(hostname)

            async def smtp_HELO(self, hostname: str) -> None:
                self._count()
                await super().smtp_HELO(hostname)

        kwargs: dict[str, Any] = dict(
            hostname=self.host, port=self.port, server_hostname="sink.test", ready_timeout=5.0,
            decode_data=False, enable_SMTPUTF8=False, data_size_limit=None)
        if self.security == "tls":
            kwargs["ssl_context"] = tls
        elif self.security == "starttls":
            kwargs.update(tls_context=tls, require_starttls=True)
        if self.users:
            kwargs.update(authenticator=authenticate, auth_required=True,
                          auth_require_tls=self.security == "starttls")

        class CountingController(Controller):  # type: ignore[misc]
            def factory(self) -> Any:
                with warnings.catch_warnings():     # AUTH without TLS: on loopback, on purpose
                    warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
                    return CountingSMTP(self.handler, **self.SMTP_kwargs)

        controller = CountingController(_Handler(self), **kwargs)
        controller.start()
        self._controller = controller
        return self

    def stop(self) -> None:
        """Close the listener and every open connection, as a crashed server would."""
        controller, self._controller = self._controller, None
        if controller is None:
            return

        done = threading.Event()

        def drop_all() -> None:
            for protocol in list(self._live):
                if protocol.transport is not None:
                    protocol.transport.abort()
            done.set()
        controller.loop.call_soon_threadsafe(drop_all)
        done.wait(2.0)
        controller.stop()
        self._live.clear()

    def restart(self) -> "SmtpSink":
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._controller is not None

    # --- what the tests look at ------------------------------------------------

    def reply_for(self, address: str) -> str | None:
        """The configured refusal for ``address`` (by whole address or by ``@domain``)."""
        address = address.lower()
        return self.refusals.get(address) or self.refusals.get("@" + address.rpartition("@")[2])

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        """Block until ``count`` messages were received; a copy of them all."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.received) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the sink received {len(self.received)} of {count} messages in {timeout}s")
                self._lock.wait(left)
            return list(self.received)

    def _drop(self, command: str) -> bool:
        with self._lock:
            if self.drops.get(command, 0) > 0:
                self.drops[command] -= 1
                return True
        return False

    def _record(self, received: Received) -> None:
        with self._lock:
            self.received.append(received)
            self._lock.notify_all()

    def _server_context(self) -> ssl.SSLContext:
        assert self.cert is not None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(self.cert.cert_file), str(self.cert.key_file))
        return context
