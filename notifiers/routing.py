"""Per-project notifications: which events go where, for whom, how often.

*When*: the engine's history events, each with its instance's project,
reduced to the kinds people subscribe to (``kind_of``): launched, completed,
recovered, failed, cancelled, terminated, step failed, timer fired, and the
participants' own (``Reply.done(events=...)``: publish done, question
asked, ...).

*Where*: the routes of ``bot.yaml`` ``notifications: projects:``, by project
tree (``Foo:Bar:Baz`` inherits ``Foo:Bar``'s routes, then ``Foo``'s, then
``"*"``'s; a project with ``inherit: override`` starts afresh), and the users'
own subscriptions (``subscribe``), kept in SQLite.

*What*: a template per event kind (``notifications: templates:``), in the
definitions' sandbox; one that fails falls back to the plain line.

Everything is decided inside the engine's transition (``Engine.watch``) from
what is in memory, and written in its commit: an event is routed exactly
when it happens, and a crash loses none.  Two things wait in SQLite instead
of going straight to the outbox, and are sent by ``Flusher``:

* flood safety: past ``flood_per_minute`` messages to one destination in a
  minute, the rest of that minute's events are held, then sent as one summary
  line that says how many events of which kinds it stands for (``history``
  has each of them);
* digests: a subscription with ``digest hourly|daily`` gathers its events and
  sends one message per period.

Held and gathered rows leave their table in the same commit that queues the
message standing for them, whose dedupe key names the period: a summary or
digest is neither lost nor sent twice across a restart.
"""
from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta
from typing import Any, Callable, Sequence
from zoneinfo import ZoneInfo

from engine.events import Event
from engine.participant_runtime import Storage
from engine.store import Op, Store
from engine.templating import TemplateProblem
from notifiers.destinations import Address
from notifiers.outbox import Outbox
from notifiers.routes import NotificationConfig, Subscription, chain, kind_of, matches

log = logging.getLogger(__name__)

OWNER = "notify"
MIGRATIONS = (
    """
    CREATE TABLE notify_subscriptions (
        id INTEGER PRIMARY KEY,
        user TEXT NOT NULL,
        project TEXT NOT NULL,
        pattern TEXT NOT NULL,
        network TEXT NOT NULL,
        digest TEXT NOT NULL DEFAULT '',      -- '' | hourly | daily
        created REAL NOT NULL
    );
    CREATE TABLE notify_prefs (
        user TEXT PRIMARY KEY,
        fallback_email INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE notify_held (                -- flood safety: waiting for their minute's summary
        id INTEGER PRIMARY KEY,
        dest TEXT NOT NULL,
        kind TEXT NOT NULL,
        project TEXT NOT NULL DEFAULT '',
        window REAL NOT NULL,
        line TEXT NOT NULL
    );
    CREATE TABLE notify_digest (              -- digests: gathered until their period ends
        id INTEGER PRIMARY KEY,
        subscription INTEGER NOT NULL,
        dest TEXT NOT NULL,
        due REAL NOT NULL,
        line TEXT NOT NULL
    );
    CREATE INDEX notify_digest_due ON notify_digest (due);
    """,
)

def period_end(now: float, digest: str, tz: ZoneInfo) -> float:
    """When the digest period containing ``now`` ends: the next hour, or the next midnight in ``tz``."""
    at = datetime.fromtimestamp(now, tz)
    if digest == "hourly":
        end = at.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    else:
        end = datetime.combine(at.date() + timedelta(days=1), datetime.min.time(), tz)
    return end.timestamp()


_HELD = "INSERT INTO notify_held (dest, kind, project, window, line) VALUES (?,?,?,?,?)"
_DIGEST = "INSERT INTO notify_digest (subscription, dest, due, line) VALUES (?,?,?,?)"


class Routing:
    """The watcher (``rows_for``) and the subscription store."""

    def __init__(self, store: Store, outbox: Outbox, config: NotificationConfig, *,
                 clock: Callable[[], float] = time.time, timezone: str = "UTC") -> None:
        self.store = store
        self.outbox = outbox
        self.config = config
        self.clock = clock
        self.tz = ZoneInfo(timezone)
        self.storage = Storage(store, OWNER)
        self._subs: dict[str, list[Subscription]] = {}       # project -> its subscriptions
        self._targets: dict[tuple[str | None, str], tuple[dict[str, Address], list[Subscription]]] = {}
        self._window: dict[str, tuple[float, int]] = {}      # dest -> (minute, messages sent in it)
        self.fallback: set[str] = set()                      # users who want mail while offline
        self._ends: dict[tuple[float, str], float] = {}
        self.storage.op(_HELD, "", "", "", 0, "")            # its statements name its own tables (checked once)
        self.storage.op(_DIGEST, 0, "", 0, "")

    async def open(self) -> None:
        await self.store.migrate_participant(OWNER, MIGRATIONS)
        for row in await self.storage.query("SELECT id, user, project, pattern, network, digest "
                                            "FROM notify_subscriptions ORDER BY id"):
            self._index(Subscription(*row))
        self.fallback = {u for (u,) in await self.storage.query(
            "SELECT user FROM notify_prefs WHERE fallback_email = 1")}

    def _index(self, sub: Subscription) -> None:
        self._subs.setdefault(sub.project, []).append(sub)
        self._targets.clear()

    def _find(self, project: str | None, kind: str) -> tuple[dict[str, Address], list[Subscription]]:
        """Who hears of a ``kind`` event in ``project``: the routes' destinations and the
        subscribers (remembered per project and kind until a subscription changes)."""
        dests: dict[str, Address] = {}
        for route in self.config.routes_for(project):
            if route.wants(kind):
                for address in route.to:
                    dests.setdefault(address.key, address)
        digests: list[Subscription] = []
        for name in chain(project):
            for sub in self._subs.get(name, ()):
                if matches(kind, sub.pattern):
                    if sub.digest:
                        digests.append(sub)
                    else:
                        address = Address("user", sub.network, sub.user)
                        dests.setdefault(address.key, address)
        return dests, digests

    # -- the watcher ----------------------------------------------------------------------

    def rows_for(self, events: Sequence[Event]) -> list[Op]:
        """Inside the transition: the outbox rows (and held/digest rows) for its events."""
        ops: list[Op] = []
        # a step error nobody handles is told once, as the instance's "failed"
        unhandled = {(e.instance_id, e.path) for e in events if e.event == "failed"}
        now = self.clock()
        minute = now - now % self.config.flood_window
        limit = self.config.flood_per_minute
        for event in events:
            kind = kind_of(event)
            if kind is None or (kind == "step failed" and (event.instance_id, event.path) in unhandled):
                continue
            found = self._targets.get((event.project, kind))
            if found is None:
                found = self._targets[(event.project, kind)] = self._find(event.project, kind)
            dests, digests = found
            if not dests and not digests:
                continue
            text, subject, body = self.render(event, kind)
            cause = f"event {event.instance_id} {event.at!r} {event.path} {event.event}"
            sending: list[Address] = []
            for key, address in dests.items():
                start, count = self._window.get(key, (minute, 0))
                if start != minute:
                    start, count = minute, 0
                self._window[key] = (start, count + 1)
                if count >= limit:
                    ops.append((_HELD, (address.key, kind, event.project or "", start, text[:300]), False))
                else:
                    sending.append(address)
            if sending:
                ops += self.outbox.rows(cause, sending, text, subject=subject, body=body,
                                        origin=f"#{event.instance_id} {kind}", project=event.project,
                                        instance=event.instance_id)
            for sub in digests:
                ops.append((_DIGEST, (sub.id, f"user:{sub.user}@{sub.network}", self._period_end(now, sub.digest),
                                      f"{time.strftime('%H:%M', time.gmtime(event.at))} {text}"[:300]), False))
        if len(ops) <= 1:
            return ops
        # one statement per table: the writer runs each once over all its rows
        merged: dict[str, list[Any]] = {}
        rest: list[Op] = []
        for sql, params, many in self.outbox.merged(ops):
            if sql in (_HELD, _DIGEST):
                merged.setdefault(sql, []).append(params)
            else:
                rest.append((sql, params, many))
        return rest + [(sql, rows, True) for sql, rows in merged.items()]

    def _period_end(self, now: float, digest: str) -> float:
        """``period_end``, remembered for the minute (every event of a burst asks)."""
        key = (now - now % 60, digest)
        end = self._ends.get(key)
        if end is None or end <= now:
            if len(self._ends) > 100:
                self._ends.clear()
            end = self._ends[key] = period_end(now, digest, self.tz)
        return end

    def render(self, event: Event, kind: str) -> tuple[str, str, str]:
        scope = {"kind": kind, "event": event.event, "detail": event.detail, "step": event.step,
                 "actor": event.actor, "project": event.project or "",
                 "instance": {"id": event.instance_id, "process": event.process, "project": event.project or ""}}
        plain = plain_line(event, kind)
        template = self.config.templates.get(kind) or self.config.templates.get("*")
        if template is None:
            return plain, "", ""        # mail falls back to the text for its subject and body
        try:
            return template.render(scope)
        except TemplateProblem as exc:
            log.warning("notification template for %r failed (%s); sending the plain line", kind, exc)
            return plain, plain, plain

    # -- subscriptions (commands) ---------------------------------------------------------

    def subscriptions(self, user: str) -> list[Subscription]:
        return sorted((s for subs in self._subs.values() for s in subs if s.user == user), key=lambda s: s.id)

    async def subscribe(self, user: str, project: str, pattern: str, network: str, digest: str) -> Subscription:
        now = self.clock()
        await self.storage.write(self.storage.op(
            "INSERT INTO notify_subscriptions (user, project, pattern, network, digest, created) "
            "VALUES (?,?,?,?,?,?)", user, project, pattern, network, digest, now))
        row = await self.storage.query_one("SELECT MAX(id) FROM notify_subscriptions WHERE user = ?", user)
        assert row is not None
        sub = Subscription(int(row[0]), user, project, pattern, network, digest)
        self._index(sub)
        return sub

    async def unsubscribe(self, user: str, sub_id: int) -> Subscription | None:
        mine = [s for s in self.subscriptions(user) if s.id == sub_id]
        if not mine:
            return None
        await self.storage.write(self.storage.op("DELETE FROM notify_subscriptions WHERE id = ? AND user = ?",
                                                 sub_id, user))
        self._subs[mine[0].project].remove(mine[0])
        self._targets.clear()
        return mine[0]

    async def set_fallback(self, user: str, on: bool) -> None:
        await self.storage.write(self.storage.op(
            "INSERT INTO notify_prefs (user, fallback_email) VALUES (?, ?) "
            "ON CONFLICT(user) DO UPDATE SET fallback_email = excluded.fallback_email", user, int(on)))
        (self.fallback.add if on else self.fallback.discard)(user)

    def test_rows(self, project: str, who: str, cause: str) -> tuple[list[Op], list[str]]:
        """A test message along ``project``'s routes: the rows, and where they go."""
        dests: dict[str, Address] = {}
        for route in self.config.routes_for(project):
            for address in route.to:
                dests.setdefault(address.key, address)
        text = f"test notification for {project}, asked by {who}"
        return (self.outbox.rows(cause, list(dests.values()), text, subject=f"[{project}] test notification",
                                 origin=f"notify test by {who}", project=project), list(dests))


def plain_line(event: Event, kind: str) -> str:
    where = f"[{event.project}] " if event.project else ""
    step = f" at {event.step}" if event.step and kind not in ("launched", "completed", "cancelled") else ""
    detail = f": {event.detail}" if event.detail and kind != "launched" else ""
    return f"{where}{event.process} #{event.instance_id} {kind}{step}{detail}"[:400]


class Flusher:
    """Sends what waits in SQLite: each minute's flood summaries and the digests
    whose period ended (see the module docstring)."""

    def __init__(self, routing: Routing, interval: float = 5.0) -> None:
        self.routing = routing
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="notify-flusher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.flush()
            except Exception:
                log.exception("notifications: flushing summaries and digests failed; trying again")
            await asyncio.sleep(self.interval)

    async def flush(self) -> int:
        """Queue every finished minute's summary and every digest now due; returns how many messages."""
        routing, storage = self.routing, self.routing.storage
        now = routing.clock()
        minute = now - now % routing.config.flood_window
        sent = 0
        held = await storage.query("SELECT dest, window, kind, project, COUNT(*), MAX(id) FROM notify_held "
                                   "WHERE window < ? GROUP BY dest, window, kind, project ORDER BY dest, window",
                                   minute)
        groups: dict[tuple[str, float], list[tuple[str, str, int, int]]] = {}
        for dest, window, kind, project, count, top in held:
            groups.setdefault((dest, window), []).append((kind, project, count, top))
        for (dest, window), parts in groups.items():
            total = sum(p[2] for p in parts)
            top = max(p[3] for p in parts)
            what = ", ".join(f"{count} {kind}" + (f" in {project}" if project else "")
                             for kind, project, count, _ in sorted(parts, key=lambda p: -p[2]))
            text = (f"... and {total} more event(s) since {time.strftime('%H:%M:%S', time.gmtime(window))} UTC, "
                    f"not sent one by one: {what} (history and ps have each)")
            address = _address(dest)
            ops = routing.outbox.rows(f"summary {window!r}", [address], text, subject="[release bot] summary",
                                      origin="flood summary")
            ops.append(storage.op("DELETE FROM notify_held WHERE dest = ? AND window = ? AND id <= ?",
                                  dest, window, top))
            await storage.write(*ops)
            sent += 1
        due = await storage.query("SELECT subscription, dest, due, COUNT(*), MAX(id) FROM notify_digest "
                                  "WHERE due <= ? GROUP BY subscription, dest, due", now)
        for sub_id, dest, period, count, top in due:
            lines = [line for (line,) in await storage.query(
                "SELECT line FROM notify_digest WHERE subscription = ? AND due = ? AND id <= ? ORDER BY id",
                sub_id, period, top)]
            shown = lines[:200]
            text = f"digest ({count} event(s)):\n" + "\n".join(shown) + (
                f"\n... and {count - len(shown)} more" if count > len(shown) else "")
            ops = routing.outbox.rows(f"digest {sub_id} {period!r}", [_address(dest)], text,
                                      subject=f"[release bot] digest: {count} event(s)", origin=f"digest {sub_id}")
            ops.append(storage.op("DELETE FROM notify_digest WHERE subscription = ? AND due = ? AND id <= ?",
                                  sub_id, period, top))
            await storage.write(*ops)
            sent += 1
        if sent:
            routing.outbox.wake()
        return sent


def _address(key: str) -> Address:
    """Back from ``Address.key``."""
    if key.startswith("user:"):
        name, _, network = key[5:].rpartition("@")
        return Address("user", network, name)
    kind, network, target = key.split(":", 2)
    return Address(kind, network, target)
