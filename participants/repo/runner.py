"""Running rsync, ssh and gpg for the repository participants: an argument
list (never a shell), under the command participant's supervisor
(``participants/_supervisor.py``), in a process group of its own.

The same guarantees as the ``command`` step: the group is recorded in
SQLite (``repo_publish_runs``, committed) before the program may start; the
supervisor kills the group when the bot dies (lifeline pipe, and
``PR_SET_PDEATHSIG`` on Linux); a group left over from an earlier run is
killed at start, only on the same boot and only if its processes carry that
run's tag; timeout and cancel send SIGTERM, then SIGKILL after the grace.

Output is read as it comes: each line (``\\r`` ends one too, as progress
meters write) goes to ``on_line``, and the last lines of each stream are
kept for the error message.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from engine.participant_runtime import Storage
from engine.store import Op
from participants.argsafety import text
from participants.command import SUPERVISOR, TAG_VARIABLE, boot_id, kill_leftover

log = logging.getLogger(__name__)

TABLE = "repo_publish_runs"
KEEP_LINES = 40


class ProgramFailed(Exception):
    """A program exited non-zero, was killed, or timed out: the message says how, with its last lines."""


@dataclass
class Result:
    code: int
    stdout: list[str]
    stderr: list[str]


class Runner:
    def __init__(self, storage: Storage, timeout: float, kill_grace: float) -> None:
        self.storage = storage
        self.timeout = timeout
        self.kill_grace = kill_grace
        self._running: dict[str, set[asyncio.subprocess.Process]] = {}

    async def setup(self) -> None:
        """Kill the groups an earlier bot left running (only if still that run's); forget the rows."""
        rows = await self.storage.query(f"SELECT tag, pgid, boot FROM {TABLE}")
        for tag, pgid, boot in rows:
            if kill_leftover(int(pgid), str(boot), str(tag)):
                log.warning("killed process group %d (%s) left running when the bot stopped", pgid, tag)
        if rows:
            await self.storage.write(self.storage.op(f"DELETE FROM {TABLE}"))

    def forget(self, owner: str) -> Op:
        """The statement forgetting the step's runs: for the commit of its answer."""
        return self.storage.op(f"DELETE FROM {TABLE} WHERE owner = ?", owner)

    async def run(self, owner: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                  on_line: Callable[[str], None] | None = None, timeout: float | None = None,
                  check: bool = True, with_ops: Sequence[Op] = ()) -> Result:
        """Run ``argv`` for the step ``owner`` (its dispatch key); raises ProgramFailed
        (when ``check``) unless it exits 0.  ``with_ops`` are written in the commit
        that records the run, before it starts.  The record stays until the step's
        answer forgets it (``forget``): one commit per run, not two."""
        argv = [text(a, "argument") for a in argv]
        tag = f"{owner}/{secrets.token_hex(8)}"
        full_env = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR") if k in os.environ}
        full_env.update({"LC_ALL": "C", "LANG": "C", **(env or {}), TAG_VARIABLE: tag})
        lifeline_r, lifeline_w = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", str(SUPERVISOR), str(lifeline_r), str(os.getpid()), *argv,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env,
                start_new_session=True, pass_fds=(lifeline_r,))
        except OSError as exc:
            os.close(lifeline_w)
            raise ProgramFailed(f"{argv[0]}: cannot start: {exc.strerror or exc}") from None
        finally:
            os.close(lifeline_r)
        self._running.setdefault(owner, set()).add(proc)
        out: deque[str] = deque(maxlen=KEEP_LINES)
        err: deque[str] = deque(maxlen=KEEP_LINES)
        readers = [asyncio.ensure_future(_lines(proc.stdout, out, on_line)),
                   asyncio.ensure_future(_lines(proc.stderr, err, None))]
        timed_out = False
        try:
            try:
                await self.storage.write(*with_ops, self.storage.op(
                    f"INSERT INTO {TABLE} (tag, owner, pgid, boot, started) VALUES (?, ?, ?, ?, ?)",
                    tag, owner, proc.pid, boot_id(), time.time()))
            except BaseException:
                os.close(lifeline_w)           # never released: the supervisor exits, running nothing
                lifeline_w = -1
                raise
            os.write(lifeline_w, b"g")
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), timeout or self.timeout)
            except asyncio.TimeoutError:
                timed_out = True
                await self._stop(proc)
            await asyncio.wait(readers, timeout=2.0)
        except BaseException:
            await asyncio.shield(self._stop(proc))
            raise
        finally:
            for reader in readers:
                reader.cancel()
            if lifeline_w >= 0:
                os.close(lifeline_w)
            self._running.get(owner, set()).discard(proc)
            if not self._running.get(owner):
                self._running.pop(owner, None)
        code = proc.returncode if proc.returncode is not None else -signal.SIGKILL
        result = Result(code, list(out), list(err))
        if check and (timed_out or code != 0):
            raise ProgramFailed(_failure(argv[0], code, timed_out, result))
        return result

    async def stop(self, owner: str) -> None:
        """Stop what runs for the step ``owner`` (cancelled)."""
        await asyncio.gather(*(self._stop(p) for p in list(self._running.get(owner, ()))))

    async def shutdown(self) -> None:
        await asyncio.gather(*(self._stop(p) for procs in list(self._running.values()) for p in list(procs)))

    async def _stop(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is not None:
            return
        _killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), self.kill_grace)
        except asyncio.TimeoutError:
            _killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


async def _lines(stream: asyncio.StreamReader | None, keep: deque[str],
                 on_line: Callable[[str], None] | None) -> None:
    if stream is None:
        return
    pending = b""
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            break
        parts = re.split(rb"[\r\n]", pending + chunk)
        pending = parts.pop()
        for raw in parts:
            if raw.strip():
                line = raw.decode("utf-8", errors="replace")
                keep.append(line)
                if on_line is not None:
                    on_line(line)
    if pending.strip():
        keep.append(pending.decode("utf-8", errors="replace"))


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _failure(program: str, code: int, timed_out: bool, result: Result) -> str:
    if timed_out:
        what = f"{program} timed out"
    elif code < 0:
        try:
            what = f"{program} was killed by {signal.Signals(-code).name}"
        except ValueError:
            what = f"{program} was killed by signal {-code}"
    else:
        what = f"{program} exited with status {code}"
    tail = " | ".join(line.strip() for line in (result.stderr or result.stdout)[-4:])
    return f"{what}: {tail[-400:]}" if tail else what
