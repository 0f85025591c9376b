"""A real Dovecot IMAP server on 127.0.0.1 for the mail-in tests and
benchmarks.  No pytest here (``tests/servers/mailin`` has the fixtures); a
missing binary raises ``ServerMissing``.

Each server gets its own temp dir (under /tmp, mode 0755: Dovecot's auth
process runs as ``dovecot`` and must traverse every parent of the users file,
and the login process refuses root), a unique ``instance_name``, a
passwd-file with throwaway users, and maildirs owned by ``nobody`` (a mail
uid may not be 0).  It listens in plaintext (loopback only) and, with a
``ThrowawayCA``, with TLS from the first byte (IMAPS) on a second port.

``capabilities`` overrides what the server advertises (``imap_capability``),
to test a client against a server without IDLE or MOVE; the server still
understands the commands, the client must not use them.

Mail arrives the way it does in production: ``deliver`` runs Dovecot's own
LDA (``dovecot-lda``), which writes it into the maildir and wakes IDLE
sessions, as an MTA handing mail over would.
"""
from __future__ import annotations

import os
import grp
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from tests.serverkit import free_port, require_binary, wait_port
from tests.serverkit.tls import ThrowawayCA

USERS = {"bot@example.test": "botpw"}

CONFIG = """\
base_dir = {root}/run
state_dir = {root}/run/state
instance_name = {instance}
log_path = {root}/log/dovecot.log
info_log_path = {root}/log/dovecot.log
protocols = imap
listen = 127.0.0.1
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:~/Maildir
mailbox_list_index = no
{capability}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/users
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/home/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls_port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
}}
protocol lda {{
  postmaster_address = postmaster@example.test
}}
"""


class Dovecot:
    """One dovecot master process; ``kill``/``start`` simulate a crash and restart."""

    def __init__(self, users: dict[str, str] | None = None, *, ca: ThrowawayCA | None = None,
                 capabilities: str | None = None) -> None:
        self.binary = require_binary("dovecot")
        self.lda = "/usr/lib/dovecot/dovecot-lda"
        if not os.path.exists(self.lda):
            from tests.serverkit import ServerMissing
            raise ServerMissing("dovecot-lda is missing (apt-get install dovecot-imapd)")
        self.root = Path(tempfile.mkdtemp(prefix="imap-test-"))
        self.root.chmod(0o755)
        self.instance = f"test-dovecot-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.tls_port = free_port() if ca is not None else 0
        self.users = dict(USERS if users is None else users)
        self.ca_file: Path | None = None
        for sub in ("run", "log", "home"):
            (self.root / sub).mkdir()
        ssl = "ssl = no"
        if ca is not None:
            cert = ca.issue(self.root / "certs", dns=("localhost",), ips=("127.0.0.1",))
            self.ca_file = cert.ca_file
            ssl = f"ssl = yes\nssl_cert = <{cert.cert_file}\nssl_key = <{cert.key_file}"
        nobody = pwd.getpwnam("nobody")
        self.uid, self.gid = nobody.pw_uid, grp.getgrnam("nogroup").gr_gid
        self.config = self.root / "dovecot.conf"
        self.config.write_text(CONFIG.format(
            root=self.root, instance=self.instance, ssl=ssl, port=self.port, tls_port=self.tls_port,
            uid=self.uid, gid=self.gid,
            capability=f"imap_capability = {capabilities}" if capabilities else ""))
        (self.root / "users").write_text("".join(f"{u}:{{PLAIN}}{p}\n" for u, p in self.users.items()))
        (self.root / "users").chmod(0o644)
        for user in self.users:
            home = self.root / "home" / user
            home.mkdir()
            os.chown(home, self.uid, self.gid)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "Dovecot":
        # its own process group, so that a crash takes every Dovecot process with it
        self.proc = subprocess.Popen([self.binary, "-F", "-c", str(self.config)], start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)
        if self.tls_port:
            wait_port(self.tls_port, proc=self.proc)
        return self

    def deliver(self, raw: bytes, user: str = "bot@example.test", sender: str = "sender@example.test") -> None:
        """Hand ``raw`` to Dovecot's LDA, as an MTA would (``sender`` is the
        envelope sender, written as Return-Path; "" for a bounce)."""
        result = subprocess.run([self.lda, "-c", str(self.config), "-d", user, "-f", sender or "<>"],
                                input=raw, capture_output=True, timeout=20)
        if result.returncode != 0:
            raise RuntimeError(f"dovecot-lda exited {result.returncode}: {result.stderr.decode(errors='replace')}")

    def maildir(self, user: str = "bot@example.test") -> Path:
        return self.root / "home" / user / "Maildir"

    def kill(self) -> None:
        """SIGKILL the whole server, like a crash of its machine.  The master's
        process group: killed alone, its ``imap`` session processes serve their
        clients on for ~10 s."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(5)
        self._wait_children_gone(5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._wait_children_gone(5)

    def cleanup(self) -> None:
        """Gone, with its files.  SIGKILL, not SIGTERM: a clean stop takes Dovecot
        1.1 s, a kill 20 ms (its children follow the master), and the files go anyway."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        if os.environ.get("KEEP_SERVER_DIRS") != "1":
            shutil.rmtree(self.root, ignore_errors=True)

    def log_text(self) -> str:
        path = self.root / "log" / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def leftover_pids(self) -> list[int]:
        """Processes of this instance still running (zombies count as gone)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z" and (self.instance.encode() in cmd or str(self.config).encode() in cmd):
                found.append(int(entry.name))
        return found

    def _wait_children_gone(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.leftover_pids() and time.monotonic() < deadline:
            time.sleep(0.02)

