"""The durable outbox: every message the bot starts itself (notifications,
acknowledgements of commands that change state, questions) is a row here
before anything is sent, and is sent from here.

Writing: ``Outbox.rows(...)`` makes the statements that queue a message for
some destinations.  They are written in the commit of whatever causes the
message -- an engine transition (a watcher's rows, a participant's
``Reply.done(ops=...)``), or a command's change (``Engine.launch(ack=...)``)
-- so nothing falls between a commit and the outbox.  Each row has a dedupe
key (what caused it x where it goes): a row written twice is one row.

Sending: one task per destination with rows waiting sends them oldest first,
one at a time: it hands the message to the network's front-end and waits for
the receipt (the server's confirmation, ``bot.chat.Transport.send``); only
then is the row marked delivered, and only after that is the next one sent.
A destination that fails waits (exponential backoff with jitter) without
holding up any other.  ``NotDelivered`` (network down, person offline,
SMTP 4xx) waits and tries again; ``Undeliverable`` (unknown channel, SMTP 5xx,
a user with no identity on that network) marks the row failed with the
reason, and so does a row still waiting after ``give_up``.

The guarantee: delivery is at least once.  A message is sent again only if
the bot stopped (or the connection died) after the server accepted it and
before its delivery was recorded, so per destination at most one message is
repeated per crash: the one in flight.  (A chat message repeats whole, a
mail keeps its ``Message-ID`` so the receiver can drop the copy.)
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import logging
import random
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from bot.chat import NotDelivered, Offline, Outgoing, Person, Room, Target, TransportError, Undeliverable
from engine.participant_runtime import Storage
from engine.store import Op, Store
from notifiers.destinations import Address, Book

log = logging.getLogger(__name__)

OWNER = "outbox"
MIGRATIONS = (
    """
    CREATE TABLE outbox_messages (
        id INTEGER PRIMARY KEY,
        topic INTEGER NOT NULL,           -- the dedupe key: the instance it is about (so new keys land
        digest INTEGER NOT NULL,          -- together in the index) and 64 bits of a sha256 of what caused
                                          -- it x where it goes: written twice, one row; also the mail's
                                          -- Message-ID
        dest TEXT NOT NULL,               -- Address.key: delivered in id order per dest
        lane INTEGER NOT NULL,            -- crc32 of dest: what the index orders by (a number is cheaper
                                          -- to keep in order than the text; a clash only costs a look)
        kind TEXT NOT NULL,               -- room | mail | user
        network TEXT NOT NULL,
        target TEXT NOT NULL,
        hint TEXT NOT NULL DEFAULT '',    -- a user's last-seen handle (Person.handle)
        project TEXT,
        origin TEXT NOT NULL DEFAULT '',  -- what it is about, for people reading `outbox`
        text TEXT NOT NULL,
        subject TEXT NOT NULL DEFAULT '',
        body TEXT NOT NULL DEFAULT '',
        in_reply_to TEXT NOT NULL DEFAULT '',
        refs TEXT NOT NULL DEFAULT '',
        reply_to TEXT NOT NULL DEFAULT '',   -- a single-use reply address (mail to a user)
        state TEXT NOT NULL DEFAULT 'queued',   -- queued | delivered | failed | rerouted (by mail, offline)
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL DEFAULT 0,
        error TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL,
        done_at REAL
    );
    CREATE UNIQUE INDEX outbox_messages_dedupe ON outbox_messages (topic, digest);
    CREATE INDEX outbox_messages_waiting ON outbox_messages (lane, id) WHERE state = 'queued';
    """,
)

_FIELDS = ("topic, digest, dest, lane, kind, network, target, hint, project, origin, text, subject, body, "
           "in_reply_to, refs, reply_to, created")
_INSERT = f"INSERT OR IGNORE INTO outbox_messages ({_FIELDS}) VALUES ({','.join('?' * 17)})"
@functools.lru_cache(maxsize=64)
def _insert_many(n: int) -> str:
    """The statement queuing one message for ``n`` destinations (``Outbox.rows``)."""
    rows = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * n)
    return ("INSERT OR IGNORE INTO outbox_messages (topic, project, origin, text, subject, body, in_reply_to, "
            "refs, created, digest, dest, lane, kind, network, target, hint, reply_to) "
            "SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, column1, column2, column3, column4, column5, column6, "
            f"column7, column8 FROM (VALUES {rows})")


_COLUMNS = ("id, dest, kind, network, target, text, subject, body, topic, digest, in_reply_to, refs, attempts, "
            "next_at, created, origin, error, hint, reply_to")


@dataclass(frozen=True)
class Settings:
    retry_min: float = 2.0          # first wait after a failure; doubles ...
    retry_max: float = 300.0        # ... up to this, with +-20% jitter
    give_up: float = 7 * 86400.0    # a message still waiting after this fails
    confirm_timeout: float = 120.0  # a receipt not settled by then counts as not delivered
    keep: float = 30 * 86400.0      # delivered and failed messages are forgotten after this long
    message_domain: str = "releasebot.invalid"   # right-hand side of the Message-IDs


@dataclass(frozen=True)
class Row:
    id: int
    dest: str
    kind: str
    network: str
    target: str
    text: str
    subject: str
    body: str
    topic: int
    digest: int
    in_reply_to: str
    refs: str
    attempts: int
    next_at: float
    created: float
    origin: str
    error: str
    hint: str
    reply_to: str


@dataclass(frozen=True)
class Stats:
    counts: Mapping[tuple[str, str], int]      # (network, state) -> rows
    oldest: Sequence[Row]                      # the oldest waiting


Reach = Callable[[str, str], "Person | None"]
"""(user name, network) -> how to reach that user there now, or None."""
IssueToken = Callable[[str, str, str, str, float], "tuple[str, Sequence[Op]] | None"]
"""(email network, user, purpose, what it refers to, expires) -> a single-use
reply address and the ops that store it (the email front-end's tokens)."""


class Outbox:
    def __init__(self, store: Store, book: Book, reach: Reach, *, settings: Settings | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.book = book
        self.reach = reach
        self.settings = settings or Settings()
        self.clock = clock
        self.storage = Storage(store, OWNER)
        self.transports: dict[str, Any] = {}
        self._wake = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._nudge: dict[str, asyncio.Event] = {}
        self._scanner: asyncio.Task[None] | None = None
        self._stopping = False
        self.issue_token: IssueToken | None = None
        """Set by the app when the email front-end takes replies: every mail to
        a user then carries a single-use reply address."""
        self.fallback_to: Callable[[str], str | None] = lambda user: None
        """user -> the email network to use while they are offline on a chat
        network (``fallback email on``), or None to wait for them."""
        self._sending = 0                        # messages handed to a front-end, not yet settled
        self.delivered = 0                       # counters, for benchmarks and logs
        self.failed = 0

    # -- writing ------------------------------------------------------------------------

    async def open(self) -> None:
        """Create or update the outbox's tables (before any row is written)."""
        await self.store.migrate_participant(OWNER, MIGRATIONS)

    def rows(self, cause: str, to: Iterable[str | Address], text: str, *, subject: str = "", body: str = "",
             in_reply_to: str = "", references: Sequence[str] = (), origin: str = "",
             project: str | None = None, hint: str = "", reply: tuple[str, str, float] | None = None,
             instance: int = 0) -> list[Op]:
        """The statements that queue a message for every destination in ``to``
        (text is resolved with ``destinations.Book.resolve``: BadDestination
        says why one cannot work): ``text`` for chat; ``subject`` and ``body``
        (default: the text) for mail.  ``cause`` identifies what the message
        is about (an event, a step, a command): with the destination it is
        the dedupe key, so the same cause never queues two messages to one
        destination.  A mail to a user carries a single-use reply address
        (when the email front-end takes replies): for ``reply`` = (purpose,
        what it refers to, expires), e.g. a question; else a thread of its own.
        ``instance``: the instance the message is about, if any (keeps the
        dedupe index's new keys together: cheaper to write)."""
        now = self.clock()
        topic = max(0, instance)
        values = []
        extra: list[Op] = []
        sha256 = hashlib.sha256
        origin = origin[:200]
        refs = " ".join(references)
        for dest in to:
            for address in (self.book.resolve(dest) if isinstance(dest, str) else (dest,)):
                key = address.key
                digest = int.from_bytes(sha256(f"{cause}|{key}".encode("utf-8")).digest()[:8], "big", signed=True)
                reply_to = ""
                if address.kind == "user":
                    if self.issue_token is not None and self.book.networks.get(address.network) == "email":
                        purpose, ref, expires = reply or ("thread", f"{topic}.{digest}", now + 30 * 86400.0)
                        issued = self.issue_token(address.network, address.target, purpose, ref, expires)
                        if issued is not None:      # None: no mail comes in on that network
                            reply_to, ops = issued
                            extra += ops
                    person_hint = hint
                else:
                    person_hint = ""
                values.append((topic, digest, key, address.lane, address.kind, address.network, address.target,
                               person_hint, project, origin, text, subject, body, in_reply_to, refs, reply_to,
                               now))
        if len(values) > 1:
            # one message to several destinations: one statement (the writer hands SQLite every
            # row at once; the text is bound once)
            flat: list[Any] = [topic, project, origin, text, subject, body, in_reply_to, refs, now]
            for v in values:
                flat += (v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[15])
            return [(_insert_many(len(values)), tuple(flat), False), *extra]
        return ([(_INSERT, values, True)] if values else []) + extra

    @staticmethod
    def merged(ops: Sequence[Op]) -> list[Op]:
        """``ops`` with every message insert made one statement (the others after it, in order)."""
        values = [v for sql, params, many in ops if sql == _INSERT for v in params]
        rest = [op for op in ops if op[0] != _INSERT]
        return ([(_INSERT, values, True)] if values else []) + rest

    def message_id(self, topic: int, digest: int) -> str:
        """A row's Message-ID: the same on every try, so a receiver can drop a repeat."""
        return f"<{topic:x}.{digest & 0xFFFFFFFFFFFFFFFF:016x}@{self.settings.message_domain}>"

    def wake(self) -> None:
        """Rows were committed: look for destinations with work."""
        self._wake.set()

    # -- sending ------------------------------------------------------------------------

    def attach(self, transports: Mapping[str, Any]) -> None:
        """The front-ends by network name (the console has nobody to deliver to)."""
        self.transports = dict(transports)

    async def start(self) -> None:
        self._stopping = False
        self._scanner = asyncio.get_running_loop().create_task(self._scan(), name="outbox")
        self.wake()

    async def stop(self) -> None:
        self._stopping = True
        tasks = [t for t in (self._scanner, *self._tasks.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._scanner = None

    async def idle(self, timeout: float = 10.0) -> None:
        """Wait until no destination has a row it could send now (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while True:
            await asyncio.sleep(0.01)
            due = await self.storage.query("SELECT COUNT(*) FROM outbox_messages WHERE state = 'queued' "
                                           "AND next_at <= ?", self.clock())
            if not due[0][0] and not self._sending:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"outbox: {due[0][0]} message(s) still due")

    async def _scan(self) -> None:
        pruned = 0.0
        while not self._stopping:
            try:       # wake at least hourly, to forget what was settled long ago
                await asyncio.wait_for(self._wake.wait(), 3600.0)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            if self.clock() - pruned >= 3600.0:
                pruned = self.clock()
                try:
                    await self.storage.write(self.storage.op(
                        "DELETE FROM outbox_messages WHERE state != 'queued' AND done_at < ?",
                        pruned - self.settings.keep))
                except Exception:
                    log.exception("outbox: cannot forget old messages")
            try:
                dests = await self.storage.query("SELECT DISTINCT dest FROM outbox_messages WHERE state = 'queued'")
            except Exception:
                log.exception("outbox: cannot read the waiting messages; trying again")
                await asyncio.sleep(1.0)
                self._wake.set()
                continue
            for (dest,) in dests:
                nudge = self._nudge.setdefault(dest, asyncio.Event())
                nudge.set()
                task = self._tasks.get(dest)
                if task is None or task.done():
                    self._tasks[dest] = asyncio.get_running_loop().create_task(self._drain(dest),
                                                                               name=f"outbox {dest}")

    async def _drain(self, dest: str) -> None:
        """Send ``dest``'s rows in order, one at a time, until none is waiting
        (read a few at a time; read again after a wait, a failure or a nudge)."""
        nudge = self._nudge.setdefault(dest, asyncio.Event())
        lane = zlib.crc32(dest.encode("utf-8"))     # = Address.lane
        while not self._stopping:
            nudge.clear()
            found = await self.storage.query(
                f"SELECT {_COLUMNS} FROM outbox_messages WHERE state = 'queued' AND lane = ? AND dest = ? "
                "ORDER BY id LIMIT 32", lane, dest)
            if not found:
                return
            head = Row(*found[0])
            wait = head.next_at - self.clock()
            if wait > 0:
                try:     # `outbox retry` (or new rows) may end the wait early
                    await asyncio.wait_for(nudge.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                continue     # read the head again: it may have been retried, or failed by a command
            for values in found:
                row = Row(*values)
                if row.next_at > self.clock() or nudge.is_set() or self._stopping:
                    break
                self._sending += 1
                try:
                    settled = await self._send(row)
                finally:
                    self._sending -= 1
                if not settled:  # it waits: so do the ones after it
                    break

    async def _send(self, row: Row) -> bool:
        """Try ``row`` once; True if it is settled (delivered, failed, sent by mail instead)."""
        now = self.clock()
        if now - row.created > self.settings.give_up:
            await self._fail(row, f"not delivered within {self.settings.give_up / 86400:g} day(s): "
                                  f"{row.error or 'never tried'}")
            return True
        transport = self.transports.get(row.network)
        if transport is None:
            await self._fail(row, f"network {row.network!r} is not configured (any more)")
            return True
        if not transport.ready:
            await self._later(row, f"{row.network} is not connected")
            return False
        try:
            target = self._target(row)
            receipt = await transport.send(target, self._outgoing(row))
            # on timeout the receipt is cancelled: the front-end withdraws what it has not written yet,
            # so the try that follows does not add a second copy to one still queued
            await asyncio.wait_for(receipt, self.settings.confirm_timeout)
        except Undeliverable as exc:
            await self._fail(row, str(exc))
            return True
        except Offline as exc:
            mail = self.fallback_to(row.target) if row.kind == "user" and row.network != "" else None
            if mail is not None and self.book.networks.get(row.network) != "email":
                await self._reroute(row, mail, str(exc))
                return True
            await self._later(row, str(exc))
            return False
        except (NotDelivered, TransportError) as exc:
            await self._later(row, str(exc))
            return False
        except asyncio.TimeoutError:
            await self._later(row, f"no confirmation from {row.network} within {self.settings.confirm_timeout:g}s")
            return False
        await self._mark(row.id, "UPDATE outbox_messages SET state = 'delivered', done_at = ?, error = '' "
                                 "WHERE id = ? AND state = 'queued'", self.clock(), row.id)
        self.delivered += 1
        return True

    def _target(self, row: Row) -> Target:
        protocol = self.book.networks.get(row.network, "")
        if row.kind == "room":
            return Room(protocol, row.network, row.target)
        if row.kind == "mail":
            return Person(protocol, row.network, "", (row.target,))
        person = self.reach(row.target, row.network)
        if person is None:
            raise Undeliverable(f"{row.target} has no identity on {row.network} (users.yaml)")
        return dataclasses.replace(person, handle=row.hint) if row.hint else person

    def _outgoing(self, row: Row) -> Outgoing:
        mail = self.book.networks.get(row.network) == "email"
        return Outgoing(row.body or row.text if mail else row.text, subject=row.subject,
                        message_id=self.message_id(row.topic, row.digest), in_reply_to=row.in_reply_to,
                        references=tuple(row.refs.split()) if row.refs else (), reply_to=row.reply_to)

    async def _later(self, row: Row, why: str) -> None:
        attempts = row.attempts + 1
        delay = min(self.settings.retry_max, self.settings.retry_min * 2 ** min(attempts - 1, 30))
        delay *= random.uniform(0.8, 1.2)
        if attempts == 1 or attempts % 10 == 0:
            log.info("outbox: %s waits %.0fs (try %d): %s", row.dest, delay, attempts, why)
        await self._mark(row.id, "UPDATE outbox_messages SET attempts = ?, next_at = ?, error = ? "
                                 "WHERE id = ? AND state = 'queued'", attempts, self.clock() + delay, why[:500],
                         row.id)

    async def _reroute(self, row: Row, network: str, why: str) -> None:
        """The user is offline on a chat network and wants mail meanwhile: one
        commit marks this row done and queues the mail."""
        log.info("outbox: %s is offline (%s); message %d goes by mail", row.target, why, row.id)
        cause = f"fallback {row.id}"
        ops = self.rows(cause, [Address("user", network, row.target)], row.text,
                        subject=row.subject or row.text.split("\n", 1)[0][:120], body=row.body or row.text,
                        origin=f"{row.origin} (offline on {row.network})")
        ops.append(self.storage.op("UPDATE outbox_messages SET state = 'rerouted', done_at = ?, error = ? "
                                   "WHERE id = ? AND state = 'queued'", self.clock(),
                                   f"offline on {row.network}: sent by mail"[:500], row.id))
        while True:
            try:
                await self.storage.write(*ops)
                break
            except Exception:
                log.exception("outbox: cannot reroute message %d; trying again", row.id)
                await asyncio.sleep(1.0)
        self.wake()

    async def _fail(self, row: Row, why: str) -> None:
        log.warning("outbox: message %d to %s failed: %s", row.id, row.dest, why)
        self.failed += 1
        await self._mark(row.id, "UPDATE outbox_messages SET state = 'failed', done_at = ?, error = ? "
                                 "WHERE id = ? AND state = 'queued'", self.clock(), why[:500], row.id)

    async def _mark(self, row_id: int, sql: str, *params: Any) -> None:
        """Record what happened to a row before the destination's next one is sent."""
        while True:
            try:
                await self.storage.write(self.storage.op(sql, *params))
                return
            except Exception:
                log.exception("outbox: cannot record message %d; trying again", row_id)
                await asyncio.sleep(1.0)

    # -- reading (the outbox commands) ----------------------------------------------------

    async def stats(self, oldest: int = 5) -> Stats:
        counts = await self.storage.query("SELECT network, state, COUNT(*) FROM outbox_messages "
                                          "GROUP BY network, state")
        rows = await self.storage.query(f"SELECT {_COLUMNS} FROM outbox_messages WHERE state = 'queued' "
                                        "ORDER BY id LIMIT ?", oldest)
        return Stats({(n, s): c for n, s, c in counts}, [Row(*r) for r in rows])

    async def failures(self, limit: int = 20) -> list[Row]:
        rows = await self.storage.query(f"SELECT {_COLUMNS} FROM outbox_messages WHERE state = 'failed' "
                                        "ORDER BY id DESC LIMIT ?", limit)
        return [Row(*r) for r in rows]

    async def retry(self, row_id: int) -> Row | None:
        """Queue a failed message again (or try a waiting one now); None if unknown or delivered."""
        found = await self.storage.query(f"SELECT {_COLUMNS}, state FROM outbox_messages WHERE id = ?", row_id)
        if not found or found[0][-1] == "delivered":
            return None
        await self.storage.write(self.storage.op(
            "UPDATE outbox_messages SET state = 'queued', next_at = 0, attempts = 0, created = ? WHERE id = ?",
            self.clock(), row_id))
        row = Row(*found[0][:-1])
        nudge = self._nudge.get(row.dest)
        if nudge is not None:
            nudge.set()
        self.wake()
        return row
