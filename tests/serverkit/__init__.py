"""The real-server kit: start IRC, XMPP and TLS helpers on 127.0.0.1.

Plain Python with no pytest in it, so the benchmarks (``bench/``) start the
same servers as the tests.  The pytest fixtures that wrap it live in
``tests/servers/``.  A missing server binary raises ``ServerMissing``; the
fixtures turn that into a skip on a laptop and a failure under CI.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time


class ServerMissing(RuntimeError):
    """A server the tests need is not installed here."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        raise ServerMissing(f"{name} is not installed (apt-get install it, or run: bash tests/run.sh)")
    return path


def wait_port(port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
