"""on_cancel: a process or a step names a subprocess that runs when it is
cut off while under way, started in the same transition as the cancel; and
``if:`` on any step guards it, every decision showing in the history."""
from __future__ import annotations

import sqlite3
from pathlib import Path

from engine.participants import Reply
from tests.engine_fixtures import DB_NAME, EngineFactory, Recorder, events, fields, status, trace

RELEASE_LOCK = """
    name: release-lock
    steps:
      - participant: unlock
        params: {fields: {lock: "{{ lock }}"}}
    """


# -- 8. on_cancel ----------------------------------------------------------------------------

async def test_cancelling_an_instance_runs_its_on_cancel_handler(engines: EngineFactory, tmp_path: Path) -> None:
    hold = Recorder("hold2", mode="pending")
    unlock = Recorder("unlock")
    engine = await engines({"p": """
        fields: {lock: repo-devel}
        on_cancel: {subprocess: release-lock}
        steps:
          - {id: approve, participant: hold2}
        """, "release-lock": RELEASE_LOCK}, [hold, unlock])
    iid = await engine.launch("p")
    await engine.idle()
    await engine.cancel(iid, actor="alice")
    # started in the cancel's own commit
    conn = sqlite3.connect(tmp_path / DB_NAME)
    try:
        rows = conn.execute("SELECT id, process, parent_id FROM instances WHERE id != ?", (iid,)).fetchall()
    finally:
        conn.close()
    assert rows == [(iid + 1, "release-lock", iid)]
    await engine.idle()
    [told] = unlock.consumed()
    assert told.fields["lock"] == "repo-devel"
    assert told.fields["cancel"] == {"actor": "alice", "step": "approve", "reason": "instance cancelled",
                                     "instance": iid}
    assert await status(engine, iid + 1) == "completed"
    assert await trace(engine, iid) == [("", "launched"), ("approve", "dispatched"), ("approve", "pending"),
                                        ("", "cancelled"), ("", "cancel handler")]


async def test_a_step_on_cancel_runs_when_its_branch_is_no_longer_waited_for(engines: EngineFactory) -> None:
    slow = Recorder("slow", mode="pending")
    fast = Recorder("fast")
    unlock = Recorder("unlock")
    engine = await engines({"p": """
        steps:
          - concurrence:
              - {id: quick, participant: fast}
              - id: locked
                on_cancel: {subprocess: release-lock}
                sequence:
                  - set: {lock: mirror}
                  - {id: wait-mirror, participant: slow}
            wait_for: any
          - set: {after: true}
        """, "release-lock": RELEASE_LOCK}, [slow, fast, unlock])
    iid = await engine.launch("p")
    await engine.idle()
    assert await status(engine, iid) == "completed"
    [told] = unlock.consumed()
    assert told.fields["lock"] == "mirror"                        # the branch's own fields
    assert told.fields["cancel"]["step"] == "locked"
    assert told.fields["cancel"]["reason"] == "concurrence@0 has what it waits for"


async def test_on_cancel_does_not_run_for_steps_that_ended_or_instances_that_completed(
        engines: EngineFactory) -> None:
    unlock = Recorder("unlock")
    hold = Recorder("hold2", mode="pending")
    engine = await engines({"p": """
        on_cancel: {subprocess: release-lock}
        fields: {lock: x}
        steps:
          - {id: done-already, set: {a: 1}, on_cancel: {subprocess: release-lock}}
          - {id: approve, participant: hold2}
        """, "release-lock": RELEASE_LOCK}, [unlock, hold])
    done = await engine.launch("p")
    await engine.idle()
    [item] = await engine.pending()
    await engine.reply(item.key, Reply.done())
    await engine.idle()
    assert await status(engine, done) == "completed" and unlock.consumed() == []
    cancelled = await engine.launch("p")
    await engine.idle()
    await engine.cancel(cancelled)
    await engine.idle()
    assert len(unlock.consumed()) == 1                 # the process's, not the finished step's


async def test_an_error_handler_s_suspended_work_runs_on_cancel_when_given_up(engines: EngineFactory) -> None:
    slow = Recorder("slow", mode="pending")
    unlock = Recorder("unlock")
    engine = await engines({"p": """
        fields: {lock: l}
        on_error: {subprocess: notify}
        steps:
          - concurrence:
              - {id: locked, participant: slow, on_cancel: {subprocess: release-lock}}
              - {id: broken, error: "no mirror"}
        """, "release-lock": RELEASE_LOCK, "notify": "steps: [{set: {told: yes}}]"}, [slow, unlock])
    iid = await engine.launch("p")
    await engine.idle()
    summary = await engine.summary(iid)
    assert (summary.status, summary.outcome) == ("completed", "recovered")
    [told] = unlock.consumed()
    assert told.fields["cancel"]["reason"] == "error at broken handled"


# -- 9. if guards, and every decision in the history ---------------------------------------------

async def test_an_if_guard_skips_a_step_and_says_why(engines: EngineFactory) -> None:
    notify = Recorder("notify")
    engine = await engines({"p": """
        inputs: {dry_run: bool}
        fields: {dry_run: false}
        steps:
          - {id: publish, participant: notify, if: "not dry_run"}
          - {id: note, set: {noted: true}, if: "dry_run"}
        """}, [notify])
    real = await engine.launch("p")
    dry = await engine.launch("p", {"dry_run": "yes"})
    await engine.idle()
    assert [w.instance_id for w in notify.consumed()] == [real]
    assert await trace(engine, real) == [("", "launched"), ("publish", "dispatched"), ("publish", "done"),
                                         ("note", "skipped"), ("", "completed")]
    assert [(e.step, e.detail) for e in await events(engine, dry, "skipped")] == [("publish", "if: not dry_run")]
    assert await fields(engine, dry) == {"dry_run": True, "noted": True}


async def test_if_then_else_says_which_branch_it_took(engines: EngineFactory) -> None:
    engine = await engines({"p": """
        inputs: {n: int}
        fields: {n: 0}
        steps:
          - id: big
            if: "n > 2"
            then: [{set: {size: big}}]
            else: [{set: {size: small}}]
          - id: odd
            if: "n % 2 == 1"
            then: [{set: {odd: true}}]
        """})
    three = await engine.launch("p", {"n": "3"})
    two = await engine.launch("p", {"n": "2"})
    await engine.idle()
    assert [(e.step, e.event, e.detail) for e in await engine.history(three) if e.step in ("big", "odd")] == [
        ("big", "then taken", "if: n > 2"), ("odd", "then taken", "if: n % 2 == 1")]
    assert [(e.step, e.event, e.detail) for e in await engine.history(two) if e.step in ("big", "odd")] == [
        ("big", "else taken", "if: n > 2"), ("odd", "skipped", "if: n % 2 == 1")]


async def test_a_guard_that_cannot_be_decided_fails_the_step(engines: EngineFactory) -> None:
    engine = await engines({"p": """
        steps:
          - {id: maybe, set: {a: 1}, if: "flag", on_error: skip}
          - {id: strict, set: {b: 1}, if: "flag"}
        """})
    iid = await engine.launch("p")
    await engine.idle()
    summary = await engine.summary(iid)
    assert summary.status == "failed"
    assert summary.error == "strict: condition 'flag': 'flag' is undefined"
    assert await fields(engine, iid) == {}


async def test_guards_on_a_branch_a_loop_and_a_subprocess(engines: EngineFactory) -> None:
    engine = await engines({"p": """
        fields: {skip_checks: true, n: 0}
        steps:
          - concurrence:
              - {set: {a: 1}}
              - {set: {b: 1}, if: "not skip_checks"}
          - repeat: [{set: {n: "{{ n + 1 }}"}}]
            max: 3
            if: "n == 0"
          - {subprocess: child, if: "false"}
        """, "child": "steps: [{set: {child: 1}}]"})
    iid = await engine.launch("p")
    await engine.idle()
    assert await fields(engine, iid) == {"skip_checks": True, "n": 3, "a": 1}
    assert len(await events(engine, iid, "skipped")) == 2
