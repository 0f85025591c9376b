#!/usr/bin/env python3
"""Approval benchmarks: the ``ask`` participant answered through the command
path, against the engine's own figure, and how soon a question reaches
people on three real networks.  Prints ``name=value`` lines (medians of RUNS
runs, 5 by default; the ratio is the median of per-run ratios of figures
measured in the same run, alternated so both see the same machine).

  durable_processes_per_s   bench/engine.py's figure (its own durable_run: start,
                            quick, a pending step answered by engine.reply, quick, end;
                            synchronous=FULL), measured here
  approvals_per_s           the same shape with ``ask`` as the pending step (a question to
                            one user, quorum any), answered through the command path:
                            bot.commands.Dispatcher.handle("approve qN") from a verified
                            identity (an IRC services account), one task per answer as in
                            durable_run; PROCESSES instances launched at once, timed from the
                            first launch to the last completed.  Each question, and the
                            outcome told to whoever answered, is an outbox row written in
                            the step's commits; the outbox does not deliver here
                            (bench/notify.py measures delivery)
  approvals_ratio           approvals_per_s / durable_processes_per_s (goal: >= 0.33)
  ask_fanout_ms_p50 / _p99  through the real App (bot/app.py, run_bot.py's config loading):
                            from the launch of a process whose first step asks three users
                            to the question received by all three: one on IRC (ngircd, a
                            real client, by hostmask; pacing 1e6/s), one on XMPP (prosody,
                            a real slixmpp client, rate 1e6/s), one by mail (an aiosmtpd
                            SmtpSink); FANOUT_SAMPLES questions one at a time after a warm-up
                            (goal: p50 <= 100)
  ask_fanout_<network>_ms_p50  the same, to each addressee alone (irc, mail, xmpp)

``python bench/approvals.py`` (under a minute).
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from bench.engine import Quick, durable_run  # noqa: E402
from bench.notify import ngircd_network, percentile, start_app, write_home  # noqa: E402
from bot.access import Directory, IrcIds, User  # noqa: E402
from bot.app import App, tune_gc  # noqa: E402
from bot.chat import VERIFIED_SERVICES, Identity, Message, Person  # noqa: E402
from bot.commands import Dispatcher, default_registry  # noqa: E402
from engine.definitions import parse_definition  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.events import Event  # noqa: E402
from engine.participant_runtime import ParticipantEnv  # noqa: E402
from engine.participants import ParticipantRegistry  # noqa: E402
from engine.store import Store  # noqa: E402
from engine.yamlconfig import loads_yaml  # noqa: E402
from notifiers.destinations import Book  # noqa: E402
from notifiers.outbox import Outbox  # noqa: E402
from participants.ask import Ask  # noqa: E402
from tests.serverkit import ServerMissing  # noqa: E402
from tests.serverkit.irc import Human as IrcHuman  # noqa: E402
from tests.serverkit.irc import start_ngircd  # noqa: E402
from tests.serverkit.smtp import SmtpSink  # noqa: E402
from tests.serverkit.xmpp import Human as XmppHuman  # noqa: E402
from tests.serverkit.xmpp import Prosody  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "5"))      # pairs for the ratio: the machine is noisy
PROCESSES = int(os.environ.get("BENCH_PROCESSES", "2000"))

# -- approvals_per_s --------------------------------------------------------------------------

FIVE_ASK = """\
name: five_ask
fields: {n: 0}
steps:
  - participant: quick
  - participant: ask
    params:
      question: "Release {{ n }}?"
      to: [alice]
  - participant: quick
"""
ALICE = Identity("irc", "net", "alice", account="alice", verified_by=VERIFIED_SERVICES)
ASKED = re.compile(r"q(\d+): ")


async def approvals_run(n: int, workdir: Path) -> float:
    store = Store(workdir / f"approvals-{time.monotonic_ns()}.sqlite3", synchronous="FULL")
    store.open()
    users = [User("alice", irc={"net": IrcIds(("alice",))}, roles={"*": frozenset({"release-managers"})})]
    directory = Directory(users)
    outbox = Outbox(store, Book({"net": "irc"}, {}, {"alice": frozenset({"net"})}), lambda user, network: None)
    await outbox.open()
    registry = ParticipantRegistry([Quick(), Ask()])
    spec, problems = parse_definition(loads_yaml(FIVE_ASK, "five_ask.yaml"), "five_ask.yaml", "x", registry.names())
    assert spec is not None, problems
    engine = Engine(store, {spec.name: spec}, registry, use_scheduler=False,
                    participant_env=ParticipantEnv(users=directory, outbox=outbox))
    await engine.start()
    dispatcher = Dispatcher(engine, directory, default_registry(), outbox=outbox)
    done = asyncio.Event()
    finished = 0
    answers: set[asyncio.Task[None]] = set()
    refused: list[str] = []

    async def approve(qid: str) -> None:
        response = await dispatcher.handle(Message(ALICE, f"approve q{qid}"))
        if not response.ok or "is decided: approve" not in response.lines[0]:
            refused.append(response.lines[0])
            done.set()

    async def on_event(event: Event) -> None:
        nonlocal finished
        if event.event == "question asked":
            match = ASKED.match(event.detail)
            assert match, event.detail
            # people answer independently of each other: one task per answer
            task = asyncio.ensure_future(approve(match.group(1)))
            answers.add(task)
            task.add_done_callback(answers.discard)
        elif event.event == "completed":
            finished += 1
            if finished == n:
                done.set()
    engine.bus.subscribe(on_event, ["question asked", "completed"])
    t0 = time.perf_counter()
    await asyncio.gather(*(engine.launch("five_ask", {"n": i}, actor="bench") for i in range(n)))
    await done.wait()
    elapsed = time.perf_counter() - t0
    if refused:
        raise SystemExit(f"approvals_per_s: an answer was refused: {refused[0]}")
    [(decided, rows)] = await store.read(lambda c: c.execute(
        "SELECT (SELECT COUNT(*) FROM ask_questions WHERE state = 'decided'), "
        "(SELECT COUNT(*) FROM outbox_messages)").fetchall())
    assert decided == n and rows == 2 * n, (decided, rows)     # asked, and told the outcome
    await engine.stop()
    store.close()
    return n / elapsed


async def ratio_runs(work: Path) -> dict[str, float]:
    plain: list[float] = []
    asked: list[float] = []
    for _ in range(RUNS):       # alternated, so that both see the same machine
        plain.append(await durable_run(PROCESSES, work))
        asked.append(await approvals_run(PROCESSES, work))
    return {"approvals_per_s": statistics.median(asked),
            "durable_processes_per_s": statistics.median(plain),
            "approvals_ratio": statistics.median(a / p for a, p in zip(asked, plain))}


# -- ask_fanout_ms_p50 ------------------------------------------------------------------------

FANOUT_SAMPLES = 60
FANOUT_WARMUP = 5
XMPP_PASSWORD_ENV = "BENCH_APPROVALS_XMPP_PW"
ASK3 = """\
name: ask3
inputs: {n: int}
steps:
  - participant: ask
    params:
      question: "Release {{ n }}?"
      to: [alice, bob, carol]
"""
USERS3 = """\
users:
  admin:
    roles: {"*": [admins]}
  alice:
    irc:
      benchirc: {hostmasks: ["alice!*@127.0.0.1"]}
    roles: {"*": [release-managers]}
  bob:
    xmpp: [bob@localhost]
    roles: {"*": [release-managers]}
  carol:
    email: [carol@example.test]
    roles: {"*": [release-managers]}
"""


def networks3(irc_port: int, xmpp_port: int, smtp_port: int) -> str:
    return "outbox: {retry_min: 0.1s, retry_max: 0.5s}\nnetworks:" + ngircd_network(irc_port, "askbot") + f"""
          - protocol: xmpp
            name: benchxmpp
            jid: bot@localhost
            password_env: {XMPP_PASSWORD_ENV}
            host: 127.0.0.1
            port: {xmpp_port}
            tls: plaintext
            nick: askbot
            rate: 1000000
            burst: 1000000
          - protocol: email
            name: mail
            smtp_host: 127.0.0.1
            smtp_port: {smtp_port}
            security: plaintext
            from: "Release Bot <bot@bench.test>"
            idle_timeout: 30s
    """


async def until_delivered(app: App, person: Person, timeout: float = 15.0) -> None:
    """Until the front-end delivers to ``person`` (the IRC front-end has seen the
    nick join; the XMPP one is connected), so the samples measure delivery, not set-up."""
    transport = next(t for t in app.transports if t.network == person.network)
    deadline = time.monotonic() + timeout
    while True:
        try:
            await asyncio.wait_for(await transport.send(person, "warming up"), 5)
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"ask_fanout: {person.user} on {person.network} never reachable: {exc}") from None
            await asyncio.sleep(0.1)


async def ask_fanout(work: Path) -> dict[str, float]:
    stops: list[Callable[[], None]] = []      # the servers' stop/cleanup, in start order
    irc_human: IrcHuman | None = None
    xmpp_human: XmppHuman | None = None
    app: App | None = None
    try:
        try:
            ngircd = start_ngircd(work / "ngircd")
            stops.append(ngircd.stop)
            prosody = Prosody({"bot": "botpw", "bob": "bobpw"})
            stops.append(prosody.cleanup)
            prosody.start()
        except ServerMissing as exc:
            raise SystemExit(f"ask_fanout: {exc}") from None
        sink = SmtpSink().start()
        stops.append(sink.cleanup)
        os.environ[XMPP_PASSWORD_ENV] = "botpw"
        conf = write_home(work / "ask-home", networks3(ngircd.port, prosody.port, sink.port), {"ask3": ASK3},
                          USERS3)
        app = await start_app(conf)
        irc_human = await IrcHuman.connect(ngircd.port, "alice")
        await irc_human.join("#rel")
        xmpp_human = await XmppHuman(prosody, "bob").connect()
        await until_delivered(app, Person("irc", "benchirc", "alice", (), ("alice!*@127.0.0.1",)))
        await until_delivered(app, Person("xmpp", "benchxmpp", "bob", ("bob@localhost",)))
        fanouts: list[float] = []
        each: dict[str, list[float]] = {}          # network -> launch to its addressee's copy
        for i in range(FANOUT_WARMUP + FANOUT_SAMPLES):
            mails = len(sink.received)
            start = time.perf_counter()
            iid = await app.engine.launch("ask3", {"n": i}, actor="bench")
            head = f" from ask3 #{iid} (no project): Release {i}?"
            arrived: dict[str, float] = {}

            async def on_irc() -> None:
                assert irc_human is not None
                await irc_human.expect(lambda m: m.command == "PRIVMSG" and m.nick == "askbot" and head in m.text, 10)
                arrived["irc"] = time.perf_counter()

            async def on_xmpp() -> None:
                assert xmpp_human is not None
                await xmpp_human.expect(lambda m: m.type == "chat" and head in m.body, 10)
                arrived["xmpp"] = time.perf_counter()

            async def by_mail() -> None:
                got = await asyncio.to_thread(sink.wait_for, mails + 1, 10)
                assert f"Release {i}?" in str(got[mails].message["Subject"]), got[mails].message["Subject"]
                arrived["mail"] = time.perf_counter()
            await asyncio.gather(on_irc(), on_xmpp(), by_mail())
            if i >= FANOUT_WARMUP:
                fanouts.append((max(arrived.values()) - start) * 1000)
                for network, at in arrived.items():
                    each.setdefault(network, []).append((at - start) * 1000)
        return {"ask_fanout_ms_p50": statistics.median(fanouts), "ask_fanout_ms_p99": percentile(fanouts, 0.99),
                **{f"ask_fanout_{network}_ms_p50": statistics.median(ms) for network, ms in sorted(each.items())}}
    finally:
        if irc_human is not None:
            await irc_human.close()
        if xmpp_human is not None:
            await xmpp_human.close()
        if app is not None:
            await app.stop()
        for stop in reversed(stops):
            stop()


async def run() -> None:
    logging.getLogger().setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-approvals-"))
    try:
        only = os.environ.get("BENCH_ONLY", "")      # e.g. BENCH_ONLY=fanout: that part alone
        for part in (ratio_runs, ask_fanout):
            if only and only not in part.__name__:
                continue
            for name, value in (await part(work)).items():
                print(f"{name}={value:.2f}" if "ratio" in name else
                      f"{name}={value:.1f}" if name.endswith("_ms_p50") or name.endswith("_ms_p99") else
                      f"{name}={value:.0f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    tune_gc()        # the collector settings of the bot process (bot/app.py), which this measures
    asyncio.run(run())


if __name__ == "__main__":
    main()
