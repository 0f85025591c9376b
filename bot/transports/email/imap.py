"""A watched IMAP mailbox (``aioimaplib``): every mail in it handed to the
caller once it is there, then moved out of the way.

One session: connect (TLS from the first byte; plaintext only to a loopback
host), log in, select the mailbox, hand over every mail already in it (the
mail that arrived while the bot was down), then wait for more with IDLE, or
by polling every ``poll_interval`` seconds when the server lacks IDLE.  When
the connection goes, the next session starts after a backoff.

Each mail goes to the ``on_mail`` callback as a ``FetchedMail`` (UIDVALIDITY,
UID, the raw bytes).  The callback returns only after the caller committed
what the mail means (``inbound.Inbox.accept``); then the mail is moved to the
``processed`` folder (MOVE, or COPY, flag ``\\Deleted`` and UID EXPUNGE when
the server lacks MOVE), or, without a processed folder, flagged with
``FLAG``.  A crash between the commit and the move hands the same mail over
again after restart: ``FetchedMail.key`` (and the mail's Message-ID) lets the
caller see it already has it, so exactly-once is the caller's, and cheap.

A mail the callback fails on stays where it is and is tried again with the
next new mail or after ``backoff_max`` seconds (each session tries it at most
``MAX_ATTEMPTS`` times), so one bad mail cannot block the others.  A mail larger than ``max_size`` is handed over
cut off at ``max_size`` + 1 bytes with ``truncated`` set: the caller (``parse``
with the same limit) refuses it, and the server never sent all of it.

Mailbox names are ASCII (no modified UTF-7), without control characters.
The password is never logged (aioimaplib scrubs it from its debug log too).
"""
from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import aioimaplib

from bot.logsafety import sanitise
from bot.network import Backoff, is_loopback
from bot.transports.email.parse import MAX_BYTES

log = logging.getLogger(__name__)

FLAG = "$ReleasebotDone"        # the keyword that marks a handled mail when there is no processed folder
MAX_ATTEMPTS = 3                # callback failures per mail and session before it is left for the next session
_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]")
_UID = re.compile(rb"\bUID (\d+)")
_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")


class ImapError(Exception):
    """The server said no, or said something this client cannot read."""


@dataclass(frozen=True)
class ImapSettings:
    host: str
    user: str
    password: str = field(repr=False)
    port: int = 993
    tls: bool = True                    # TLS from the first byte (IMAPS); False only to a loopback host
    ca_file: Path | None = None         # a CA trusted besides the system's
    mailbox: str = "INBOX"
    processed: str | None = "Processed"     # None: flag handled mail with FLAG instead of moving it
    poll_interval: float = 60.0         # without IDLE: look for new mail this often
    idle_renew: float = 25 * 60.0       # re-issue IDLE before servers drop it (RFC 2177: 29 min)
    timeout: float = 30.0               # each command's answer
    max_size: int = MAX_BYTES
    backoff_min: float = 1.0
    backoff_max: float = 60.0

    def __post_init__(self) -> None:
        if not self.tls and not is_loopback(self.host):
            raise ValueError(f"imap: plaintext to {self.host} would send the password in clear; "
                             "use tls, or a loopback host")
        for name in (self.mailbox, self.processed or "INBOX"):
            if not name or not name.isascii() or not name.isprintable():
                raise ValueError(f"imap: mailbox name {name!r} must be printable ASCII")
        if self.processed is not None and self.processed == self.mailbox:
            raise ValueError("imap: the processed folder must differ from the watched mailbox")


@dataclass(frozen=True)
class FetchedMail:
    uidvalidity: int
    uid: int
    raw: bytes
    size: int                           # the size on the server
    truncated: bool                     # raw holds only the first max_size + 1 bytes

    @property
    def key(self) -> str:
        """``imap:<uidvalidity>:<uid>``: unique for this mailbox, the fallback idempotency key."""
        return f"imap:{self.uidvalidity}:{self.uid}"


OnMail = Callable[[FetchedMail], Awaitable[None]]


class ImapWatcher:
    """Watches one mailbox (module docstring).  ``run`` until cancelled or ``stop``."""

    def __init__(self, settings: ImapSettings, on_mail: OnMail) -> None:
        self.settings = settings
        self._on_mail = on_mail
        self._backoff = Backoff(settings.backoff_min, settings.backoff_max)
        self._stopping = False
        self._client: Any = None
        self._lost = asyncio.Event()
        self.connected = asyncio.Event()    # set while a session is logged in and watching
        self.waiting = asyncio.Event()      # set while it waits for new mail (IDLE, or between polls)
        self.idle_supported: bool | None = None
        self.handed_over = 0
        self.sessions = 0

    async def run(self) -> None:
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:                 # the server went away, refused, or talked nonsense
                if self._stopping:
                    break
                self._backoff.connection_ended(time.monotonic() - started)
                delay = self._backoff.delay()
                log.warning("imap %s@%s: %s: %s; again in %.1fs", sanitise(self.settings.user, 80),
                            self.settings.host, type(exc).__name__, sanitise(str(exc) or "connection lost", 200),
                            delay)
                await asyncio.sleep(delay)
            finally:
                self.connected.clear()
                await self._close()

    async def stop(self) -> None:
        self._stopping = True
        self._lost.set()

    # -- one session -------------------------------------------------------------

    async def _session(self) -> None:
        s = self.settings
        self._lost = asyncio.Event()
        context = None
        if s.tls:
            context = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
        lost = self._lost
        client = aioimaplib.IMAP4(host=s.host, port=s.port, timeout=s.timeout, ssl_context=context,
                                  conn_lost_cb=lambda _exc: lost.set())
        self._client = client
        await self._call(client.wait_hello_from_server())
        _ok(await self._call(client.login(s.user, s.password)), "login")
        if s.processed is not None:
            created = await self._call(client.create(_quote(s.processed)))
            if created.result != "OK" and b"ALREADYEXISTS" not in b" ".join(_lines(created)):
                raise ImapError(f"cannot create {s.processed}: {_text(created)}")
        selected = _ok(await self._call(client.select(_quote(s.mailbox))), f"select {s.mailbox}")
        uidvalidity = _uidvalidity(selected)
        self.idle_supported = client.has_capability("IDLE")
        self.sessions += 1
        self.connected.set()
        log.info("imap %s@%s: watching %s (%s)", sanitise(s.user, 80), s.host, s.mailbox,
                 "IDLE" if self.idle_supported else f"polling every {s.poll_interval:g}s")
        attempts: dict[int, int] = {}
        while not self._stopping:
            retry = await self._drain(client, uidvalidity, attempts)
            if self._stopping:
                break
            if lost.is_set():
                raise ImapError("connection lost")
            # a mail the caller failed on is tried again after backoff_max, or with the next new mail
            pause = min(s.idle_renew if self.idle_supported else s.poll_interval,
                        s.backoff_max if retry else float("inf"))
            self.waiting.set()
            try:
                if self.idle_supported:
                    await self._idle(client, pause)
                else:
                    await self._wait(pause)
            finally:
                self.waiting.clear()
            if lost.is_set() and not self._stopping:
                raise ImapError("connection lost")

    async def _drain(self, client: Any, uidvalidity: int, attempts: dict[int, int]) -> bool:
        """Hand over every mail in the mailbox not yet handled, oldest first,
        each at most once per call; True if one the caller failed on is left to
        try again.  It searches again until a search finds nothing new: that
        search is the last command before IDLE, so a mail that arrives later is
        announced in IDLE, not in the answer to a command that ignores it."""
        s = self.settings
        criteria = ("ALL",) if s.processed is not None else ("UNKEYWORD", FLAG)
        tried: set[int] = set()
        while not (self._stopping or self._lost.is_set()):
            found = _ok(await self._call(client.uid_search(*criteria, charset=None)), "search")
            uids = sorted(int(u) for line in _lines(found)[:-1] for u in line.split() if u.isdigit())
            todo = [u for u in uids if u not in tried and attempts.get(u, 0) < MAX_ATTEMPTS]
            if not todo:
                return any(attempts.get(u, 0) < MAX_ATTEMPTS for u in uids if u in tried)
            for uid in todo:
                if self._stopping or self._lost.is_set():
                    break
                tried.add(uid)
                await self._hand_over(client, uidvalidity, uid, attempts)
        return False

    async def _hand_over(self, client: Any, uidvalidity: int, uid: int, attempts: dict[int, int]) -> None:
        mail = await self._fetch(client, uidvalidity, uid)
        if mail is None:
            return                                      # expunged meanwhile
        try:
            await self._on_mail(mail)
        except Exception as exc:
            attempts[uid] = attempts.get(uid, 0) + 1
            log.error("imap: mail %s not taken (attempt %d of %d): %s: %s", mail.key, attempts[uid],
                      MAX_ATTEMPTS, type(exc).__name__, sanitise(str(exc), 200))
            return
        self.handed_over += 1
        await self._done(client, uid)

    async def _fetch(self, client: Any, uidvalidity: int, uid: int) -> FetchedMail | None:
        response = _ok(await self._call(client.uid("fetch", str(uid), f"(UID RFC822.SIZE BODY.PEEK[]<0.{self.settings.max_size + 1}>)")),
                       f"fetch {uid}")
        lines = _lines(response)
        for index, line in enumerate(lines):
            if type(line) is not bytes or b"FETCH (" not in line:
                continue
            uid_match, size_match = _UID.search(line), _SIZE.search(line)
            if uid_match is None or size_match is None or int(uid_match.group(1)) != uid:
                continue
            literal = lines[index + 1] if index + 1 < len(lines) else b""
            raw = bytes(literal) if isinstance(literal, bytearray) else b""
            size = int(size_match.group(1))
            return FetchedMail(uidvalidity, uid, raw, size, size > len(raw))
        return None

    async def _done(self, client: Any, uid: int) -> None:
        """Move a handed-over mail to the processed folder, or flag it."""
        s = self.settings
        if s.processed is None:
            _ok(await self._call(client.uid("store", str(uid), "+FLAGS.SILENT", f"({FLAG})")), f"flag {uid}")
        elif client.has_capability("MOVE"):
            _ok(await self._call(client.uid("move", str(uid), _quote(s.processed))), f"move {uid}")
        else:
            _ok(await self._call(client.uid("copy", str(uid), _quote(s.processed))), f"copy {uid}")
            _ok(await self._call(client.uid("store", str(uid), "+FLAGS.SILENT", r"(\Deleted)")), f"flag {uid} deleted")
            if client.has_capability("UIDPLUS"):
                _ok(await self._call(client.uid("expunge", str(uid))), f"expunge {uid}")
            else:
                _ok(await self._call(client.expunge()), "expunge")

    async def _idle(self, client: Any, pause: float) -> None:
        """IDLE until the server reports new mail, ``pause`` is over, or the end."""
        idle = await self._call(client.idle_start(timeout=pause))
        try:
            while True:
                try:
                    lines = await self._call(client.wait_server_push(timeout=pause + 5))
                except asyncio.TimeoutError:
                    break
                if lines == aioimaplib.STOP_WAIT_SERVER_PUSH or any(b"EXISTS" in bytes(l) for l in lines):
                    break
            client.idle_done()
            await self._call(asyncio.wait_for(idle, self.settings.timeout))
        finally:
            idle.cancel()

    async def _call(self, step: Awaitable[Any]) -> Any:
        """``step``, unless the connection goes first (ImapError): a command
        on a dead connection would otherwise wait for its timeout, and IDLE
        for ever."""
        task = asyncio.ensure_future(step)
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            lost.cancel()
        if not task.done():
            task.cancel()
            raise ImapError("connection lost")
        return task.result()

    async def _wait(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._lost.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if not self._lost.is_set():
                await asyncio.wait_for(client.logout(), 2)
        except Exception:
            pass
        transport = getattr(client.protocol, "transport", None)
        if transport is not None:
            transport.close()


def _quote(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _lines(response: Any) -> list[Any]:
    return list(getattr(response, "lines", []) or [])


def _text(response: Any) -> str:
    return sanitise(" ".join(bytes(l).decode("ascii", "replace") for l in _lines(response)[-1:]), 200)


def _ok(response: Any, what: str) -> Any:
    if getattr(response, "result", None) != "OK":
        raise ImapError(f"{what}: {getattr(response, 'result', '?')} {_text(response)}")
    return response


def _uidvalidity(selected: Any) -> int:
    for line in _lines(selected):
        match = _UIDVALIDITY.search(bytes(line))
        if match:
            return int(match.group(1))
    raise ImapError("select: the server sent no UIDVALIDITY")
