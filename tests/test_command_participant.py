"""The ``command`` participant with real processes: argv without a shell,
option injection refused, output and exit code in the fields, the process
group killed on timeout, cancel, exit, bot death (a real bot SIGKILLed) and
at start, ``once``, and the allow list."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Mapping

import pytest

from engine.engine import Engine
from engine.participant_runtime import ParticipantEnv
from engine.participants import Participant, ParticipantRegistry, Services, Workitem
from participants.builtin import Echo
from participants.command import TAG_VARIABLE, Command, CommandConfig, boot_id
from tests.botproc import Bot, make_home
from tests.engine_fixtures import EngineFactory, START, close_engine

PY = sys.executable
Build = Callable[..., Awaitable[Engine]]

PROGRAM = """
import os, signal, subprocess, sys, time

mode, out = sys.argv[1], sys.argv[2]


def note(pid):
    with open(out, "a") as f:
        f.write(f"{pid}\\n")


if mode == "family":            # the program and a grandchild, both sleeping
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    note(child.pid)
    note(os.getpid())
    time.sleep(60)
elif mode == "stubborn":        # ignores SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    note(os.getpid())
    time.sleep(60)
elif mode == "straggler":       # leaves a grandchild behind (holding stdout) and exits
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    note(child.pid)
    print("bye")
elif mode == "interrupt-once":  # the first run sleeps (to be interrupted), later ones finish
    first = not os.path.exists(out)
    note(os.getpid())
    if first:
        time.sleep(60)
    print("ran")
elif mode == "noisy":
    sys.stdout.write("a" * 10000 + "\\nEND\\n")
    for n in range(10):
        print(f"problem {n}", file=sys.stderr)
    sys.exit(int(sys.argv[3]))
"""


@pytest.fixture
def program(tmp_path: Path) -> Path:
    path = tmp_path / "program.py"
    path.write_text(PROGRAM)
    return path


def definition(name: str, argv: list[Any], inputs: Mapping[str, str] | None = None, **params: Any) -> str:
    """A one-step process running ``argv`` (JSON is YAML), declaring ``inputs``."""
    return json.dumps({"name": name, **({"inputs": dict(inputs)} if inputs else {}),
                       "steps": [{"id": "run", "participant": "command", "params": {"argv": argv, **params}}]})


class Cmd(Command):
    """The command participant, keeping its services for the test."""

    services: Services

    async def setup(self, services: Services) -> None:
        self.services = services
        await super().setup(services)


@pytest.fixture
def build(engines: EngineFactory) -> Build:
    """Started engines (from the ``engines`` factory) whose command participant has ``config``."""

    async def factory(definitions: Mapping[str, str], *, config: CommandConfig | None = None,
                      participants: Iterable[Participant] = (), db: str = "c.sqlite3") -> Engine:
        registry = ParticipantRegistry([Echo(), *participants] if participants else [Echo(), Cmd()])
        env = ParticipantEnv(config={"command": config or CommandConfig()})
        return await engines(definitions, registry=registry, db_name=db, participant_env=env)

    return factory


async def finish(engine: Engine, iid: int) -> tuple[str, dict[str, Any], str]:
    """Wait for the engine to settle: the instance's status, fields and error."""
    await engine.idle(timeout=15)
    summary = await engine.summary(iid)
    return summary.status, dict((await engine.describe(iid)).fields), summary.error


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def wait_dead(pids: list[int], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if alive(p)]}"
        time.sleep(0.02)


def pids_in(path: Path, count: int, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().split() if path.exists() else []
        if len(lines) >= count:
            return [int(p) for p in lines]
        assert time.monotonic() < deadline, f"{path} has {lines}"
        time.sleep(0.02)


async def apids_in(path: Path, count: int) -> list[int]:
    return await asyncio.to_thread(pids_in, path, count)


# -- running ------------------------------------------------------------------------------

async def test_argv_runs_without_a_shell_and_the_fields_get_exit_code_and_output(build: Build, tmp_path: Path) -> None:
    code = "import sys; print(sys.argv[1:]); print('to stderr', file=sys.stderr)"
    engine = await build({"c": definition("c", [PY, "-c", code, "{{ repo }}", "--", "{{ name }}"],
                                          inputs={"repo": "str", "name": "str"})})
    iid = await engine.launch("c", {"repo": "x; id > pwned", "name": "-dash"})
    status, fields, _ = await finish(engine, iid)
    assert status == "completed"
    assert fields["exit_code"] == 0
    assert fields["stdout"] == "['x; id > pwned', '--', '-dash']\n"
    assert fields["stderr"] == "to stderr\n"
    assert not (tmp_path / "pwned").exists()


async def test_option_injection_through_a_field_is_refused_and_nothing_runs(build: Build, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').close()"
    engine = await build({"c": definition("c", [PY, "-c", code, "{{ repo }}"], inputs={"repo": "str"})})
    for value in ("--delete", "-e sh", "a\nb"):
        iid = await engine.launch("c", {"repo": value})
        status, _, error = await finish(engine, iid)
        assert status == "failed" and "run: not run: argv[3]" in error, error
    assert not marker.exists()


async def test_a_marked_option_takes_its_value_from_a_field(build: Build) -> None:
    code = "import sys; print(sys.argv[1:])"
    engine = await build({"c": definition("c", [PY, "-c", code, {"option": "--level={{ n }}"}], inputs={"n": "int"})})
    iid = await engine.launch("c", {"n": 3})
    assert (await finish(engine, iid))[1]["stdout"] == "['--level=3']\n"


async def test_a_non_zero_exit_fails_the_step_with_the_last_lines_and_output_keeps_its_tail(
        build: Build, program: Path, tmp_path: Path) -> None:
    engine = await build({"c": definition("c", [PY, str(program), "noisy", str(tmp_path / "x"), "{{ code }}"],
                                          inputs={"code": "int"})},
                         config=CommandConfig(max_output=256))
    iid = await engine.launch("c", {"code": 3})
    status, _, error = await finish(engine, iid)
    assert status == "failed"
    assert error == (f"run: {PY} exited with status 3: problem 5 | problem 6 | problem 7 | problem 8 | problem 9")

    iid = await engine.launch("c", {"code": 0})
    status, fields, _ = await finish(engine, iid)
    assert status == "completed"
    cut, kept = fields["stdout"].split("\n", 1)
    assert cut == f"[{10005 - 256} bytes cut]" and len(kept) == 256 and kept.endswith("a\nEND\n")
    assert fields["stderr"].endswith("problem 9\n") and not fields["stderr"].startswith("[")


async def test_the_allow_list_is_checked_at_run_time(build: Build) -> None:
    engine = await build({"c": definition("c", [PY, "-c", "pass"])}, config=CommandConfig(allow=("createrepo_c",)))
    iid = await engine.launch("c")
    status, _, error = await finish(engine, iid)
    assert status == "failed" and error == f"run: not run: {PY!r} is not an allowed program (allow: createrepo_c)"


async def test_a_missing_program_or_cwd_fails_without_running(build: Build, tmp_path: Path) -> None:
    engine = await build({"c": definition("c", ["no-such-program-here"]),
                          "d": definition("d", [PY, "-c", "pass"], cwd=str(tmp_path / "nowhere"))})
    status, _, error = await finish(engine, await engine.launch("c"))
    assert status == "failed" and error == "run: not run: 'no-such-program-here': no such program in PATH"
    status, _, error = await finish(engine, await engine.launch("d"))
    assert status == "failed" and error.startswith("run: not run: No such file or directory")


async def test_a_templated_cwd_stays_inside_its_literal_directory(build: Build, tmp_path: Path) -> None:
    """A field names a directory inside the one the definition names, never another place
    (found in review: cwd: "/srv/repos/{{ repo }}" with repo=../../tmp/x ran in /tmp/x)."""
    repos = tmp_path / "repos"
    (repos / "devel").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (repos / "sneaky").symlink_to(tmp_path / "elsewhere")
    engine = await build({"c": definition("c", [PY, "-c", "import os; print(os.getcwd())"], {"repo": "str"},
                                          cwd=f"{repos}/{{{{ repo }}}}")})
    status, fields, _ = await finish(engine, await engine.launch("c", {"repo": "devel"}))
    assert status == "completed" and fields["stdout"].strip() == str(repos / "devel")
    for hostile, why in (("../elsewhere", "may not contain '..'"), ("devel/../../elsewhere", "may not contain '..'"),
                         ("sneaky", f"is outside {repos}")):
        status, _, error = await finish(engine, await engine.launch("c", {"repo": hostile}))
        assert status == "failed" and why in error, (hostile, error)


def test_a_templated_cwd_must_start_with_a_literal_absolute_directory() -> None:
    from participants.argsafety import path_problem
    assert path_problem("/srv/repos/{{ repo }}", "cwd") is None
    assert path_problem("/srv/repos", "cwd") is None
    assert "literal start names a directory" in str(path_problem("{{ base }}/x", "cwd"))
    assert "expected an absolute path" in str(path_problem("repos/x", "cwd"))


# -- the process group --------------------------------------------------------------------

async def test_a_timeout_kills_the_program_and_its_children(build: Build, program: Path, tmp_path: Path) -> None:
    out = tmp_path / "pids"
    engine = await build({"c": definition("c", [PY, str(program), "family", str(out)], timeout="300ms")})
    started = time.monotonic()
    iid = await engine.launch("c")
    status, _, error = await finish(engine, iid)
    assert status == "failed" and error.startswith("run: timed out after 0.3s")
    assert time.monotonic() - started < 5
    wait_dead(pids_in(out, 2))


async def test_a_program_ignoring_sigterm_is_killed_after_the_grace(build: Build, program: Path,
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "pids"
    engine = await build({"c": definition("c", [PY, str(program), "stubborn", str(out)], timeout="300ms")},
                         config=CommandConfig(kill_grace=0.2))
    iid = await engine.launch("c")
    status, _, error = await finish(engine, iid)
    assert status == "failed" and error.startswith("run: timed out")
    wait_dead(pids_in(out, 1))


async def test_cancel_kills_the_group(build: Build, program: Path, tmp_path: Path) -> None:
    out = tmp_path / "pids"
    engine = await build({"c": definition("c", [PY, str(program), "family", str(out)])})
    iid = await engine.launch("c")
    pids = await apids_in(out, 2)
    await engine.cancel(iid)
    status, _, _ = await finish(engine, iid)
    assert status == "cancelled"
    wait_dead(pids)
    rows = await engine.store.read(lambda c: c.execute("SELECT COUNT(*) FROM command_runs").fetchone()[0])
    assert rows == 0


async def test_what_a_program_leaves_running_is_killed_when_it_exits(build: Build, program: Path,
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "pids"
    engine = await build({"c": definition("c", [PY, str(program), "straggler", str(out)])})
    started = time.monotonic()
    iid = await engine.launch("c")
    status, fields, _ = await finish(engine, iid)
    assert status == "completed" and fields["stdout"] == "bye\n"
    assert time.monotonic() - started < 5        # the grandchild holding stdout did not hold up the step
    wait_dead(pids_in(out, 1))


async def test_a_group_left_by_an_earlier_run_is_killed_at_start_and_a_reused_id_is_not(build: Build,
                                                                                        tmp_path: Path) -> None:
    await close_engine(await build({}))          # the command_runs table exists
    sleeper = [PY, "-c", "import time; time.sleep(60)"]
    ours = subprocess.Popen(sleeper, start_new_session=True, env={**os.environ, TAG_VARIABLE: "1:0:1/abc"})
    other = subprocess.Popen(sleeper, start_new_session=True, env={**os.environ, TAG_VARIABLE: "someone else"})
    try:
        await asyncio.sleep(0.2)                 # both have exec'd: their environment is in /proc
        with sqlite3.connect(tmp_path / "c.sqlite3") as db:
            db.executemany("INSERT INTO command_runs (key, state, pgid, boot, tag, started, updated) "
                           "VALUES (?, 'started', ?, ?, ?, ?, ?)",
                           [("1:0:1", ours.pid, boot_id(), "1:0:1/abc", START, START),
                            ("2:0:1", other.pid, boot_id(), "2:0:1/def", START, START)])
        db.close()
        engine = await build({})
        assert await asyncio.to_thread(ours.wait, 5) == -signal.SIGKILL
        assert other.poll() is None
        pgids = await engine.store.read(lambda c: c.execute("SELECT pgid FROM command_runs").fetchall())
        assert pgids == [(None,), (None,)]
    finally:
        for proc in (ours, other):
            proc.kill()
            proc.wait()


# -- after a crash: at least once, or once ------------------------------------------------

async def test_an_interrupted_run_runs_again_unless_once(build: Build, program: Path, tmp_path: Path) -> None:
    again, once = tmp_path / "again", tmp_path / "once"
    definitions = {"again": definition("again", [PY, str(program), "interrupt-once", str(again)]),
                   "once": definition("once", [PY, str(program), "interrupt-once", str(once)], once=True)}
    engine = await build(definitions)
    first, second = await engine.launch("again"), await engine.launch("once")
    pids = await apids_in(again, 1) + await apids_in(once, 1)
    await close_engine(engine)                   # a clean stop interrupts the programs, as a crash would
    wait_dead(pids)

    engine = await build(definitions)
    status, fields, _ = await finish(engine, first)
    assert status == "completed" and fields["stdout"] == "ran\n"
    assert len(pids_in(again, 2)) == 2           # at least once: it ran again
    status, _, error = await finish(engine, second)
    assert status == "failed" and error == "run: interrupted (the bot stopped while it ran); retry to run it again"
    assert len(pids_in(once, 1)) == 1            # once: not again
    await engine.retry(second, actor="test")
    status, fields, _ = await finish(engine, second)
    assert status == "completed" and fields["stdout"] == "ran\n"


async def test_a_run_that_finished_before_a_crash_answers_with_its_result(build: Build, tmp_path: Path) -> None:
    cmd = Cmd()
    await build({}, participants=[cmd])
    marker = tmp_path / "ran"
    source = {"argv": [PY, "-c", f"open({str(marker)!r}, 'w').close()"]}

    async def step_params(workitem: Workitem) -> Mapping[str, Any]:
        return source

    await cmd.setup(dataclasses.replace(cmd.services, step_params=step_params))
    storage = cmd.services.storage
    await storage.write(storage.rows(
        "INSERT INTO command_runs (key, state, boot, tag, started, updated, exit_code, error, stdout, stderr) "
        "VALUES (?, 'finished', '', '', ?, ?, ?, ?, ?, ?)",
        [("7:0:1", START, START, 0, None, "out\n", ""), ("8:0:1", START, START, 2, "it broke", "", "x\n")]))

    def workitem(key: str) -> Workitem:
        return Workitem(key, int(key[0]), "p", "0", "run", "command", source, {})
    done = await cmd.consume(workitem("7:0:1"))
    assert (done.kind, dict(done.fields)) == ("done", {"exit_code": 0, "stdout": "out\n", "stderr": ""})
    failed = await cmd.consume(workitem("8:0:1"))
    assert (failed.kind, failed.error) == ("failed", "it broke")
    assert not marker.exists()
    assert len(done.ops) == 1 and done.ops[0][0].startswith("DELETE FROM command_runs")


# -- a real bot, SIGKILLed ----------------------------------------------------------------

def test_a_killed_bot_leaves_no_program_running_and_once_fails_the_step_after_restart(
        tmp_path: Path, program: Path) -> None:
    out = tmp_path / "pids"
    home = make_home(tmp_path / "home", {"slow": definition("slow", [PY, str(program), "family", str(out)],
                                                           once=True)})
    bot = Bot(home).start()
    try:
        bot.send("launch slow")
        bot.expect("as #1")
        pids = pids_in(out, 2)
        assert all(alive(p) for p in pids)
        bot.kill()
        wait_dead(pids)
    finally:
        bot.stop()
    bot = Bot(home).start()
    try:
        deadline = time.monotonic() + 10
        while bot.statuses() != {1: "failed"}:
            assert time.monotonic() < deadline, bot.statuses()
            time.sleep(0.05)
        with bot.db() as db:
            [error] = db.execute("SELECT error FROM instances WHERE id = 1").fetchone()
        assert error == "run: interrupted (the bot stopped while it ran); retry to run it again"
        assert pids_in(out, 2) == pids             # not run again
    finally:
        assert bot.stop() == 0
