"""Engine semantics for real release processes: a handled failure has an
outcome of its own and tells the handler which step failed; a retry after a
failed handler resumes where the work stopped; a loop that runs out fails;
launch tokens make a launch happen once, across restarts and for schedules."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from engine.errors import EngineError, NotAllowedNow
from engine.participants import Reply
from engine.schedules import ScheduleSpec
from engine.timers import ManualClock
from tests.engine_fixtures import (START, EngineFactory, Recorder, advance, close_engine, events, fields, status,
                                   trace)

# -- 3. a handled failure is not a success --------------------------------------------------

HANDLED = """
    name: publish
    inputs: {out: str}
    on_error: {subprocess: notify-failure}
    steps:
      - id: build
        participant: record
        params: {file: "{{ out }}", text: build}
      - id: publish
        participant: rec
        params: {message: "mirror unreachable"}
      - id: announce
        participant: record
        params: {file: "{{ out }}", text: announce}
    """
NOTIFY = """
    name: notify-failure
    steps:
      - set: {told_step: "{{ error.step }}", told_path: "{{ error.path | default('') }}", told: "{{ error.message }}"}
    """
NOTIFY_BROKEN = """
    name: notify-failure
    steps:
      - {id: tell, participant: notifier}
    """


async def test_a_handled_failure_ends_recovered_and_the_handler_hears_the_failed_step(
        engines: EngineFactory, tmp_path: Path) -> None:
    rec = Recorder(mode="fail")
    engine = await engines({"publish": HANDLED, "notify-failure": NOTIFY}, [rec])
    iid = await engine.launch("publish", {"out": str(tmp_path / "out.txt")})
    await engine.idle()
    got = await fields(engine, iid)
    assert (got["told_step"], got["told_path"], got["told"]) == ("publish", "1", "mirror unreachable")
    summary = await engine.summary(iid)
    assert (summary.status, summary.outcome) == ("completed", "recovered")
    assert summary.handled == "publish: mirror unreachable"
    assert "announce" not in (tmp_path / "out.txt").read_text()
    # one that went through is completed and nothing else
    rec.mode = "done"
    ok = await engine.launch("publish", {"out": str(tmp_path / "out2.txt")})
    await engine.idle()
    summary = await engine.summary(ok)
    assert (summary.status, summary.outcome) == ("completed", "")


async def test_ps_and_show_tell_a_recovered_instance_from_a_completed_one(engines: EngineFactory,
                                                                        tmp_path: Path) -> None:
    from bot.access import Directory, User
    from bot.chat import VERIFIED_CONSOLE, Identity, Message
    from bot.commands import Dispatcher, default_registry
    rec = Recorder(mode="fail")
    engine = await engines({"publish": HANDLED, "notify-failure": NOTIFY}, [rec])
    d = Dispatcher(engine, Directory([User("admin", roles={"*": frozenset({"admins"})})]), default_registry())
    admin = Identity("console", "console", "admin", account="admin", verified_by=VERIFIED_CONSOLE)
    iid = await engine.launch("publish", {"out": str(tmp_path / "out.txt")})
    await engine.idle()
    ps = (await d.handle(Message(admin, "ps all", None))).lines
    assert any(line.startswith(f"#{iid} publish completed, recovered - publish: mirror unreachable") for line in ps), ps
    show = (await d.handle(Message(admin, f"show {iid}", None))).lines
    assert show[0].startswith(f"#{iid} publish: completed, recovered;")
    assert "recovered from: publish: mirror unreachable" in show


# -- 4. retry after a failed handler resumes; retry handler re-runs the handler -----------------

async def failed_twice(engines: EngineFactory, tmp_path: Path) -> tuple[Any, int, Recorder, Recorder, Path]:
    rec = Recorder(mode="fail")
    notifier = Recorder("notifier", mode="fail")
    out = tmp_path / "out.txt"
    engine = await engines({"publish": HANDLED, "notify-failure": NOTIFY_BROKEN}, [rec, notifier])
    iid = await engine.launch("publish", {"out": str(out)})
    await engine.idle()
    assert await status(engine, iid) == "failed"
    return engine, iid, rec, notifier, out


async def test_retry_after_a_failed_handler_resumes_at_the_failed_step(engines: EngineFactory,
                                                                      tmp_path: Path) -> None:
    engine, iid, rec, notifier, out = await failed_twice(engines, tmp_path)
    assert out.read_text().count("build") == 1
    rec.mode = "done"
    await engine.retry(iid)
    await engine.idle()
    assert await status(engine, iid) == "completed"
    lines = out.read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["build", "announce"]   # build was not run again
    assert [w.step for w in rec.consumed()] == ["publish", "publish"]
    assert (await engine.summary(iid)).outcome == ""          # the work was done after all
    handlers = [r for r in await engine.instances(include_finished=True) if r.process == "notify-failure"]
    assert [h.status for h in handlers] == ["cancelled"]


async def test_retry_handler_runs_just_the_handler_again(engines: EngineFactory, tmp_path: Path) -> None:
    engine, iid, rec, notifier, out = await failed_twice(engines, tmp_path)
    with pytest.raises(EngineError, match="unknown field 'zzz'"):
        await engine.retry(iid, handler=True, fields={"zzz": 1})
    notifier.mode = "done"
    assert await engine.retry(iid, handler=True) == ["notify-failure"]
    await engine.idle()
    summary = await engine.summary(iid)
    assert (summary.status, summary.outcome) == ("completed", "recovered")
    assert [w.step for w in rec.consumed()] == ["publish"]                # the failed step was not re-run
    assert [line.split(" ", 1)[1] for line in out.read_text().splitlines()] == ["build"]
    second = notifier.consumed()[-1]
    assert second.fields["error"]["step"] == "publish"
    with pytest.raises(NotAllowedNow, match="no failed error handler"):
        await engine.retry(iid, handler=True)


async def test_retry_handler_for_a_step_level_handler(engines: EngineFactory) -> None:
    rec = Recorder(mode="fail")
    notifier = Recorder("notifier", mode="fail")
    engine = await engines({"p": """
        steps:
          - {id: work, participant: rec, on_error: {subprocess: notify-failure}}
          - {id: after, participant: echo}
        """, "notify-failure": NOTIFY_BROKEN}, [rec, notifier])
    iid = await engine.launch("p")
    await engine.idle()
    assert await status(engine, iid) == "failed"
    notifier.mode = "done"
    await engine.retry(iid, handler=True)
    await engine.idle()
    assert await status(engine, iid) == "completed"
    assert len(rec.consumed()) == 1
    assert ("after", "done") in await trace(engine, iid)


async def test_a_retry_inside_a_concurrence_resumes_only_what_had_not_finished(engines: EngineFactory) -> None:
    rec = Recorder(mode="fail")
    slow = Recorder("slow", mode="pending")
    notifier = Recorder("notifier", mode="fail")
    engine = await engines({"p": """
        on_error: {subprocess: notify-failure}
        steps:
          - concurrence:
              - [{id: a1, set: {a: 1}}, {id: a2, participant: slow}]
              - [{id: b1, participant: rec}]
          - {id: after, set: {after: true}}
        """, "notify-failure": NOTIFY_BROKEN}, [rec, slow, notifier])
    iid = await engine.launch("p")
    await engine.idle()
    assert await status(engine, iid) == "failed"
    assert len(slow.cancelled()) == 1                       # its work stopped while the handler ran
    rec.mode = "done"
    slow.mode = "done"
    await engine.retry(iid)
    await engine.idle()
    assert await status(engine, iid) == "completed"
    assert await fields(engine, iid) == {"a": 1, "after": True}
    assert [(s, e) for s, e in await trace(engine, iid) if e == "set"] == [("a1", "set"), ("after", "set")]
    assert len(slow.consumed()) == 2 and len(rec.consumed()) == 2


# -- 5. a loop that runs out fails --------------------------------------------------------

LOOP = """
    fields: {n: 0}
    steps:
      - id: poll
        repeat:
          - set: {n: "{{ n + 1 }}"}
        max: 3
        break_if: "n >= 100"
        EXTRA
      - {id: after, set: {after: true}}
    """


async def test_a_loop_that_runs_out_fails(engines: EngineFactory) -> None:
    engine = await engines({"loop": LOOP.replace("EXTRA", "")})
    iid = await engine.launch("loop")
    await engine.idle()
    summary = await engine.summary(iid)
    assert summary.status == "failed"
    assert summary.error == "poll: repeat: max 3 iteration(s) reached and break_if 'n >= 100' still false"
    assert "after" not in await fields(engine, iid)


async def test_a_loop_that_may_run_out_says_so(engines: EngineFactory) -> None:
    engine = await engines({"loop": LOOP.replace("EXTRA", "on_exhausted: continue")})
    iid = await engine.launch("loop")
    await engine.idle()
    assert await status(engine, iid) == "completed"
    assert await fields(engine, iid) == {"n": 3, "after": True}
    (ended,) = await events(engine, iid, "repeat ended")
    assert ended.detail == "after 3 iteration(s) (max reached)"


async def test_a_counted_loop_without_break_if_just_ends(engines: EngineFactory) -> None:
    engine = await engines({"loop": "steps:\n  - repeat: [{set: {x: 1}}]\n    max: 2\n"})
    iid = await engine.launch("loop")
    await engine.idle()
    assert await status(engine, iid) == "completed"


# -- 6. launch tokens -------------------------------------------------------------------

async def test_a_token_is_launched_once_even_when_launched_at_the_same_moment(engines: EngineFactory) -> None:
    engine = await engines({"p": "steps:\n  - participant: hold\n"})
    results = await asyncio.gather(*(engine.launch("p", token="T1") for _ in range(5)), return_exceptions=True)
    ids = [r for r in results if isinstance(r, int)]
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(ids) == 1 and len(refused) == 4
    assert {str(r) for r in refused} == {f"already launched as #{ids[0]}"}
    assert len(await engine.instances()) == 1


async def test_a_token_is_kept_across_a_restart_and_for_a_week(engines: EngineFactory) -> None:
    clock = ManualClock()
    engine = await engines({"p": "steps:\n  - participant: echo\n"}, clock=clock)
    first = await engine.launch("p", token="nightly-2027-01-15")
    await close_engine(engine)
    engine = await engines({"p": "steps:\n  - participant: echo\n"}, clock=clock)
    with pytest.raises(EngineError, match=f"^already launched as #{first}$"):
        await engine.launch("p", token="nightly-2027-01-15")
    clock.advance(7 * 86400)
    with pytest.raises(EngineError, match=f"^already launched as #{first}$"):
        await engine.launch("p", token="nightly-2027-01-15")
    clock.advance(1 * 86400 + 1)             # older than 8 days: forgotten
    again = await engine.launch("p", token="nightly-2027-01-15")
    assert again != first
    rows = await engine.store.read(lambda c: c.execute("SELECT token, instance_id FROM launch_tokens").fetchall())
    assert rows == [("launch p - nightly-2027-01-15", again)]     # stored per process and project


@pytest.mark.parametrize("token", ["", " ", "a b", "x" * 201, "tab\there"])
async def test_a_bad_token_is_refused(engines: EngineFactory, token: str) -> None:
    engine = await engines({"p": "steps:\n  - participant: echo\n"})
    with pytest.raises(EngineError, match="token"):
        await engine.launch("p", token=token)


async def test_a_schedule_run_is_launched_once_per_due_time(engines: EngineFactory) -> None:
    clock = ManualClock(START)
    spec = ScheduleSpec("nightly", "0 9 * * *", "p", {})
    engine = await engines({"p": "steps:\n  - participant: echo\n"}, clock=clock, schedules=[spec])
    await advance(engine, 3600)                       # 09:00
    [run] = await engine.instances(include_finished=True)
    rows = await engine.store.read(lambda c: c.execute("SELECT token, instance_id FROM launch_tokens").fetchall())
    assert rows == [(f"schedule nightly {START + 3600:.0f}", run.id)]
    # the same run once more (as after a crash between the launch and the timer moving on): not launched again
    await engine._schedules.fire(type("Row", (), {"path": "nightly", "due": START + 3600})())  # type: ignore[arg-type]
    assert len(await engine.instances(include_finished=True)) == 1


async def test_retry_and_retry_handler_from_chat(engines: EngineFactory, tmp_path: Path) -> None:
    from bot.access import Directory, User
    from bot.chat import VERIFIED_CONSOLE, Identity, Message
    from bot.commands import Dispatcher, default_registry
    engine, iid, rec, notifier, out = await failed_twice(engines, tmp_path)
    d = Dispatcher(engine, Directory([User("admin", roles={"*": frozenset({"admins"})})]), default_registry())
    admin = Identity("console", "console", "admin", account="admin", verified_by=VERIFIED_CONSOLE)

    async def say(text: str) -> list[str]:
        return (await d.handle(Message(admin, text, None))).lines
    [ps] = [line for line in await say("ps") if line.startswith(f"#{iid} ")]
    assert ps.startswith(f"#{iid} publish failed - process failed: handler notify-failure #{iid + 1} failed at tell: "
                         "boom (handling publish: mirror unreachable)")
    assert await say(f"retry {iid} handler") == [f"retrying #{iid}: the error handler notify-failure"]
    await engine.idle()            # failed again: the notifier still fails
    notifier.mode = "done"
    assert await say(f"retry {iid} handler") == [f"retrying #{iid}: the error handler notify-failure"]
    await engine.idle()
    assert (await say(f"show {iid}"))[0].startswith(f"#{iid} publish: completed, recovered;")
    assert await say(f"retry {iid} handler") == [f"#{iid} has no failed error handler to retry (it is completed)"]
