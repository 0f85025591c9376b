"""Debian's OpenSSH server on 127.0.0.1 with throwaway host and client keys,
for publishing to an ``ssh://`` destination with rsync over ssh.

Nothing from /etc/ssh is read.  ``known_hosts`` holds the host key, so the
client checks it strictly (``StrictHostKeyChecking=yes``), as in production.
"""
from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.serverkit import free_port, require_binary, stop


@dataclass
class Sshd:
    proc: subprocess.Popen[bytes]
    port: int
    directory: Path
    client_key: Path
    known_hosts: Path

    def stop(self) -> None:
        stop(self.proc)


def start_sshd(directory: Path | None = None) -> Sshd:
    sshd = require_binary("sshd")
    keygen = require_binary("ssh-keygen")
    require_binary("ssh")
    # a short directory: mode checks and socket paths stay simple
    d = Path(directory or tempfile.mkdtemp(prefix="sshd-"))
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    for key in ("host_key", "client_key"):
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = free_port()
    host_pub = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    (d / "sshd_config").write_text(f"""ListenAddress 127.0.0.1
Port {port}
HostKey {d}/host_key
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
StrictModes no
PermitRootLogin prohibit-password
UsePAM no
""")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(d / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                if s.recv(64).startswith(b"SSH-"):
                    break
        except OSError:
            if time.monotonic() > deadline:
                stop(proc)
                raise TimeoutError(f"sshd not answering on {port}")
            time.sleep(0.01)
    return Sshd(proc, port, d, d / "client_key", d / "known_hosts")
