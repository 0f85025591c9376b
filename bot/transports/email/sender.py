"""Sending mail over SMTP with aiosmtplib: one connection, reused for a batch.

Messages are sent one after another over one connection: whatever is queued
while it is open goes over it, and it is closed (QUIT) once it has been idle
for ``idle_timeout``, to be reopened by the next message.  Every message gets
its own SMTP transaction (MAIL, RCPT per address, DATA), and its receipt is
settled by the server's answer:

* 250 after DATA: resolved, the server has taken responsibility for it;
* a 4xx answer to MAIL, RCPT or DATA: ``NotDelivered`` with the server's
  text (it said "try later"); the outbox tries again;
* a 5xx answer: ``Undeliverable`` with the server's code and text, among them
  a refused recipient; a message goes to all of a person's addresses or to
  none (an address refused means no DATA), so a retry never repeats it;
* the connection cannot be opened, breaks, or times out, or TLS fails:
  ``NotDelivered``, and so does every message that was waiting for the same
  connection (they would fail the same way; the outbox tries again later).

A refused login (535, and 530 "authentication required") is a configuration
error, not a property of the message: the messages are ``NotDelivered`` (kept,
to go out once the credentials are fixed and the bot restarted) and the sender
holds off for ``AUTH_HOLD`` seconds before logging in again, since repeated
bad logins can get the account locked.  It says so in the log once.

After an error answer the transaction is reset (RSET), or the connection is
dropped if that fails, so the next message starts clean.  A connection found
closed by the server at the first command of a message (it timed out while
idle) is reopened once for that message: nothing of it had reached the server.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import aiosmtplib

from bot.chat import NotDelivered, TransportError, Undeliverable
from bot.logsafety import sanitise
from bot.transports.email.config import EmailConfig

log = logging.getLogger(__name__)

#: After a refused login, this many seconds pass before the next attempt.
AUTH_HOLD = 300.0
#: Answers that mean "your login is wrong or missing": 530 authentication
#: required, 534 mechanism too weak, 535 credentials invalid, 538 encryption
#: required for the mechanism (RFC 4954).
AUTH_CODES = frozenset({530, 534, 535, 538})


@dataclass
class Job:
    """One message on its way: its envelope, its bytes, and its receipt."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes
    receipt: asyncio.Future[None]
    label: str                       # its Message-ID, for logs


class AuthRefused(Exception):
    """The server refused the login (or wants one that is not configured)."""


class Sender:
    """The SMTP client of one email network (see the module docstring)."""

    def __init__(self, config: EmailConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.connections = 0             # connections opened so far
        self.delivered = 0               # messages the server accepted
        self._clock = clock
        self._where = f"email {config.name}"
        self._server = f"{config.smtp_host}:{config.port}"
        self._queue: deque[Job] = deque()
        self._current: Job | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()     # nothing queued, nothing in flight
        self._idle.set()
        self._worker: asyncio.Task[None] | None = None
        self._smtp: aiosmtplib.SMTP | None = None
        self._tls: ssl.SSLContext | None = None
        self._helo = config.helo
        self._held_until = 0.0
        self._held_reason = ""
        self._stage = "MAIL FROM"        # how far the current transaction got
        self._trouble = ""               # the last connection problem logged, until a delivery succeeds
        self._closed = False

    # --- what the transport uses -------------------------------------------

    @property
    def held(self) -> bool:
        """The server refused the login a short while ago: not trying again yet."""
        return self._clock() < self._held_until

    def submit(self, job: Job) -> None:
        """Queue ``job``; its receipt settles when the server has answered."""
        if self._closed:
            self._settle(job, NotDelivered(f"{self._where}: closed"))
            return
        if self.held:
            self._settle(job, NotDelivered(self._held_reason))
            return
        self._queue.append(job)
        self._idle.clear()
        self._wake.set()
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name=f"{self._where} sender")

    async def close(self, flush_timeout: float = 2.0) -> None:
        """Send what is queued if the server takes it within ``flush_timeout``,
        then fail the rest with NotDelivered and say goodbye (QUIT)."""
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.wait_for(self._idle.wait(), flush_timeout)
        except asyncio.TimeoutError:
            pass
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        closed = NotDelivered(f"{self._where}: closed before the server confirmed the message")
        if self._current is not None:     # cut off mid-transaction: no QUIT on a connection in that state
            self._settle(self._current, closed)
            self._current = None
            self._drop()
        self._fail_queued(closed)
        await self._disconnect()

    # --- the worker ----------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                if self._smtp is None:
                    await self._wake.wait()
                else:
                    try:
                        await asyncio.wait_for(self._wake.wait(), self.config.idle_timeout)
                    except asyncio.TimeoutError:
                        await self._disconnect()
                continue
            job = self._queue.popleft()
            if job.receipt.done():          # the caller gave up on it
                continue
            self._current = job
            try:
                await self._deliver(job)
            except Exception as exc:  # a bug must not stop every later message
                log.exception("%s: sending %s failed", self._where, sanitise(job.label))
                self._drop()
                self._settle(job, NotDelivered(f"{self._where}: internal error ({type(exc).__name__})"))
            self._current = None

    async def _deliver(self, job: Job) -> None:
        for attempt in (1, 2):
            reused = self._smtp is not None and self._smtp.is_connected
            if not reused:
                self._drop()
                try:
                    await self._connect()
                except AuthRefused as exc:
                    self._hold(str(exc))
                    self._settle(job, NotDelivered(self._held_reason))
                    self._fail_queued(NotDelivered(self._held_reason))
                    return
                except (aiosmtplib.SMTPException, OSError) as exc:
                    self._drop()
                    failure = NotDelivered(f"{self._where}: cannot connect to {self._server}: {_describe(exc)}")
                    self._troubled(str(failure))
                    self._settle(job, failure)
                    self._fail_queued(failure)     # they were waiting for this connection
                    return
            try:
                await self._transaction(job)
            except aiosmtplib.SMTPRecipientsRefused as exc:
                await self._reset()
                self._settle(job, _refused_recipients(self._where, exc.recipients))
            except aiosmtplib.SMTPResponseException as exc:
                if exc.code in AUTH_CODES:
                    self._drop()
                    self._hold(f"{self._where}: {self._server} wants a login ({exc.code} {_text(exc)}); "
                               "set user and password_env")
                    self._settle(job, NotDelivered(self._held_reason))
                    self._fail_queued(NotDelivered(self._held_reason))
                    return
                await self._reset()
                reason = f"{self._where}: {self._stage} refused by {self._server}: {exc.code} {_text(exc)}"
                self._settle(job, Undeliverable(reason) if 500 <= exc.code < 600 else NotDelivered(reason))
            except (aiosmtplib.SMTPException, OSError) as exc:
                self._drop()
                if reused and self._stage == "MAIL FROM" and attempt == 1:
                    log.debug("%s: the idle connection was gone (%s); reconnecting", self._where, _describe(exc))
                    continue
                failure = NotDelivered(f"{self._where}: connection to {self._server} lost during {self._stage}: "
                                       f"{_describe(exc)}")
                self._troubled(str(failure))
                self._settle(job, failure)
            else:
                self.delivered += 1
                if self._trouble:
                    log.info("%s: delivering again through %s", self._where, self._server)
                    self._trouble = ""
                self._settle(job, None)
            return

    async def _transaction(self, job: Job) -> None:
        """MAIL, RCPT for each address, DATA (``_stage`` says which is under way).
        Every recipient is asked before any is refused, so the reason names all."""
        smtp = self._smtp
        assert smtp is not None
        self._stage = "MAIL FROM"
        await smtp.mail(job.sender)
        self._stage = "RCPT TO"
        refused: list[aiosmtplib.SMTPRecipientRefused] = []
        for recipient in job.recipients:
            try:
                await smtp.rcpt(recipient)
            except aiosmtplib.SMTPRecipientRefused as exc:
                if not smtp.is_connected:      # 421: the server is closing
                    raise
                refused.append(exc)
        if refused:
            raise aiosmtplib.SMTPRecipientsRefused(refused)
        self._stage = "DATA"
        await smtp.data(job.data)

    # --- the connection ------------------------------------------------------

    async def _connect(self) -> None:
        cfg = self.config
        if self._helo is None:
            self._helo = await asyncio.to_thread(socket.getfqdn)
        if self._tls is None and cfg.security != "plaintext":
            self._tls = await asyncio.to_thread(self._tls_context)
        smtp = aiosmtplib.SMTP(hostname=cfg.smtp_host, port=cfg.port, local_hostname=self._helo,
                               timeout=cfg.timeout, use_tls=cfg.security == "tls",
                               start_tls=cfg.security == "starttls",
                               tls_context=self._tls if cfg.security != "plaintext" else None)
        self._smtp = smtp
        self.connections += 1
        await smtp.connect()
        sock = smtp.get_transport_info("socket")
        if sock is not None:    # answers come one at a time: do not let Nagle hold a command back
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if cfg.user is not None:
            if cfg.password is None:
                raise AuthRefused(f"{self._where}: no password (the variable password_env names is not set)")
            await smtp.ehlo()
            if not smtp.supports_extension("auth"):
                raise AuthRefused(f"{self._where}: {self._server} offers no AUTH, and user is set")
            try:
                # One attempt per connection (aiosmtplib's login() would try every mechanism in
                # turn): failed logins are what gets an account locked.
                if "plain" in smtp.server_auth_methods:
                    await smtp.auth_plain(cfg.user, cfg.password)
                else:
                    await smtp.login(cfg.user, cfg.password)
            except aiosmtplib.SMTPAuthenticationError as exc:
                raise AuthRefused(f"{self._where}: {self._server} refused the login as {cfg.user!r}: "
                                  f"{exc.code} {_text(exc)}; fix user or password_env") from None
        log.debug("%s: connected to %s (%s%s)", self._where, self._server, cfg.security,
                  f", as {cfg.user}" if cfg.user else "")

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()      # verifies the certificate and the host name
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.config.ca_file:
            context.load_verify_locations(cafile=self.config.ca_file)
        return context

    async def _reset(self) -> None:
        """RSET after a refused transaction; a connection that cannot is dropped."""
        smtp = self._smtp
        if smtp is None or not smtp.is_connected:
            self._drop()
            return
        try:
            await smtp.rset()
        except (aiosmtplib.SMTPException, OSError) as exc:
            log.debug("%s: RSET failed (%s); dropping the connection", self._where, _describe(exc))
            self._drop()

    async def _disconnect(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None and smtp.is_connected:
            try:
                await asyncio.wait_for(smtp.quit(), 1.0)
            except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
                smtp.close()

    def _drop(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()

    # --- outcomes --------------------------------------------------------------

    def _settle(self, job: Job, failure: TransportError | None) -> None:
        if job.receipt.done():
            return
        if failure is None:
            job.receipt.set_result(None)
            return
        log.debug("%s: %s not delivered: %s", self._where, sanitise(job.label), sanitise(str(failure), 500))
        job.receipt.set_exception(failure)
        # The outbox awaits receipts; one nobody awaits must not be reported as never retrieved.
        job.receipt.exception()

    def _fail_queued(self, failure: TransportError) -> None:
        while self._queue:
            self._settle(self._queue.popleft(), failure)

    def _hold(self, reason: str) -> None:
        self._held_until = self._clock() + AUTH_HOLD
        self._held_reason = f"{reason} (not trying again for {AUTH_HOLD:g}s)"
        self._troubled(self._held_reason, logging.ERROR)

    def _troubled(self, reason: str, level: int = logging.WARNING) -> None:
        """Log a connection problem once, not once per message or retry."""
        if reason != self._trouble:
            log.log(level, "%s", sanitise(reason, 500))
            self._trouble = reason
        else:
            log.debug("%s", sanitise(reason, 500))


def _text(exc: aiosmtplib.SMTPResponseException) -> str:
    """The server's answer on one line."""
    return " ".join(exc.message.split())


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPConnectError) and isinstance(exc.__cause__, OSError):
        exc = exc.__cause__           # "Error connecting to host on port n: <this>" says it twice
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the server's certificate is not trusted ({exc.verify_message}); see ca_file"
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _refused_recipients(where: str, refusals: list[aiosmtplib.SMTPRecipientRefused]) -> TransportError:
    """Any "try later" makes the whole message wait; otherwise it can never go as addressed."""
    text = "; ".join(f"<{r.recipient}>: {r.code} {_text(r)}" for r in refusals)
    if all(500 <= r.code < 600 for r in refusals):
        return Undeliverable(f"{where}: recipient refused: {text}")
    return NotDelivered(f"{where}: recipient not accepted now: {text}")
