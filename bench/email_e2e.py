#!/usr/bin/env python3
"""Email as a front-end, end to end: the real bot (``run_bot.py`` in its own
process, as deployed: synchronous=FULL, INFO log to var/bot.log) with one
email network that takes mail in by its SMTP listener and from a Dovecot
mailbox (IMAP IDLE), and sends its replies through the outbox to an aiosmtpd
SmtpSink.  Every mail is from a user in users.yaml, vouched for by a trusted
``Authentication-Results`` (trust: mx.example.org for example.org).  The
mail clients are not the bot's: stdlib ``smtplib`` and Dovecot's own LDA.
This process holds the clients and the sink (its own thread); the bot has
its own process, as it would beside a real MTA.  Prints ``name=value``:

  email_command_rtt_{whoami,launch}_p50_ms / _p99_ms
        one mail at a time over ONE reused smtplib connection to the listener:
        from send_message() (MAIL FROM) to the reply in the sink (matched by
        In-Reply-To); ``launch one n=K`` launches a one-step process (its launch
        and reply are one commit).  RTT_SAMPLES each after RTT_WARMUP (goal p50 <= 100)
  imap_command_latency_p50_ms / _p99_ms
        dovecot-lda has delivered ``launch one n=K`` into the bot's mailbox ->
        that instance is in the bot's SQLite file (read from here); the watcher
        is left in IDLE between samples.  Dovecot holds IDLE notifications back
        500 ms (NOTIFY_DELAY_MSECS) (goal p50 <= 800)
  email_in_per_s
        BATCH ``launch`` mails from SENDERS users at once, one smtplib connection
        per user, each reused for the user's mails: from the first MAIL FROM to
        the last instance committed (goal >= 100).  The bot's ``commands:
        rate_limit`` and the listener's ``sender_rate`` are raised so that neither
        refuses them (the defaults, 5 per 10 s and 30 per minute, would)
  email_in_answered_per_s
        the same batch, to the last reply received by the sink
  email_in_accepted_per_s
        the same batch, to the last mail in the bot's inbox (committed, then 250):
        how fast the listener takes mail, against how fast the one worker acts on it
  email_in_bot_cpu_ms_per_mail / email_in_clients_cpu_ms_per_mail
        CPU time over the batch (first mail to last launch) per mail: the bot
        process (all its threads), and this process (clients and sink): where
        the machine's cores went

One run: ``python bench/email_e2e.py`` (about 30 s).  ``BENCH_ONLY=rtt|imap|batch``
runs one part; ``BENCH_PROFILE=FILE`` runs the bot under cProfile (written to
FILE when it stops); ``BENCH_KEEP=1`` keeps the bot's home (its log, database).
"""
from __future__ import annotations

import os
import shutil
import smtplib
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE / "bench"]   # bench/bugzilla.py is not
sys.path.insert(0, str(HERE))                                                          # python-bugzilla

from tests.serverkit import ServerMissing, free_port  # noqa: E402
from tests.serverkit.dovecot import Dovecot  # noqa: E402
from tests.serverkit.smtp import Received, SmtpSink  # noqa: E402

RTT_WARMUP = 20
RTT_SAMPLES = int(os.environ.get("BENCH_RTT_SAMPLES", "200"))
IMAP_WARMUP = 2
IMAP_SAMPLES = int(os.environ.get("BENCH_IMAP_SAMPLES", "12"))
BATCH = int(os.environ.get("BENCH_BATCH", "400"))
SENDERS = 8
AUTHRES = "mx.example.org; dkim=pass header.d=example.org; dmarc=pass header.from=example.org"
BOT = "bot@example.test"
IMAP_PASSWORD_ENV = "BENCH_EMAIL_IMAP_PW"

ONE = """\
name: one
project: Project
launch_roles: [release-managers]
inputs: {n: int}
steps:
  - participant: echo
    params: {text: launched by mail}
"""


def users_yaml() -> str:
    people = "".join(f"""
  {name}:
    email: [{name}@example.org]
    roles:
      "Project": [release-managers]""" for name in ["alice", *(f"user{i}" for i in range(SENDERS))])
    return "users:\n  admin:\n    roles:\n      \"*\": [admins]" + people + "\n"


def write_home(root: Path, sink_port: int, listen_port: int, imap_port: int) -> Path:
    conf = root / "conf"
    (conf / "processes").mkdir(parents=True)
    (conf / "processes" / "one.yaml").write_text(ONE)
    (conf / "users.yaml").write_text(users_yaml())
    (conf / "bot.yaml").write_text(textwrap.dedent(f"""\
        database: var/bot.sqlite3
        durability: full
        console: {{user: admin}}
        commands:
          rate_limit: {{commands: 1000000, per: 10s}}     # the batch: 50 commands a user at once
        networks:
          - protocol: email
            name: mail
            smtp_host: 127.0.0.1
            smtp_port: {sink_port}
            security: plaintext
            from: "Release Bot <{BOT}>"
            trust: {{authserv_id: mx.example.org, domains: [example.org]}}
            listen: {{host: 127.0.0.1, port: {listen_port}, addresses: [{BOT}], sender_rate: 1000000}}
            imap: {{host: 127.0.0.1, port: {imap_port}, tls: false, user: {BOT},
                    password_env: {IMAP_PASSWORD_ENV}}}
    """))
    return root


class RunningBot:
    """``run_bot.py --console`` on the home; ``stop`` closes its stdin (Ctrl-D)."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        profile = os.environ.get("BENCH_PROFILE")      # a file: the bot runs under cProfile, written there
        self.proc = subprocess.Popen(
            [sys.executable, *(("-m", "cProfile", "-o", profile) if profile else ()), str(HERE / "run_bot.py"),
             "--console", "--conf", str(home / "conf")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
            env={**os.environ, **env})
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline()
        if "release bot ready" not in ready:
            self.proc.kill()
            raise SystemExit(f"bench/email_e2e.py: the bot did not start: {ready.strip()} "
                             f"{self.proc.stderr.read() if self.proc.stderr else ''}".strip())
        # drain its stdout and stderr so that it never blocks writing to them
        for stream in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=lambda s=stream: [None for _ in s], daemon=True).start()
        self.db = sqlite3.connect(f"file:{home / 'var' / 'bot.sqlite3'}?mode=ro", uri=True, timeout=5,
                                  check_same_thread=False)

    def launched(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])

    def has(self, n: int) -> bool:
        row = self.db.execute("SELECT 1 FROM instances WHERE json_extract(fields, '$.n') = ?", (n,)).fetchone()
        return row is not None

    def cpu_seconds(self) -> float:
        """The bot process's CPU time so far (all its threads: the loop, the SQLite writer)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        self.db.close()
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


def mail(sender: str, subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = BOT
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="example.org")
    msg["Authentication-Results"] = AUTHRES
    msg.set_content("\n")
    return msg


def connect(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    client.ehlo("mx.example.org")
    return client


def wait_reply(sink: SmtpSink, message_id: str, start: int, timeout: float = 10.0) -> tuple[float, int]:
    """When the sink received the reply to ``message_id`` (scanning from index ``start``), and its index."""
    deadline = time.monotonic() + timeout
    seen = start
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SystemExit(f"bench/email_e2e.py: no reply to {message_id} within {timeout:g} s")
        try:
            got = sink.wait_for(seen + 1, left)
        except TimeoutError:
            continue
        now = time.perf_counter()
        for index in range(seen, len(got)):
            if got[index].message["In-Reply-To"] == message_id:
                return now, index
        seen = len(got)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wait_until(check: Callable[[], bool], timeout: float, what: str, step: float = 0.002) -> float:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench/email_e2e.py: {what} did not happen within {timeout:g} s")
        time.sleep(step)
    return time.perf_counter()


# -- the three figures ------------------------------------------------------------------------

def command_rtt(bot: RunningBot, sink: SmtpSink, port: int, counter: list[int]) -> dict[str, float]:
    client = connect(port)
    figures: dict[str, float] = {}
    try:
        for command in ("whoami", "launch"):
            samples: list[float] = []
            for i in range(RTT_WARMUP + RTT_SAMPLES):
                counter[0] += 1
                text = "whoami" if command == "whoami" else f"launch one n={counter[0]}"
                msg = mail("Alice <alice@example.org>", text)
                before = len(sink.received)
                started = time.perf_counter()
                client.send_message(msg, from_addr="alice@example.org", to_addrs=[BOT])
                arrived, index = wait_reply(sink, msg["Message-ID"], before)
                reply = sink.received[index].message.get_content()
                expect = "alice@example.org on mail is alice" if command == "whoami" else "launched one as #"
                if expect not in reply:
                    raise SystemExit(f"bench/email_e2e.py: unexpected reply to {text!r}: {reply.strip()!r}")
                if i >= RTT_WARMUP:
                    samples.append((arrived - started) * 1000)
            figures[f"email_command_rtt_{command}_p50_ms"] = statistics.median(samples)
            figures[f"email_command_rtt_{command}_p99_ms"] = percentile(samples, 0.99)
    finally:
        client.quit()
    return figures


def imap_latency(bot: RunningBot, dovecot: Dovecot, counter: list[int]) -> dict[str, float]:
    samples: list[float] = []
    for i in range(IMAP_WARMUP + IMAP_SAMPLES):
        counter[0] += 1
        n = counter[0]
        raw = mail("Alice <alice@example.org>", f"launch one n={n}").as_bytes()
        dovecot.deliver(raw, sender="alice@example.org")
        delivered = time.perf_counter()
        effect = wait_until(lambda: bot.has(n), 10, f"the IMAP mail 'launch one n={n}'")
        if i >= IMAP_WARMUP:
            samples.append(max(0.0, effect - delivered) * 1000)
        time.sleep(0.3)                 # the watcher moves the mail and goes back to IDLE
    return {"imap_command_latency_p50_ms": statistics.median(samples),
            "imap_command_latency_p99_ms": percentile(samples, 0.99)}


def batch_rate(bot: RunningBot, sink: SmtpSink, port: int, counter: list[int]) -> dict[str, float]:
    per_sender = BATCH // SENDERS
    first = counter[0] + 1
    counter[0] += per_sender * SENDERS
    base_launched = bot.launched()
    base_received = len(sink.received)
    ids: list[str] = []
    prepared: list[list[EmailMessage]] = []
    for s in range(SENDERS):
        batch = [mail(f"user{s}@example.org", f"launch one n={first + s * per_sender + k}") for k in range(per_sender)]
        ids += [m["Message-ID"] for m in batch]
        prepared.append(batch)
    clients = [connect(port) for _ in range(SENDERS)]
    go = threading.Barrier(SENDERS + 1)
    failures: list[BaseException] = []

    def send(s: int) -> None:
        try:
            go.wait()
            for msg in prepared[s]:
                clients[s].send_message(msg, from_addr=f"user{s}@example.org", to_addrs=[BOT])
        except BaseException as exc:       # reported below; the bench must not hang on it
            failures.append(exc)

    threads = [threading.Thread(target=send, args=(s,)) for s in range(SENDERS)]
    for thread in threads:
        thread.start()
    go.wait()
    started, wall_started = time.perf_counter(), time.time()
    cpu_before, own_before = bot.cpu_seconds(), time.process_time()
    total = per_sender * SENDERS
    done = wait_until(lambda: bool(failures) or bot.launched() >= base_launched + total, 60,
                      f"{total} launches by mail", step=0.005)
    cpu = bot.cpu_seconds() - cpu_before
    own = time.process_time() - own_before
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"bench/email_e2e.py: sending the batch failed: {failures[0]!r}")
    wanted = set(ids)

    def all_answered() -> bool:
        got: list[Received] = sink.received[base_received:]
        return wanted <= {str(r.message["In-Reply-To"]) for r in got}
    answered = wait_until(all_answered, 60, f"{total} replies", step=0.01)
    for client in clients:
        client.quit()
    if bot.launched() != base_launched + total:
        raise SystemExit(f"bench/email_e2e.py: {bot.launched() - base_launched} launches for {total} mails")
    last_accepted = bot.db.execute("SELECT MAX(received) FROM email_inbox WHERE source = 'smtp'").fetchone()[0]
    return {"email_in_per_s": total / (done - started), "email_in_answered_per_s": total / (answered - started),
            "email_in_accepted_per_s": total / (last_accepted - wall_started),
            "email_in_bot_cpu_ms_per_mail": cpu * 1000 / total, "email_in_clients_cpu_ms_per_mail": own * 1000 / total}


def main() -> None:
    only = os.environ.get("BENCH_ONLY", "")
    work = Path(tempfile.mkdtemp(prefix="bench-email-"))
    sink = SmtpSink().start()
    dovecot: Dovecot | None = None
    bot: RunningBot | None = None
    try:
        try:
            dovecot = Dovecot().start()
        except ServerMissing as exc:
            raise SystemExit(f"bench/email_e2e.py: {exc}") from None
        listen_port = free_port()
        home = write_home(work / "home", sink.port, listen_port, dovecot.port)
        bot = running = RunningBot(home, {IMAP_PASSWORD_ENV: dovecot.users[BOT]})
        mailbox, counter = dovecot, [0]
        parts: dict[str, Callable[[], dict[str, float]]] = {
            "rtt": lambda: command_rtt(running, sink, listen_port, counter),
            "imap": lambda: imap_latency(running, mailbox, counter),
            "batch": lambda: batch_rate(running, sink, listen_port, counter),
        }
        for name, part in parts.items():
            if only and only != name:
                continue
            for figure, value in part().items():
                print(f"{figure}={value:.1f}", flush=True)
    finally:
        if bot is not None:
            code = bot.stop()
            if code != 0:
                print(f"bench/email_e2e.py: the bot exited {code}", file=sys.stderr)
        if dovecot is not None:
            dovecot.cleanup()
        sink.cleanup()
        if os.environ.get("BENCH_KEEP") == "1":          # the bot's home, its log and database, for a look
            print(f"bench/email_e2e.py: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
