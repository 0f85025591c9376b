"""A real ``run_bot.py --console`` in a subprocess, for tests that need the
whole bot: crash tests SIGKILL it, console tests talk to it."""
from __future__ import annotations

import os
import queue
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def make_home(tmp: Path, processes: dict[str, str], bot_extra: str = "", users: str | None = None) -> Path:
    """A bot home: conf/bot.yaml, conf/users.yaml, conf/processes/*.yaml; var/ for the database."""
    conf = tmp / "conf"
    (conf / "processes").mkdir(parents=True)
    (conf / "bot.yaml").write_text(textwrap.dedent("""
        database: var/bot.sqlite3
        durability: full
        console:
          user: admin
    """) + textwrap.dedent(bot_extra))
    (conf / "users.yaml").write_text(users or textwrap.dedent("""
        users:
          admin:
            roles:
              "*": [admins]
    """))
    for name, text in processes.items():
        (conf / "processes" / f"{name}.yaml").write_text(textwrap.dedent(text))
    return tmp


class Bot:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.proc: subprocess.Popen[str] | None = None
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []

    def start(self, env: dict[str, str] | None = None) -> "Bot":
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "run_bot.py"), "--console", "--conf", str(self.home / "conf")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
            env={**os.environ, **(env or {})})
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._pump_log, args=(self.proc.stderr,), daemon=True).start()
        self.expect("release bot ready", timeout=20)
        return self

    def _pump(self, stream: Any, out: queue.Queue[str]) -> None:
        for line in stream:
            out.put(line.rstrip("\n"))

    def _pump_log(self, stream: Any) -> None:
        for line in stream:
            self.stderr.append(line.rstrip("\n"))

    @property
    def log(self) -> list[str]:
        """The bot's log so far: on the console it goes to var/bot.log (only
        warnings also reach stderr), as a person running it would see it."""
        path = self.home / "var" / "bot.log"
        return path.read_text(encoding="utf-8").splitlines() if path.exists() else []

    def send(self, command: str) -> None:
        assert self.proc and self.proc.stdin
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def expect(self, text: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"no line containing {text!r} within {timeout}s; got {seen}; "
                             f"log tail: {self.log[-10:]}")

    def expect_log(self, text: str, timeout: float = 10) -> str:
        """Wait until the log has a line containing ``text``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log:
                if text in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no log line containing {text!r} within {timeout}s; tail: {self.log[-10:]}")

    def ask(self, command: str, timeout: float = 10) -> list[str]:
        """Send a command and collect its reply lines (until output goes quiet)."""
        self.send(command)
        out = [self.lines.get(timeout=timeout)]
        while True:
            try:
                out.append(self.lines.get(timeout=0.3))
            except queue.Empty:
                return out

    def kill(self) -> None:
        assert self.proc
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    # -- looking at the database directly (read-only) --------------------------

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.home / 'var' / 'bot.sqlite3'}?mode=ro", uri=True)

    def statuses(self) -> dict[int, str]:
        with self.db() as c:
            return dict(c.execute("SELECT id, status FROM instances"))

    def trace(self, instance_id: int) -> list[tuple[str, str]]:
        with self.db() as c:
            return [(s, e) for s, e in c.execute(
                "SELECT step, event FROM history WHERE instance_id = ? ORDER BY id", (instance_id,))]
