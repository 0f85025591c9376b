#!/usr/bin/env python3
"""Engine benchmarks.  Prints one ``name=value`` line per figure, each the
median of several runs.

  durable_processes_per_s   5-step process (start, participant, participant that goes
                            pending and is answered, participant, end), synchronous=FULL
  concurrence_branches_per_s  one 100-branch concurrence of quick participant steps,
                            synchronous=FULL, instances one after another: branches
                            completed per second (fan-in: replies that arrive together
                            must share a commit)
  foreach_branches_per_s    the same shape as a for_each: 100 items, concurrent, one quick
                            participant step per body, measured in the same run (goal:
                            at least 90% of concurrence_branches_per_s)
  restart_ready_s           the real bot (run_bot.py) on a database of 10,000 instances waiting
                            with a timer each: from spawn to re-armed and answering a command
  timer_lateness_p99_ms     1,000 timers due at one instant: due -> its transition committed
  rss_mb_10k_waiting        resident memory of that restarted bot
  rss_mb_10k_waiting_all_loaded  resident memory of the process that launched the 10,000
                            and holds them all in memory
"""
from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE / "bench"]   # bench/bugzilla.py is not
sys.path.insert(0, str(HERE))                                                          # python-bugzilla

from bot.app import tune_gc  # noqa: E402
from engine.definitions import parse_definition  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.participants import Participant, ParticipantRegistry, Reply, Workitem  # noqa: E402
from engine.yamlconfig import loads_yaml  # noqa: E402
from engine.store import Store  # noqa: E402

FIVE_STEPS = textwrap.dedent("""
    name: five
    fields: {n: 0}
    steps:
      - participant: quick
      - participant: approval
      - participant: quick
""")
FAN_BRANCHES = 100
FAN_OUT = "name: fan\nsteps:\n  - concurrence:\n" + "      - participant: quick\n" * FAN_BRANCHES
FOR_EACH = textwrap.dedent(f"""
    name: each
    steps:
      - for_each: "{{{{ range({FAN_BRANCHES}) | list }}}}"
        concurrent: true
        do:
          - participant: quick
""")
TIMED = textwrap.dedent("""
    name: timed
    steps:
      - wait: 2s
""")


class Quick(Participant):
    name = "quick"

    async def consume(self, workitem: Workitem) -> Reply:
        return Reply.done()


class Approval(Participant):
    """Goes pending; the benchmark answers as soon as the pending is announced."""
    name = "approval"

    async def consume(self, workitem: Workitem) -> Reply:
        return Reply.pending()


def specs(*texts: str) -> dict:
    names = frozenset({"quick", "approval"})
    out = {}
    for text in texts:
        spec, problems = parse_definition(loads_yaml(text, "bench.yaml"), "bench.yaml", "x", names)
        assert spec is not None, problems
        out[spec.name] = spec
    return out


async def durable_run(n: int, workdir: Path) -> float:
    store = Store(workdir / f"durable-{time.monotonic_ns()}.sqlite3", synchronous="FULL")
    store.open()
    engine = Engine(store, specs(FIVE_STEPS), ParticipantRegistry([Quick(), Approval()]), use_scheduler=False)
    await engine.start()
    done = asyncio.Event()
    finished = 0

    answers: set[asyncio.Task] = set()

    async def on_event(event):  # type: ignore[no-untyped-def]
        nonlocal finished
        if event.event == "pending":
            # people answer independently of each other: one task per answer
            key = engine._instances[event.instance_id].runs[event.path].key
            task = asyncio.ensure_future(engine.reply(key, Reply.done({"approved": True}), actor="bench"))
            answers.add(task)
            task.add_done_callback(answers.discard)
        elif event.event == "completed":
            finished += 1
            if finished == n:
                done.set()
    engine.bus.subscribe(on_event, ["pending", "completed"])
    t0 = time.perf_counter()
    await asyncio.gather(*(engine.launch("five", {"n": i}) for i in range(n)))
    await done.wait()
    elapsed = time.perf_counter() - t0
    await engine.stop()
    store.close()
    return n / elapsed


async def concurrence_run(n: int, workdir: Path, process: str = "fan") -> float:
    """n instances of FAN_OUT (or FOR_EACH), one at a time; branches completed per second."""
    store = Store(workdir / f"fan-{time.monotonic_ns()}.sqlite3", synchronous="FULL")
    store.open()
    engine = Engine(store, specs(FAN_OUT, FOR_EACH), ParticipantRegistry([Quick(), Approval()]), use_scheduler=False)
    await engine.start()
    completed = asyncio.Queue[int]()

    async def on_event(event):  # type: ignore[no-untyped-def]
        completed.put_nowait(event.instance_id)
    engine.bus.subscribe(on_event, ["completed"])
    t0 = time.perf_counter()
    for _ in range(n):
        iid = await engine.launch(process)
        assert await completed.get() == iid
    elapsed = time.perf_counter() - t0
    await engine.stop()
    store.close()
    return n * FAN_BRANCHES / elapsed


WAITING_HOME_PROCESS = """
name: waiting
fields: {i: 0}
steps:
  - participant: hold
    timeout: 1h
"""


def make_home(root: Path) -> Path:
    """A bot home whose database will hold instances waiting on a person, each with a timer."""
    (root / "conf" / "processes").mkdir(parents=True)
    (root / "conf" / "bot.yaml").write_text("database: var/bot.sqlite3\nconsole: {user: admin}\n")
    (root / "conf" / "users.yaml").write_text("users:\n  admin:\n    roles: {'*': [admins]}\n")
    (root / "conf" / "processes" / "waiting.yaml").write_text(WAITING_HOME_PROCESS)
    return root


async def populate_waiting(home: Path, n: int) -> float:
    """Launch n waiting instances in the bot's own database; returns this process's RSS (MB)
    while it holds all of them in memory."""
    from bot.config import load_config
    from participants import discover

    registry = ParticipantRegistry(discover())
    config = load_config(home / "conf", registry.names())
    store = Store(config.database, synchronous="NORMAL")
    store.open()
    engine = Engine(store, config.specs, registry, use_scheduler=False)
    await engine.start()
    for start in range(0, n, 1000):
        await asyncio.gather(*(engine.launch("waiting", {"i": i}) for i in range(start, min(n, start + 1000))))
    await engine.idle()
    assert len(engine._instances) == n
    rss = _rss_mb(os.getpid())
    await engine.stop()
    store.close()
    return rss


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def restart_run(home: Path) -> tuple[float, float]:
    """Spawn the real bot on that database; time until it answers a command; its RSS then."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(HERE / "run_bot.py"), "--console", "--conf", str(home / "conf")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("show 10000\n")
    proc.stdin.flush()
    while True:
        line = proc.stdout.readline()
        assert line, "bot exited"
        if line.startswith("#10000 waiting: waiting"):
            break
    ready = time.perf_counter() - t0
    rss = _rss_mb(proc.pid)
    proc.stdin.close()
    proc.wait(30)
    return ready, rss


async def lateness_run(n: int, workdir: Path) -> float:
    store = Store(workdir / f"timers-{time.monotonic_ns()}.sqlite3", synchronous="FULL")
    store.open()
    engine = Engine(store, specs(TIMED), ParticipantRegistry([Quick(), Approval()]))
    await engine.start()
    late: list[float] = []
    due: dict[int, float] = {}
    done = asyncio.Event()

    async def on_event(event):  # type: ignore[no-untyped-def]
        if event.event == "wait over":
            late.append(time.time() - due[event.instance_id])
            if len(late) == n:
                done.set()
    engine.bus.subscribe(on_event, ["wait over"])
    # all n launched in one transition batch so their timers share one due instant
    ids = await asyncio.gather(*(engine.launch("timed") for _ in range(n)))
    rows = await store.read(lambda c: c.execute("SELECT instance_id, due FROM timers WHERE kind='wait'").fetchall())
    common = max(d for _, d in rows)
    await store.commit([("UPDATE timers SET due = ? WHERE kind = 'wait'", (common,), False)])
    await engine.timers.rearm()
    for iid in ids:
        due[iid] = common
    await asyncio.wait_for(done.wait(), 30)
    await engine.stop()
    store.close()
    late.sort()
    return late[int(len(late) * 0.99) - 1] * 1000


def main() -> None:
    tune_gc()        # the collector settings of the bot process (bot/app.py), which this measures
    runs = int(os.environ.get("BENCH_RUNS", "3"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        n = int(os.environ.get("BENCH_PROCESSES", "3000"))
        rates = [asyncio.run(durable_run(n, work)) for _ in range(runs)]
        print(f"durable_processes_per_s={statistics.median(rates):.0f}", flush=True)
        fans, eaches = [], []
        for _ in range(runs):       # alternated, so that both see the same machine
            fans.append(asyncio.run(concurrence_run(200, work)))
            eaches.append(asyncio.run(concurrence_run(200, work, "each")))
        print(f"concurrence_branches_per_s={statistics.median(fans):.0f}", flush=True)
        print(f"foreach_branches_per_s={statistics.median(eaches):.0f}", flush=True)

        home = make_home(work / "home")
        rss_cached = asyncio.run(populate_waiting(home, 10_000))
        results = [restart_run(home) for _ in range(runs)]
        print(f"restart_ready_s={statistics.median(r[0] for r in results):.3f}", flush=True)
        late = [asyncio.run(lateness_run(1000, work)) for _ in range(runs)]
        print(f"timer_lateness_p99_ms={statistics.median(late):.1f}", flush=True)
        # the bot after a restart loads waiting instances only when something happens to them
        print(f"rss_mb_10k_waiting={statistics.median(r[1] for r in results):.1f}", flush=True)
        # the process that launched them, holding all 10,000 in memory
        print(f"rss_mb_10k_waiting_all_loaded={rss_cached:.1f}", flush=True)

if __name__ == "__main__":
    main()
