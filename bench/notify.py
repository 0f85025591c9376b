#!/usr/bin/env python3
"""Notification benchmarks: what the durable outbox and per-project routing
cost the engine, and how fast and how soon messages reach real servers on
127.0.0.1.  Prints ``name=value`` lines (medians of RUNS runs; a ratio is the
median of per-run ratios of figures measured in the same run, alternated so
both see the same machine).

  durable_processes_per_s          bench/engine.py's figure, by its own durable_run (the
                                   5-step process, synchronous=FULL), measured here
  durable_processes_per_s_routed   the same process shape and measure, with the app's
                                   routing watcher (Routing.rows_for) on the engine and a "*"
                                   project routing every event kind ("*") to two IRC channels:
                                   each instance's two routed events (launched, completed) queue
                                   4 outbox rows in the transitions' commits.  The outbox runs
                                   meanwhile (woken by every commit, as bot/app.py wakes it) and
                                   delivers to an in-process front-end that confirms each message
                                   at once, so its reads and its one 'delivered' commit per
                                   message share the CPU and the writer.  Timed as in
                                   bench/engine.py: first launch to last instance completed
  engine_with_outbox_ratio         the second / the first (goal: >= 0.8)
  outbox_backlog_at_end            of the 4 x PROCESSES rows, those not yet delivered when the
                                   last instance completed
  outbox_drain_after_s             seconds from then to the last row delivered
  durable_processes_per_s_routed_delivered  PROCESSES / (first launch -> last row delivered)
  engine_with_outbox_delivered_ratio        that / durable_processes_per_s: what the engine can
                                   sustain when every message must also be delivered
  email_delivered_per_s            EMAIL_ROWS mails committed to the outbox first, to EMAIL_DESTS
                                   addresses (order is kept per destination, so each address is
                                   one lane), then delivered by the outbox through the real email
                                   Transport to an aiosmtpd SmtpSink (in this process, in its own
                                   thread): rows / (outbox started -> last delivery recorded)
                                   (goal: >= 200)
  email_connections                SMTP connections a run opened (1: reused)
  notify_latency_p50_ms / _p99_ms  a notify step's commit (its "done" announced, which follows the
                                   commit) -> its line read by a real IRC client on ngircd,
                                   through the real App (run_bot.py's config loading, bot/app.py)
                                   with pacing_rate 1e6/s and burst 1e6; NOTIFY_SAMPLES
                                   instances one at a time after a warm-up (goals: <= 20 / <= 100)
  routing_events_per_s             ROUTING_EVENTS events (5 kinds, 100 projects and a sub-project
                                   of each) through Routing.rows_for, with 100 project routes
                                   and SUBSCRIPTIONS subscriptions (see subscriptions()), and the
                                   rows it makes committed through the store (synchronous=FULL),
                                   ROUTING_BATCH events per commit as transitions share a group
                                   commit, the next batch matched while one commits; flood
                                   safety lifted (every match is a row) (goal: >= 20,000)
  routing_rows_per_event           outbox rows per event (what the figure above writes)
  routing_digest_rows_per_event    digest rows per event (subscriptions with a daily digest)
  routing_rows_written_per_s       outbox and digest rows committed per second meanwhile

``python bench/notify.py`` (about 50 s; BENCH_ONLY=ratio|email|latency|routing runs one part).
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from bench.engine import FIVE_STEPS, Approval, Quick, durable_run, specs  # noqa: E402
from bot.app import App, tune_gc  # noqa: E402
from bot.chat import Message, Outgoing, Room, Target  # noqa: E402
from bot.transports.email import EmailConfig, EmailTransport  # noqa: E402
from bot.transports.email.message import mailbox  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.events import Event  # noqa: E402
from engine.participant_runtime import ParticipantEnv  # noqa: E402
from engine.participants import ParticipantRegistry, Reply  # noqa: E402
from engine.store import Op, Store  # noqa: E402
from notifiers.destinations import Address, Book  # noqa: E402
from notifiers.outbox import Outbox, Settings  # noqa: E402
from notifiers.routes import NotificationConfig, ProjectRoutes, Route  # noqa: E402
from notifiers.routing import Routing  # noqa: E402
from run_bot import load  # noqa: E402
from tests.serverkit import ServerMissing  # noqa: E402
from tests.serverkit.irc import Human as IrcHuman  # noqa: E402
from tests.serverkit.irc import start_ngircd  # noqa: E402
from tests.serverkit.smtp import SmtpSink  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
PROCESSES = int(os.environ.get("BENCH_PROCESSES", "3000"))
# Flood safety (notifications.flood_per_minute, at most 1000 in bot.yaml) would hold most of
# these events for a summary; the benchmark lifts it so that every event is a row to deliver.
NO_FLOOD = 10**9


# -- engine_with_outbox_ratio ---------------------------------------------------------------

class Instant:
    """An in-process front-end that confirms every message as it is handed
    over: the outbox's own work per message, with no network behind it."""

    protocol = "irc"

    def __init__(self, network: str) -> None:
        self.network = network
        self.ready = True
        self.sent = 0

    async def send(self, target: Target, message: str | Outgoing) -> asyncio.Future[None]:
        self.sent += 1
        receipt: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        receipt.set_result(None)
        return receipt


def two_channel_routes() -> tuple[Book, NotificationConfig]:
    book = Book({"bench": "irc"})
    to = (Address("room", "bench", "#releases"), Address("room", "bench", "#audit"))
    return book, NotificationConfig({"*": ProjectRoutes((Route(("*",), to),))}, flood_per_minute=NO_FLOOD)


async def routed_durable_run(n: int, workdir: Path) -> dict[str, float]:
    """bench/engine.py's durable_run, with the app's routing watcher and a
    running outbox (see the module docstring)."""
    store = Store(workdir / f"routed-{time.monotonic_ns()}.sqlite3", synchronous="FULL")
    store.open()
    book, config = two_channel_routes()
    outbox = Outbox(store, book, lambda user, network: None)
    await outbox.open()
    routing = Routing(store, outbox, config)
    await routing.open()
    engine = Engine(store, specs(FIVE_STEPS), ParticipantRegistry([Quick(), Approval()]), use_scheduler=False,
                    participant_env=ParticipantEnv(outbox=outbox))
    engine.watch(routing.rows_for)
    await engine.start()
    front = Instant("bench")
    outbox.attach({"bench": front})
    done = asyncio.Event()
    finished = 0
    answers: set[asyncio.Task[None]] = set()

    async def committed(_event: Event) -> None:     # as bot/app.py wakes the outbox
        outbox.wake()
    engine.bus.subscribe(committed)

    async def on_event(event: Event) -> None:
        nonlocal finished
        if event.event == "pending":
            key = engine._instances[event.instance_id].runs[event.path].key
            assert key is not None
            task = asyncio.ensure_future(engine.reply(key, Reply.done({"approved": True}), actor="bench"))
            answers.add(task)
            task.add_done_callback(answers.discard)
        elif event.event == "completed":
            finished += 1
            if finished == n:
                done.set()
    engine.bus.subscribe(on_event, ["pending", "completed"])
    await outbox.start()
    t0 = time.perf_counter()
    await asyncio.gather(*(engine.launch("five", {"n": i}) for i in range(n)))
    await done.wait()
    elapsed = time.perf_counter() - t0
    backlog = n * 4 - outbox.delivered
    while outbox.delivered < n * 4:           # the last row confirmed and marked delivered
        await asyncio.sleep(0.002)
    drained = time.perf_counter() - t0
    [(rows, queued)] = await store.read(lambda c: c.execute(
        "SELECT COUNT(*), SUM(state != 'delivered') FROM outbox_messages").fetchall())
    assert rows == n * 4 == front.sent and not queued, (rows, front.sent, queued)
    await outbox.stop()
    await engine.stop()
    store.close()
    return {"rate": n / elapsed, "delivered_rate": n / drained, "backlog": float(backlog),
            "drain_after": drained - elapsed}


async def ratio_runs(work: Path) -> dict[str, float]:
    plain: list[float] = []
    routed: list[dict[str, float]] = []
    for _ in range(RUNS):       # alternated, so that both see the same machine
        plain.append(await durable_run(PROCESSES, work))
        routed.append(await routed_durable_run(PROCESSES, work))
    return {
        "durable_processes_per_s": statistics.median(plain),
        "durable_processes_per_s_routed": statistics.median(r["rate"] for r in routed),
        "engine_with_outbox_ratio": statistics.median(r["rate"] / p for r, p in zip(routed, plain)),
        "outbox_backlog_at_end": statistics.median(r["backlog"] for r in routed),
        "outbox_drain_after_s": statistics.median(r["drain_after"] for r in routed),
        "durable_processes_per_s_routed_delivered": statistics.median(r["delivered_rate"] for r in routed),
        "engine_with_outbox_delivered_ratio": statistics.median(r["delivered_rate"] / p
                                                                for r, p in zip(routed, plain)),
    }


# -- email_delivered_per_s ------------------------------------------------------------------

EMAIL_ROWS = 1000
EMAIL_DESTS = 20
MAIL_BODY = ("The release 2.4.1 of project example is published.\n"
             "Artifacts: https://example.test/releases/2.4.1/\n" * 10)


async def email_run(sink: SmtpSink, workdir: Path) -> tuple[float, int]:
    """EMAIL_ROWS rows committed first, then delivered by the outbox; rows/s and
    the SMTP connections the transport opened."""
    store = Store(workdir / f"mail-{time.monotonic_ns()}.sqlite3", synchronous="FULL")
    store.open()
    outbox = Outbox(store, Book({"mail": "email"}), lambda user, network: None,
                    settings=Settings(message_domain="bench.test"))
    await outbox.open()
    ops: list[Op] = []
    for i in range(EMAIL_ROWS):
        ops += outbox.rows(f"bench mail {i}", [f"email:mail:user{i % EMAIL_DESTS}@example.test"],
                           f"release {i} published", subject=f"[example] release {i} published", body=MAIL_BODY)
    await store.commit(ops)
    sender = mailbox("Release Bot <bot@bench.test>")
    assert not isinstance(sender, str), sender          # a str is the parser's complaint
    transport = EmailTransport(EmailConfig(name="mail", smtp_host="127.0.0.1", smtp_port=sink.port,
                                           security="plaintext", sender=sender, helo="bot.bench.test",
                                           idle_timeout=30.0))

    async def no_incoming(message: Message) -> None:      # mail out only
        return None
    await transport.start(no_incoming)
    before = len(sink.received)
    try:
        outbox.attach({"mail": transport})
        t0 = time.perf_counter()
        await outbox.start()
        while outbox.delivered < EMAIL_ROWS:
            if outbox.failed:
                raise SystemExit(f"email_delivered_per_s: {outbox.failed} mail(s) failed")
            await asyncio.sleep(0.002)
        elapsed = time.perf_counter() - t0
        assert len(sink.received) - before == EMAIL_ROWS, len(sink.received) - before
        return EMAIL_ROWS / elapsed, transport.connections
    finally:
        await outbox.stop()
        await transport.close()
        store.close()


async def email_runs(work: Path) -> dict[str, float]:
    sink = SmtpSink().start()
    try:
        results = [await email_run(sink, work) for _ in range(RUNS)]
    finally:
        sink.cleanup()
    return {"email_delivered_per_s": statistics.median(r[0] for r in results),
            "email_connections": float(max(r[1] for r in results))}


# -- notify_latency ---------------------------------------------------------------------------

NOTIFY_SAMPLES = 300
NOTIFY_WARMUP = 20
NOTE = """\
name: note
inputs: {n: int}
steps:
  - participant: notify
    params:
      to: ["irc:benchirc:#rel"]
      message: "note {{ n }}"
"""


def write_home(root: Path, networks: str, processes: dict[str, str], users: str) -> Path:
    """A bot home as run_bot.py reads it; returns its conf directory."""
    conf = root / "conf"
    (conf / "processes").mkdir(parents=True)
    (conf / "bot.yaml").write_text("database: var/bot.sqlite3\ndurability: full\nconsole: {user: admin}\n"
                                   "log_level: WARNING\n" + textwrap.dedent(networks))
    (conf / "users.yaml").write_text(textwrap.dedent(users))
    for name, text in processes.items():
        (conf / "processes" / f"{name}.yaml").write_text(text)
    return conf


def ngircd_network(port: int, nick: str = "notifybot") -> str:
    """An IRC network on ngircd whose pacing never holds a line back."""
    return f"""
          - protocol: irc
            name: benchirc
            host: 127.0.0.1
            port: {port}
            tls: false
            nick: {nick}
            channels: ["#rel"]
            pacing_rate: 1000000
            pacing_burst: 1000000
            reconnect_min: 0.2s
    """


async def start_app(conf: Path) -> App:
    config, registry = load(conf)
    app = App(config, registry)
    await app.start()
    deadline = time.monotonic() + 15
    while not all(t.ready for t in app.transports):      # connected, registered, channels joined
        if time.monotonic() > deadline:
            raise SystemExit(f"not ready within 15 s: {[t.network for t in app.transports if not t.ready]}")
        await asyncio.sleep(0.02)
    return app


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def notify_latency(work: Path) -> dict[str, float]:
    try:
        server = start_ngircd(work / "ngircd")
    except ServerMissing as exc:
        raise SystemExit(f"notify_latency: {exc}") from None
    human: IrcHuman | None = None
    app: App | None = None
    try:
        conf = write_home(work / "notify-home", "networks:" + ngircd_network(server.port), {"note": NOTE},
                          "users:\n  admin:\n    roles: {'*': [admins]}\n")
        app = await start_app(conf)
        irc = app.transports[0]
        receipt = await irc.send(Room("irc", "benchirc", "#rel"), "probe")
        if not isinstance(receipt, asyncio.Future):
            raise SystemExit("notify_latency: the IRC front-end's send() returns no receipt future; skipped")
        await asyncio.wait_for(receipt, 10)
        human = await IrcHuman.connect(server.port, "watcher")
        await human.join("#rel")
        committed: dict[int, float] = {}

        async def on_done(event: Event) -> None:       # announced only after its commit
            if event.path:
                committed.setdefault(event.instance_id, time.perf_counter())
        app.engine.bus.subscribe(on_done, ["done"])
        latencies: list[float] = []
        for i in range(NOTIFY_WARMUP + NOTIFY_SAMPLES):
            iid = await app.engine.launch("note", {"n": i}, actor="bench")
            line = await human.expect(lambda m: m.command == "PRIVMSG" and m.nick == "notifybot", 10)
            arrived = time.perf_counter()
            assert line.text == f"note {i}" and line.params[0] == "#rel", line.raw
            assert iid in committed, f"#{iid}: its line arrived before its commit was announced"
            if i >= NOTIFY_WARMUP:
                latencies.append((arrived - committed[iid]) * 1000)
        return {"notify_latency_p50_ms": statistics.median(latencies),
                "notify_latency_p99_ms": percentile(latencies, 0.99)}
    finally:
        if human is not None:
            await human.close()
        if app is not None:
            await app.stop()
        server.stop()


# -- routing_events_per_s ----------------------------------------------------------------------

ROUTING_EVENTS = 50_000
ROUTING_BATCH = 200            # events per commit
ROUTE_PROJECTS = 100
SUBSCRIPTIONS = 1000
KINDS = ("launched", "completed", "failed", "publish done", "step failed")


def routing_world() -> tuple[Book, NotificationConfig]:
    """100 projects (Proj0..Proj99) with one route each, to its own channel."""
    book = Book({"bench": "irc", "mail": "email"})
    projects = {f"Proj{k}": ProjectRoutes((Route(("failed", "completed", "publish *"),
                                                 (Address("room", "bench", f"#proj{k}"),)),))
                for k in range(ROUTE_PROJECTS)}
    return book, NotificationConfig(projects, flood_per_minute=NO_FLOOD)


def routing_events(n: int) -> list[Event]:
    rng = random.Random(11)
    events = []
    for i in range(n):
        kind = rng.choice(KINDS)
        project = f"Proj{rng.randrange(ROUTE_PROJECTS)}" + rng.choice(("", "", ":Sub"))
        path, name = {"launched": ("", "launched"), "completed": ("", "completed"),
                      "failed": ("1", "failed"), "publish done": ("2", "publish done"),
                      "step failed": ("1", "error")}[kind]
        events.append(Event(i + 1, "release", 1.7e9 + i / 1000, path, "publish" if path else "", name,
                            "bench", "devel: snapshot 42" if path else "", project))
    return events


def subscriptions() -> list[tuple[str, str, str, str, str]]:
    """SUBSCRIPTIONS rows (user, project, pattern, network, digest): 300 users; 1% on
    every project ("*", failures only: the admins), the rest on the 100 projects and a
    sub-project of each; kinds failed 40%, completed, "publish *" and "*" 20% each;
    a third by mail; one in ten a daily digest."""
    rng = random.Random(5)
    projects = [f"Proj{k}" for k in range(ROUTE_PROJECTS)] + [f"Proj{k}:Sub" for k in range(ROUTE_PROJECTS)]
    patterns = ("failed", "failed", "completed", "publish *", "*")
    rows = []
    for i in range(SUBSCRIPTIONS):
        admin = i % 100 == 0
        rows.append((f"u{i % 300}", "*" if admin else rng.choice(projects), "failed" if admin else rng.choice(patterns),
                     rng.choice(("bench", "bench", "mail")), "daily" if i % 10 == 5 else ""))
    return rows


async def routing_run(work: Path) -> dict[str, float]:
    store = Store(work / f"routing-{time.monotonic_ns()}.sqlite3", synchronous="FULL")
    store.open()
    book, config = routing_world()
    outbox = Outbox(store, book, lambda user, network: None)
    await outbox.open()
    routing = Routing(store, outbox, config)
    await routing.open()
    await store.commit([("INSERT INTO notify_subscriptions (user, project, pattern, network, digest, created) "
                         "VALUES (?,?,?,?,?,0)", subscriptions(), True)])
    await routing.open()                     # as at start: the subscriptions read into memory
    assert len(routing._subs) > ROUTE_PROJECTS // 2
    events = routing_events(ROUTING_EVENTS)
    in_flight: list[asyncio.Future[None]] = []
    ops_total = 0
    t0 = time.perf_counter()
    for start in range(0, len(events), ROUTING_BATCH):
        ops = routing.rows_for(events[start:start + ROUTING_BATCH])
        ops_total += len(ops)
        in_flight.append(store.commit(ops))
        if len(in_flight) >= 2:          # the next batch is matched while this one commits
            await in_flight.pop(0)
    for future in in_flight:
        await future
    elapsed = time.perf_counter() - t0
    [(rows,)] = await store.read(lambda c: c.execute("SELECT COUNT(*) FROM outbox_messages").fetchall())
    [(digests,)] = await store.read(lambda c: c.execute("SELECT COUNT(*) FROM notify_digest").fetchall())
    store.close()
    return {"rate": ROUTING_EVENTS / elapsed, "rows": rows / ROUTING_EVENTS, "digests": digests / ROUTING_EVENTS,
            "written": (rows + digests) / elapsed}


async def routing_runs(work: Path) -> dict[str, float]:
    results = [await routing_run(work) for _ in range(RUNS)]
    return {"routing_events_per_s": statistics.median(r["rate"] for r in results),
            "routing_rows_per_event": statistics.median(r["rows"] for r in results),
            "routing_digest_rows_per_event": statistics.median(r["digests"] for r in results),
            "routing_rows_written_per_s": statistics.median(r["written"] for r in results)}


async def run() -> dict[str, float]:
    logging.getLogger().setLevel(logging.WARNING)
    results: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="bench-notify-"))
    try:
        only = os.environ.get("BENCH_ONLY", "")      # e.g. BENCH_ONLY=routing: that part alone
        for part in (ratio_runs, email_runs, notify_latency, routing_runs):
            if only and only not in part.__name__:
                continue
            got = await part(work)
            for name, value in got.items():
                print(f"{name}={FORMATS.get(name, '{:.0f}').format(value)}", flush=True)
            results.update(got)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


FORMATS = {"engine_with_outbox_ratio": "{:.2f}", "engine_with_outbox_delivered_ratio": "{:.2f}",
           "outbox_drain_after_s": "{:.2f}", "notify_latency_p50_ms": "{:.1f}", "notify_latency_p99_ms": "{:.1f}",
           "routing_rows_per_event": "{:.2f}", "routing_digest_rows_per_event": "{:.2f}"}


def main() -> None:
    tune_gc()        # the collector settings of the bot process (bot/app.py), which this measures
    asyncio.run(run())


if __name__ == "__main__":
    main()
