"""Guards around the engine: definitions that would freeze or brick the bot
are reported by ``check``; what slips past is bounded at run time; one bot
per database; a timer survives a crash at any point of its delivery; a bad
database is a one-line refusal, not a traceback."""
from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from engine.definitions import collect_definitions, parse_definition
from engine.engine import MAX_SUBPROCESS_DEPTH, Engine
from engine.participants import ParticipantRegistry, Reply, Workitem
from engine.yamlconfig import loads_yaml
from engine.durations import parse_duration
from engine.store import Store, StoreError
from engine.timerops import ArmTimer, TimerKey
from engine.timers import ManualClock, SystemClock
from participants import discover
from tests.botproc import ROOT, Bot, make_home
from tests.engine_fixtures import START, Recorder, advance, close_engine, events, fields, status, timers, trace


# -- helpers ---------------------------------------------------------------------

@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Interrupt code that never yields to the event loop (a test that would
    otherwise hang fails instead)."""
    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still running after {seconds}s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def problems_in(tmp_path: Path, files: dict[str, str]) -> list[str]:
    """What validation says about a directory of definitions, as file:line: message."""
    folder = tmp_path / "processes"
    folder.mkdir()
    for stem, text in files.items():
        (folder / f"{stem}.yaml").write_text(textwrap.dedent(text))
    _specs, found, _names = collect_definitions(folder, frozenset(discover_names()), base=tmp_path)
    return sorted(str(p) for p in found)


def discover_names() -> frozenset[str]:
    return ParticipantRegistry(discover()).names()


def parse_problems(text: str) -> list[str]:
    _spec, found = parse_definition(loads_yaml(textwrap.dedent(text), "p.yaml"), "p.yaml", "p",
                                    discover_names(), textwrap.dedent(text))
    return [str(p) for p in found]


def set_database(home: Path, database: str) -> None:
    bot_yaml = home / "conf" / "bot.yaml"
    bot_yaml.write_text(bot_yaml.read_text().replace("database: var/bot.sqlite3", f"database: {database}"))


def refused(home: Path) -> str:
    """Start the real bot; it must refuse, exit 1 and say why in one line."""
    run = subprocess.run([sys.executable, str(ROOT / "run_bot.py"), "--conf", str(home / "conf")],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr, run.stderr
    return run.stderr.strip().splitlines()[-1]


ECHO = "steps:\n  - participant: echo\n"


# -- 1. subprocess cycles ----------------------------------------------------------

def test_a_subprocess_cycle_is_reported_at_every_line_that_closes_it(tmp_path: Path) -> None:
    assert problems_in(tmp_path, {
        "a": """
            steps:
              - participant: echo
              - subprocess: b
            """,
        "b": """
            steps:
              - if: "again | default(false)"
                then:
                  - subprocess: a
              - subprocess: b
            """,
        "c": """
            steps:
              - subprocess: a
            """,
    }) == [
        "processes/a.yaml:4: subprocess cycle: a -> b -> a",
        "processes/b.yaml:5: subprocess cycle: b -> a -> b",
        "processes/b.yaml:6: subprocess cycle: b -> b",
    ]


def test_a_cycle_through_an_error_handler_is_reported(tmp_path: Path) -> None:
    assert problems_in(tmp_path, {
        "main": """
            steps:
              - participant: fail
                on_error: {subprocess: cleanup}
            """,
        "cleanup": """
            steps:
              - subprocess: main
            """,
    }) == [
        "processes/cleanup.yaml:3: subprocess cycle: cleanup -> main -> cleanup",
        "processes/main.yaml:4: subprocess cycle: main -> cleanup -> main",
    ]


def test_run_bot_check_reports_a_subprocess_cycle(tmp_path: Path) -> None:
    home = make_home(tmp_path, {"again": "steps:\n  - participant: echo\n  - subprocess: again\n"})
    run = subprocess.run([sys.executable, str(ROOT / "run_bot.py"), "check", str(home / "conf")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert run.stdout.splitlines() == ["conf/processes/again.yaml:3: subprocess cycle: again -> again"]


async def test_subprocess_nesting_is_bounded_at_run_time(engines) -> None:
    # validation is bypassed here (an instance on an earlier version could do the same)
    engine = await engines({"loop": "steps:\n  - subprocess: loop\n"})
    with deadline(10):
        iid = await engine.launch("loop")
        await engine.idle()
    deepest = iid + MAX_SUBPROCESS_DEPTH
    assert await engine.instance_count(include_finished=True) == MAX_SUBPROCESS_DEPTH + 1
    assert (await engine.summary(deepest)).error == (
        f"loop@0: subprocess #{deepest + 1} cannot start: 'loop' would be nested more than "
        f"{MAX_SUBPROCESS_DEPTH} subprocesses deep (a subprocess cycle?)")
    assert {s.status for s in await engine.instances(include_finished=True)} == {"failed"}
    # nothing is stuck: the bot still answers, and the failed chain can be cancelled
    assert await engine.cancel(iid) is None
    assert await status(engine, iid) == "cancelled"


# -- 2. one bot per database -----------------------------------------------------------

def test_a_second_store_on_one_database_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    import os

    first = Store(tmp_path / "bot.sqlite3")
    first.open()
    second = Store(tmp_path / "bot.sqlite3")
    with pytest.raises(StoreError) as refused_:
        second.open()
    assert str(refused_.value) == (f"database {tmp_path / 'bot.sqlite3'} is in use by another bot "
                                   f"(pid {os.getpid()}); stop it first")
    first.close()
    second.open()
    second.close()


def test_a_killed_bots_lock_goes_with_it(tmp_path: Path) -> None:
    db = tmp_path / "bot.sqlite3"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from engine.store import Store; "
         "Store(sys.argv[1]).open(); print('ready', flush=True); time.sleep(60)", str(db)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(StoreError, match=rf"in use by another bot \(pid {holder.pid}\)"):
            Store(db).open()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    store = Store(db)
    store.open()
    store.close()


def test_a_second_bot_is_refused_while_check_still_works(tmp_path: Path) -> None:
    home = make_home(tmp_path, {"hello": ECHO})
    bot = Bot(home).start()
    try:
        assert refused(home) == (f"refusing to start: database {home / 'var' / 'bot.sqlite3'} is in use "
                                 f"by another bot (pid {bot.proc.pid}); stop it first")  # type: ignore[union-attr]
        check = subprocess.run([sys.executable, str(ROOT / "run_bot.py"), "check", str(home / "conf")],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        assert bot.ask("launch hello") == ["launched hello as #1"]    # the first bot is unharmed
    finally:
        assert bot.stop() == 0


# -- 3. repeated and unreachable timers ----------------------------------------------------

async def test_a_repeated_reminder_name_fires_each_time_in_order(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"t": """
        steps:
          - {id: ask, participant: pend, timers: "2s: remind, 4s: remind, 6s: escalate, 8s: timeout"}
        """}, [pend])
    iid = await engine.launch("t")
    await engine.idle()
    (ask,) = pend.consumed()
    assert await timers(engine, iid) == [("remind", "ask", START + 2, False), ("remind", "ask", START + 4, False),
                                         ("escalate", "ask", START + 6, False), ("timeout", "ask", START + 8, False)]
    await advance(engine, 2)
    assert pend.timers() == [(ask.key, "remind")]
    await advance(engine, 2)
    assert pend.timers() == [(ask.key, "remind"), (ask.key, "remind")]
    await advance(engine, 2)
    assert pend.timers() == [(ask.key, "remind"), (ask.key, "remind"), (ask.key, "escalate")]
    assert [e.event for e in await engine.history(iid)].count("timer remind") == 2
    assert pend.timer_ids == [f"{ask.key}/remind", f"{ask.key}/remind#2", f"{ask.key}/escalate"]   # one id per timer
    await advance(engine, 2)
    assert await status(engine, iid) == "failed"


async def test_repeated_reminders_overdue_at_once_are_all_delivered(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"t": "steps: [{id: ask, participant: pend, timers: '1h: remind, 2h: remind'}]"},
                           [pend])
    await engine.launch("t")
    await engine.idle()
    await advance(engine, 3 * 3600)         # the bot was down over both
    assert [name for _key, name in pend.timers()] == ["remind", "remind"]


def test_a_timer_at_or_after_the_timeout_is_a_problem() -> None:
    assert parse_problems("""
        steps:
          - id: ask
            participant: hold
            timers: "4h: remind, 5d: remind, 1d: escalate, 1d: timeout"
          - id: other
            participant: hold
            timeout: 2h
            timers: "3h: remind"
        """) == [
        "p.yaml:5: timers: escalate at 1d can never fire: the step times out at 1d",
        "p.yaml:5: timers: remind at 5d can never fire: the step times out at 1d",
        "p.yaml:9: timers: remind at 3h can never fire: the step times out at 2h",
    ]


# -- 4. a timer's delivery survives a crash at any point -----------------------------------

class CrashingAfterTimer(Recorder):
    """Answers a timer, then "dies": the store lets ``commits`` more
    commits through and never writes another (as after SIGKILL)."""

    def __init__(self, store_of: Any, commits: int) -> None:
        super().__init__("pend", mode="pending")
        self.store_of = store_of
        self.commits = commits
        self.timer_reply = Reply.done({"escalated": True})

    async def on_timer(self, workitem: Workitem, name: str, timer_id: str) -> Reply | None:
        reply = await super().on_timer(workitem, name, timer_id)
        store = self.store_of()
        real, left = store.commit, [self.commits]

        def commit(*parts: Any, **shared: Any) -> "asyncio.Future[None]":
            if left[0] > 0:
                left[0] -= 1
                return real(*parts, **shared)
            return asyncio.get_running_loop().create_future()   # never durable: the process is gone
        store.commit = commit
        return reply


@pytest.mark.parametrize("commits", [0, 1], ids=["crash before any commit", "crash after one commit"])
async def test_a_timer_answer_survives_a_crash_after_the_participant_had_it(engines, commits: int) -> None:
    definition = {"t": "steps: [{id: ask, participant: pend, timers: '1h: escalate'}]"}
    clock = ManualClock()
    holder: list[Engine] = []
    pend = CrashingAfterTimer(lambda: holder[0].store, commits)
    engine = await engines(definition, [pend], clock=clock)
    holder.append(engine)
    try:
        iid = await engine.launch("t")
        await engine.idle()
        clock.advance(3600)
        await engine.timers.fire_due()
        for _ in range(100):
            if pend.timers():
                break
            await asyncio.sleep(0.01)
        assert [name for _key, name in pend.timers()] == ["escalate"]
        await asyncio.sleep(0.2)             # whatever may still commit does
    finally:
        await close_engine(engine)
    again = Recorder("pend", mode="pending")
    again.timer_reply = Reply.done({"escalated": True})
    engine = await engines(definition, [again], clock=clock)
    try:
        await engine.idle()
        assert await status(engine, iid) == "completed"
        assert await fields(engine, iid) == {"escalated": True}
        (done,) = await events(engine, iid, "done")
        assert done.actor == "timer escalate"
        assert await timers(engine, iid) == []
        assert [name for _key, name in pend.timers() + again.timers()] == ["escalate"] * (2 - commits)
    finally:
        await close_engine(engine)


async def test_a_timer_that_answers_nothing_is_removed_once_delivered(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"t": "steps: [{id: ask, participant: pend, timers: '1h: remind'}]"}, [pend])
    iid = await engine.launch("t")
    await engine.idle()
    await advance(engine, 3600)
    assert pend.timers() == [(pend.consumed()[0].key, "remind")]
    assert await timers(engine, iid) == []
    assert await status(engine, iid) == "waiting"


# -- 5. an unusable database is a one-line refusal -------------------------------------

def test_refusal_for_a_database_path_that_cannot_be_created(tmp_path: Path) -> None:
    home = make_home(tmp_path, {"hello": ECHO})
    set_database(home, "/proc/nope/bot.sqlite3")
    assert refused(home) == ("refusing to start: database /proc/nope/bot.sqlite3: cannot create the "
                             "directory /proc/nope: No such file or directory")


def test_refusal_for_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    home = make_home(tmp_path, {"hello": ECHO})
    (home / "var").mkdir()
    (home / "var" / "bot.sqlite3").write_text("these are my notes, not a database\n" * 100)
    assert refused(home) == (f"refusing to start: database {home / 'var' / 'bot.sqlite3'}: not an SQLite "
                             "database (file is not a database)")


def test_refusal_for_a_database_from_a_newer_bot(tmp_path: Path) -> None:
    home = make_home(tmp_path, {"hello": ECHO})
    (home / "var").mkdir()
    with sqlite3.connect(home / "var" / "bot.sqlite3") as conn:
        conn.execute("PRAGMA user_version = 99")
    line = refused(home)
    assert line.startswith(f"refusing to start: database {home / 'var' / 'bot.sqlite3'}: schema 99 is newer "
                           "than this bot's (")
    assert line.endswith("); upgrade the bot")


# -- 6. durations a timer cannot hold ----------------------------------------------------

def test_a_duration_over_ten_years_is_a_problem_at_its_line(tmp_path: Path) -> None:
    assert parse_duration("520w") == 520 * 604800
    with pytest.raises(ValueError, match="longer than 10 years"):
        parse_duration(10 * 365 * 86400 + 1)
    assert problems_in(tmp_path, {"nap": """
        steps:
          - participant: echo
          - wait: 600000w
          - participant: echo
            timeout: 99999d
        """}) == [
        "processes/nap.yaml:4: wait: bad duration '600000w': longer than 10 years (3650d)",
        "processes/nap.yaml:6: timeout: bad duration '99999d': longer than 10 years (3650d)",
    ]


def test_a_retry_backoff_that_doubles_past_ten_years_is_a_problem() -> None:
    assert parse_problems("""
        steps:
          - participant: fail
            on_error: {retry: 40, backoff: 10s}
        """) == ["p.yaml:4: on_error: the last of 40 retries would wait about 63629145d, more than "
                 "10 years (3650d); use fewer retries or a shorter backoff"]


async def test_start_survives_a_timer_due_beyond_any_date(engines) -> None:
    engine = await engines()
    await engine.store.commit(Store.timer_ops([ArmTimer(TimerKey(7, "1", "wait"), 1e12)]))   # year 33658
    await close_engine(engine)
    engine = await engines(clock=SystemClock(), use_scheduler=True)   # the real scheduler
    assert engine.timers.armed == 1e12


async def test_a_wait_until_too_far_away_fails_the_step(engines) -> None:
    engine = await engines({"w": "inputs: {when: str}\nsteps:\n  - id: hold\n    wait: {until: '{{ when }}'}\n"})
    iid = await engine.launch("w", {"when": "9999-12-31T23:00:00-12:00"})
    await engine.idle()
    summary = await engine.summary(iid)
    assert (summary.status, summary.error) == (
        "failed", "hold: wait until: '9999-12-31T23:00:00-12:00' is more than 10 years (3650d) away")
    assert await timers(engine, iid) == []


# -- 7. duplicate step ids; how many instances ps did not show -----------------------------

def test_a_step_id_used_twice_is_a_problem_at_the_second_use() -> None:
    assert parse_problems("""
        steps:
          - id: build
            participant: echo
          - concurrence:
              - {id: check, participant: echo}
              - {id: build, participant: echo}
        """) == ["p.yaml:7: id 'build' is already used by the step at line 3"]


async def test_instance_count_says_how_many_a_limited_list_left_out(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"wait": "steps: [{participant: pend}]", "quick": ECHO}, [pend])
    for _ in range(3):
        await engine.launch("wait")
    await engine.launch("quick")
    await engine.idle()
    assert len(await engine.instances(limit=2)) == 2
    assert await engine.instance_count() == 3
    assert await engine.instance_count(include_finished=True) == 4


# -- 8. a handler's error does not linger -------------------------------------------------

@pytest.mark.parametrize("handled", ["on_error", "on_timeout"])
async def test_the_error_given_to_a_handler_is_gone_once_the_step_is_done(engines, handled: str) -> None:
    rec = Recorder(mode="fail" if handled == "on_error" else "pending")
    step = ("{id: flaky, participant: rec, params: {message: 'disk full'}, on_error: {subprocess: handler}}"
            if handled == "on_error" else
            "{id: flaky, participant: rec, timeout: 5s, on_timeout: {subprocess: handler}}")
    engine = await engines({"main": f"""
        fields: {{error: "the author's own field"}}
        steps:
          - {step}
          - if: "error is mapping"
            then: [{{error: "stale error seen"}}]
        """, "handler": """
        steps:
          - set: {handled: "{{ error.message }}"}
        """}, [rec])
    iid = await engine.launch("main")
    await engine.idle()
    await advance(engine, 5)
    assert await status(engine, iid) == "completed"
    message = "disk full" if handled == "on_error" else "timed out after 5s"
    assert await fields(engine, iid) == {"error": "the author's own field", "handled": message}
    # the history still tells what went wrong
    happened = await trace(engine, iid)
    assert ("flaky", "error" if handled == "on_error" else "timed out") in happened
    assert ("flaky", "handler done") in happened
