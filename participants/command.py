"""The ``command`` participant: runs one program, never through a shell.

    - id: index
      participant: command
      params:
        argv: [createrepo_c, --update, "{{ path }}"]   # a list: the program, then its arguments
        timeout: 10m          # default: the participant's timeout (1h)
        cwd: /srv/repos       # default: the bot's working directory
        env: {LC_ALL: C}      # added to the environment (below)
        once: true            # after a crash mid-run: fail "interrupted" instead of running again

Arguments go to the program as they are: ``repo=x; id`` is one argument,
not a second command.  Which rendered values may start with ``-`` is decided
by ``participants/argsafety.py`` (literal arguments may; a rendered one is an
operand unless marked ``{option: "--level={{ n }}"}`` or after a literal ``--``).

Fields on success: ``exit_code`` (0), ``stdout`` and ``stderr`` (text, the last
``max_output`` bytes of each; when more was written, the text starts with
``[N bytes cut]``).  A non-zero exit, a signal or the timeout fails the step
with the last lines of output in the error.

Processes.  Each program runs under a small supervisor (``_supervisor.py``)
in a new session, whose process group holds the program and everything it
starts.  The group is recorded in the ``command_runs`` table (committed)
before the program may run; the program never outlives its step:

* timeout and cancel: SIGTERM to the group, SIGKILL after ``kill_grace``;
* the program exits: what it left running in its group is killed;
* the bot dies (even by SIGKILL): the supervisor sees its lifeline pipe
  close (and, on Linux, ``PR_SET_PDEATHSIG``) and kills the group;
* at start, a group recorded by an earlier run that is still there is killed
  (checked first: same boot, and its processes carry that run's
  ``RELEASEBOT_COMMAND`` tag in their environment, so a reused group id is
  never touched).

At least once: a step dispatched again after a crash while its program ran
runs it again, unless ``once: true``, which fails it with "interrupted;
retry to run it again".  A program that finished before the crash is never
run again: its recorded result is the answer.

Environment: only the variables named in ``pass_env`` are passed from the
bot's (not its secrets), then the participant's ``env``, then the step's.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from engine.configkit import Section
from engine.durations import format_duration, parse_duration
from engine.participant_runtime import Storage
from engine.participants import Participant, Reply, Services, Workitem
from engine.store import Op
from participants.argsafety import (UnsafeArgument, argv_problems, build_argv, confined_path, is_template, path_problem,
                                   text)

log = logging.getLogger(__name__)

SUPERVISOR = Path(__file__).with_name("_supervisor.py")
TAG_VARIABLE = "RELEASEBOT_COMMAND"
PARAMS = ("argv", "timeout", "cwd", "env", "once")
CONFIG_KEYS = ("allow", "timeout", "kill_grace", "max_output", "env", "pass_env")
PASS_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "USER", "LOGNAME", "TMPDIR")
INTERRUPTED = "interrupted (the bot stopped while it ran); retry to run it again"
KEEP_ROWS = 30 * 86400.0     # rows the engine did not delete with the answer (it was not applied)
ERROR_LINES = 5
ERROR_CHARS = 400
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class CommandConfig:
    """``participants: {command: {...}}`` in bot.yaml."""

    allow: tuple[str, ...] | None = None      # programs argv[0] may name, as written; None: any
    timeout: float = 3600.0
    kill_grace: float = 5.0                   # SIGTERM, then SIGKILL after this
    max_output: int = 16384                   # bytes kept of each of stdout and stderr (the tail)
    env: Mapping[str, str] = field(default_factory=dict)
    pass_env: tuple[str, ...] = PASS_ENV


@dataclass
class _Plan:
    argv: list[str]
    timeout: float
    cwd: str | None
    env: dict[str, str]
    once: bool


@dataclass
class _Run:
    key: str
    popen: subprocess.Popen[bytes]
    lifeline: int | None
    exited: asyncio.Future[None]
    stopping: asyncio.Task[None] | None = None

    @property
    def pgid(self) -> int:
        return self.popen.pid


class Command(Participant):
    name = "command"
    migrations = ("""
        CREATE TABLE command_runs (
            key TEXT PRIMARY KEY,        -- the workitem's dispatch key
            state TEXT NOT NULL,         -- started | finished | interrupted
            pgid INTEGER,                -- the supervisor's process group while it may run
            boot TEXT NOT NULL,          -- the kernel's boot id when it started
            tag TEXT NOT NULL,           -- RELEASEBOT_COMMAND in the processes' environment
            started REAL NOT NULL,
            updated REAL NOT NULL,
            exit_code INTEGER,
            error TEXT,
            stdout TEXT,
            stderr TEXT
        );
    """,)

    def __init__(self) -> None:
        self._config = CommandConfig()
        self._services: Services | None = None
        self._running: dict[str, _Run] = {}       # key -> its program, while it may run
        self._consuming: set[str] = set()         # keys whose consume is under way
        self._cancelled: set[str] = set()         # ... and were cancelled meanwhile

    # -- configuration -------------------------------------------------------------

    def check_config(self, section: Section) -> CommandConfig:
        section.check_keys(CONFIG_KEYS)
        allow = None
        if "allow" in section:
            allow = tuple(section.names("allow", "a list of programs (names looked up in PATH, or absolute paths)"))
            for program in allow:
                if not program or program.startswith("-") or ("/" in program and not program.startswith("/")):
                    section.problem("allow", f"allow: {program!r} is not a program name or an absolute path")
        timeout = section.duration("timeout", CommandConfig.timeout)
        grace = section.duration("kill_grace", CommandConfig.kill_grace)
        max_output = section.get("max_output", int, CommandConfig.max_output,
                                 lambda v: None if v >= 256 else "at least 256 (bytes)")
        env: dict[str, str] = {}
        for name, value in (section.get("env", dict, {}) or {}).items():
            problem = _env_problem(name, value, rendered=False)
            if problem:
                section.problem("env", f"env: {problem}")
            else:
                env[str(name)] = str(value)
        pass_env: tuple[str, ...] = PASS_ENV
        if "pass_env" in section:
            pass_env = tuple(section.names("pass_env", "a list of environment variable names"))
            for name in pass_env:
                if not _ENV_NAME.match(name):
                    section.problem("pass_env", f"pass_env: {name!r} is not a variable name")
        return CommandConfig(allow, timeout, grace, max_output, env, pass_env)

    def check_params(self, params: Mapping[str, Any], config: Any) -> list[str]:
        cfg = config if isinstance(config, CommandConfig) else self._config
        problems = [f"unknown param {key!r} (expected {', '.join(PARAMS)})" for key in params if key not in PARAMS]
        if "argv" not in params:
            problems.append("missing param 'argv' (a list: the program, then its arguments)")
        else:
            problems += argv_problems(params["argv"], cfg.allow)
        timeout = params.get("timeout")
        if timeout is not None and not is_template(timeout):
            try:
                if parse_duration(timeout) <= 0:
                    problems.append("timeout: must be more than 0")
            except ValueError as exc:
                problems.append(f"timeout: {exc}")
        cwd = params.get("cwd")
        if cwd is not None and path_problem(cwd, "cwd"):
            problems.append(str(path_problem(cwd, "cwd")))
        env = params.get("env")
        if env is not None:
            if not isinstance(env, dict):
                problems.append("env: expected a mapping of variable name -> value")
            else:
                problems += [f"env: {p}" for n, v in env.items() if (p := _env_problem(n, v, rendered=False))]
        once = params.get("once")
        if once is not None and not isinstance(once, bool):
            problems.append(f"once: expected true or false, got {once!r}")
        return problems

    # -- life ----------------------------------------------------------------------

    async def setup(self, services: Services) -> None:
        self._services = services
        if isinstance(services.config, CommandConfig):
            self._config = services.config
        storage = services.storage
        rows = await storage.query("SELECT key, pgid, boot, tag FROM command_runs "
                                   "WHERE state = 'started' AND pgid IS NOT NULL")
        for key, pgid, boot, tag in rows:
            if kill_leftover(int(pgid), str(boot), str(tag)):
                log.warning("killed process group %d left running by step %s when the bot stopped", pgid, key)
        ops = [storage.op("DELETE FROM command_runs WHERE updated < ?", services.clock.now() - KEEP_ROWS)]
        if rows:
            ops.append(storage.op("UPDATE command_runs SET pgid = NULL WHERE state = 'started'"))
        await storage.write(*ops)

    async def shutdown(self) -> None:
        """A clean stop: programs still running are stopped like a cancelled step's."""
        runs = list(self._running.values())
        for run in runs:
            if run.stopping is None:
                run.stopping = asyncio.ensure_future(self._stop(run))
        await asyncio.gather(*(r.stopping for r in runs if r.stopping), return_exceptions=True)

    async def cancel(self, workitem: Workitem) -> None:
        if workitem.key in self._consuming:
            self._cancelled.add(workitem.key)     # consume sees it: it runs nothing, or stops what runs
        run = self._running.get(workitem.key)
        if run is not None:
            if run.stopping is None:
                run.stopping = asyncio.ensure_future(self._stop(run))
            return
        storage = self._storage()
        row = await storage.query_one("SELECT pgid, boot, tag FROM command_runs WHERE key = ?", workitem.key)
        if row is not None and row[0] is not None:
            kill_leftover(int(row[0]), str(row[1]), str(row[2]))
        await storage.write(storage.op("DELETE FROM command_runs WHERE key = ?", workitem.key))

    # -- a step --------------------------------------------------------------------

    async def consume(self, workitem: Workitem) -> Reply:
        self._consuming.add(workitem.key)
        try:
            return await self._consume(workitem)
        finally:
            self._consuming.discard(workitem.key)
            self._cancelled.discard(workitem.key)

    async def _consume(self, workitem: Workitem) -> Reply:
        storage = self._storage()
        forget = storage.op("DELETE FROM command_runs WHERE key = ?", workitem.key)
        row = await storage.query_one("SELECT state, pgid, boot, tag, exit_code, error, stdout, stderr "
                                      "FROM command_runs WHERE key = ?", workitem.key)
        where = f"#{workitem.instance_id} {workitem.step}"
        if row is not None:         # dispatched again: the bot stopped before its answer was written
            state, pgid, boot, tag, exit_code, error, stdout, stderr = row
            if state == "finished":     # it ran to the end: that is the answer, whatever the params say now
                log.info("%s: the program finished before the bot stopped; answering with its result", where)
                if error:
                    return Reply.failed(str(error), ops=[forget])
                return Reply.done({"exit_code": exit_code, "stdout": stdout, "stderr": stderr}, ops=[forget])
            if state == "interrupted":
                return Reply.failed(INTERRUPTED, ops=[forget])
            if pgid is not None:
                kill_leftover(int(pgid), str(boot), str(tag))
            if workitem.params.get("once") is True:
                await storage.write(storage.op("UPDATE command_runs SET state = 'interrupted', pgid = NULL, "
                                               "updated = ? WHERE key = ?", self._now(), workitem.key))
                log.warning("%s: the program was interrupted by the bot stopping; once: true, so not run again",
                            where)
                return Reply.failed(INTERRUPTED, ops=[forget])
            log.warning("%s: the program was interrupted by the bot stopping; running it again (at least once)",
                        where)
        try:
            plan = await self._plan(workitem)
        except (UnsafeArgument, ValueError, LookupError) as exc:
            return Reply.failed(f"not run: {exc}", ops=[forget])
        if workitem.key in self._cancelled:
            return Reply.failed("cancelled")
        return await self._run(workitem, plan, forget)

    async def _plan(self, workitem: Workitem) -> _Plan:
        """The params, rendered and checked (again: definitions may not have been)."""
        cfg = self._config
        params = workitem.params
        unknown = [key for key in params if key not in PARAMS]
        if unknown:
            raise ValueError(f"unknown param {unknown[0]!r}")
        source = await self._services_().step_params(workitem)
        argv = build_argv(params.get("argv"), source.get("argv"))
        if cfg.allow is not None and argv[0] not in cfg.allow:
            raise UnsafeArgument(f"{argv[0]!r} is not an allowed program (allow: {', '.join(cfg.allow) or 'nothing'})")
        timeout = cfg.timeout if params.get("timeout") is None else parse_duration(params["timeout"])
        if timeout <= 0:
            raise ValueError("timeout: must be more than 0")
        cwd = params.get("cwd")
        if cwd is not None:
            cwd = confined_path(cwd, source.get("cwd"), "cwd")
        env = {name: os.environ[name] for name in cfg.pass_env if name in os.environ}
        env.update(cfg.env)
        step_env = params.get("env") or {}
        if not isinstance(step_env, Mapping):
            raise ValueError("env: expected a mapping")
        for name, value in step_env.items():
            problem = _env_problem(name, value, rendered=True)
            if problem:
                raise UnsafeArgument(f"env: {problem}")
            env[str(name)] = text(value, f"env {name}")
        once = params.get("once", False)
        if not isinstance(once, bool):
            raise ValueError(f"once: expected true or false, got {once!r}")
        if shutil.which(argv[0], path=env.get("PATH", os.defpath)) is None:
            raise LookupError(f"{argv[0]!r}: no such program" + ("" if "/" in argv[0] else " in PATH"))
        return _Plan(argv, timeout, cwd, env, once)

    async def _run(self, workitem: Workitem, plan: _Plan, forget: Op) -> Reply:
        storage = self._storage()
        key = workitem.key
        tag = f"{key}/{secrets.token_hex(8)}"
        lifeline_r, lifeline_w = os.pipe()
        try:
            popen = subprocess.Popen(
                [sys.executable, "-I", "-S", str(SUPERVISOR), str(lifeline_r), str(os.getpid()), *plan.argv],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=plan.cwd,
                env={**plan.env, TAG_VARIABLE: tag}, start_new_session=True, pass_fds=(lifeline_r,))
        except OSError as exc:
            os.close(lifeline_w)
            return Reply.failed(f"not run: {exc.strerror or exc}" + (f" (cwd {plan.cwd})" if plan.cwd else ""))
        finally:
            os.close(lifeline_r)
        assert popen.stdout is not None and popen.stderr is not None
        run = _Run(key, popen, lifeline_w, _exited(popen))
        self._running[key] = run
        out = _Tail(os.dup(popen.stdout.fileno()), self._config.max_output)
        err = _Tail(os.dup(popen.stderr.fileno()), self._config.max_output)
        popen.stdout.close()      # the _Tails read their own copies, off the event loop's readiness
        popen.stderr.close()
        timed_out = False
        try:
            now = self._now()
            try:
                await storage.write(storage.op(
                    "INSERT INTO command_runs (key, state, pgid, boot, tag, started, updated) "
                    "VALUES (?, 'started', ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET state = 'started', "
                    "pgid = excluded.pgid, boot = excluded.boot, tag = excluded.tag, started = excluded.started, "
                    "updated = excluded.updated, exit_code = NULL, error = NULL, stdout = NULL, stderr = NULL",
                    key, run.pgid, boot_id(), tag, now, now))
            except BaseException:
                self._release(run, go=False)     # the supervisor exits without running anything
                if run.stopping is None:         # ... and is reaped
                    run.stopping = asyncio.ensure_future(self._stop(run))
                raise
            if key in self._cancelled:
                self._release(run, go=False)
            else:
                self._release(run, go=True)
                log.info("#%d %s: running %s (process group %d)", workitem.instance_id, workitem.step,
                         " ".join(plan.argv)[:300], run.pgid)
            try:
                await asyncio.wait_for(asyncio.shield(run.exited), plan.timeout)
            except asyncio.TimeoutError:
                timed_out = True
                if run.stopping is None:
                    run.stopping = asyncio.ensure_future(self._stop(run))
            if run.stopping is not None:
                await run.stopping
            await run.exited
            if popen.returncode is None:        # not reaped (by _stop): the group id is still ours
                _killpg(run.pgid, signal.SIGKILL)   # what the program left running
            code = popen.wait()
            await asyncio.gather(out.finish(), err.finish())
        except asyncio.CancelledError:
            # the engine is stopping: shutdown() stops the program (SIGTERM, then SIGKILL)
            out.close()
            err.close()
            raise
        finally:
            if run.exited.done() and popen.returncode is not None:
                self._running.pop(key, None)
                self._release(run, go=False)
        stdout, stderr = out.text(), err.text()
        fields = {"exit_code": code, "stdout": stdout, "stderr": stderr}
        error = ""
        if key in self._cancelled:     # nobody waits for the answer: forget the run
            await storage.write(forget)
            return Reply.failed("cancelled")
        if timed_out:
            error = f"timed out after {format_duration(plan.timeout)}"
        elif code < 0:
            error = f"{plan.argv[0]} was killed by {_signal_name(-code)}"
        elif code != 0:
            error = f"{plan.argv[0]} exited with status {code}"
        if error:
            tail = _last_lines(stderr or stdout)
            error += f": {tail}" if tail else ""
        await storage.write(storage.op(
            "UPDATE command_runs SET state = 'finished', pgid = NULL, updated = ?, exit_code = ?, error = ?, "
            "stdout = ?, stderr = ? WHERE key = ?", self._now(), code, error or None, stdout, stderr, key))
        log.info("#%d %s: %s ended: %s", workitem.instance_id, workitem.step, plan.argv[0], error or "exit status 0")
        if error:
            return Reply.failed(error, ops=[forget])
        return Reply.done(fields, ops=[forget])

    async def _stop(self, run: _Run) -> None:
        """SIGTERM to the group, SIGKILL after the grace period; then release it."""
        _killpg(run.pgid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(run.exited), self._config.kill_grace)
        except asyncio.TimeoutError:
            _killpg(run.pgid, signal.SIGKILL)
            await run.exited
        _killpg(run.pgid, signal.SIGKILL)       # what it left running, before reaping frees the id
        run.popen.wait()
        if self._running.get(run.key) is run:
            del self._running[run.key]
        self._release(run, go=False)

    @staticmethod
    def _release(run: _Run, *, go: bool) -> None:
        """Let the supervisor run the program (``go``), or close the lifeline:
        before the program started, it exits; after, it kills its group."""
        if run.lifeline is None:
            return
        if go:
            os.write(run.lifeline, b"g")
            return
        os.close(run.lifeline)
        run.lifeline = None

    def _services_(self) -> Services:
        if self._services is None:
            raise RuntimeError("command: used before setup")
        return self._services

    def _storage(self) -> Storage:
        return self._services_().storage

    def _now(self) -> float:
        return self._services_().clock.now()


# -- processes ------------------------------------------------------------------------

def _exited(popen: subprocess.Popen[bytes]) -> asyncio.Future[None]:
    """A future done when ``popen`` has exited (not reaped: its process group
    id stays ours until ``wait``)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def resolve() -> None:
        if not done.done():
            done.set_result(None)
    try:
        pidfd = os.pidfd_open(popen.pid)
    except (AttributeError, OSError):
        def wait() -> None:     # no pidfd: a thread waits without reaping
            os.waitid(os.P_PID, popen.pid, os.WEXITED | os.WNOWAIT)
            loop.call_soon_threadsafe(resolve)
        threading.Thread(target=wait, name=f"command-{popen.pid}", daemon=True).start()
        return done

    def readable() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        resolve()
    loop.add_reader(pidfd, readable)
    return done


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def group_members(pgid: int) -> list[int]:
    """Live processes (not zombies) whose process group is ``pgid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if len(fields) > 2 and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            found.append(int(entry))
    return found


def _tagged(pid: int, tag: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{TAG_VARIABLE}={tag}".encode() in environ.split(b"\0")


def kill_leftover(pgid: int, boot: str, tag: str) -> bool:
    """Kill the process group ``pgid`` that a run recorded, if it is still
    that run's: same boot, and one of its processes carries the run's tag.
    True if it was killed."""
    if not boot or boot != boot_id():
        return False
    members = group_members(pgid)
    if not any(_tagged(pid, tag) for pid in members):
        return False
    _killpg(pgid, signal.SIGKILL)
    return True


class _Tail:
    """Reads one output pipe to its end, keeping the last ``cap`` bytes."""

    def __init__(self, fd: int, cap: int) -> None:
        self.fd: int | None = fd
        self.cap = cap
        self.total = 0
        self.buffer = bytearray()
        self.loop = asyncio.get_running_loop()
        self.ended: asyncio.Future[None] = self.loop.create_future()
        os.set_blocking(fd, False)
        self.loop.add_reader(fd, self._read)

    def _read(self) -> None:
        assert self.fd is not None
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self.total += len(data)
        self.buffer += data
        if len(self.buffer) > 2 * self.cap:
            del self.buffer[:-self.cap]

    async def finish(self, timeout: float = 2.0) -> None:
        """Wait for the end of output (something that left the process group
        may still hold the pipe: then stop reading after ``timeout``)."""
        try:
            await asyncio.wait_for(asyncio.shield(self.ended), timeout)
        except asyncio.TimeoutError:
            self.close()

    def close(self) -> None:
        if self.fd is not None:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = None
        if not self.ended.done():
            self.ended.set_result(None)

    def text(self) -> str:
        kept = bytes(self.buffer[-self.cap:])
        cut = self.total - len(kept)
        body = kept.decode("utf-8", errors="replace")
        return f"[{cut} bytes cut]\n{body}" if cut else body


def _last_lines(output: str) -> str:
    lines = [line.rstrip() for line in re.sub(r"^\[\d+ bytes cut\]\n", "", output).splitlines() if line.strip()]
    tail = " | ".join(lines[-ERROR_LINES:])
    return tail if len(tail) <= ERROR_CHARS else "..." + tail[-ERROR_CHARS:]


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _env_problem(name: Any, value: Any, *, rendered: bool) -> str | None:
    if not isinstance(name, str) or not _ENV_NAME.match(name):
        return f"{name!r} is not a variable name"
    if name == TAG_VARIABLE:
        return f"{name} is the command participant's own"
    if not rendered and is_template(value):
        return None
    try:
        text(value, name)
    except UnsafeArgument as exc:
        return str(exc)
    return None
