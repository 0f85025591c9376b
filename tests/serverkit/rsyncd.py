"""A real ``rsync --daemon`` on 127.0.0.1 with one writable module, for
publishing to an ``rsync://`` destination.

The module needs ``munge symlinks = no``: with ``use chroot = no`` (how the
daemon runs here, and often on mirrors) rsync munges uploaded symlinks by
default, so ``current -> snapshots/N`` would be stored as a dangling
``/rsyncd-munged/snapshots/N``.  ``uid``/``gid`` root: a root daemon otherwise
writes as nobody and cannot create the link.
"""
from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.serverkit import free_port, require_binary, stop


@dataclass
class Rsyncd:
    proc: subprocess.Popen[bytes]
    port: int
    module: str
    path: Path              # the module's directory on disk
    log: Path

    @property
    def url(self) -> str:
        return f"rsync://127.0.0.1:{self.port}/{self.module}"

    def stop(self) -> None:
        stop(self.proc)


def start_rsyncd(directory: Path, module: str = "repo") -> Rsyncd:
    rsync = require_binary("rsync")
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "module"
    data.mkdir(exist_ok=True)
    port = free_port()
    conf = directory / "rsyncd.conf"
    conf.write_text(f"""use chroot = no
pid file = {directory}/rsyncd.pid
log file = {directory}/rsyncd.log
[{module}]
    path = {data}
    read only = false
    uid = root
    gid = root
    munge symlinks = no
""")
    proc = subprocess.Popen([rsync, "--daemon", "--no-detach", f"--config={conf}", f"--port={port}",
                             "--address=127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"rsync daemon exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                if s.recv(64).startswith(b"@RSYNCD:"):
                    break
        except OSError:
            if time.monotonic() > deadline:
                stop(proc)
                raise TimeoutError(f"rsync daemon not greeting on {port}")
            time.sleep(0.01)
    return Rsyncd(proc, port, module, data, directory / "rsyncd.log")
