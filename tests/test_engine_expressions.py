"""The engine's expressions and operations, observed from outside: fields,
status, history, participant calls and workitem keys.  Real SQLite, a manual
clock, no APScheduler (timers fire through ``engine.timers.fire_due``)."""
from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from engine.errors import NoSuchWorkitem, NotAllowedNow
from engine.participants import Reply
from engine.timers import ManualClock
from tests.engine_fixtures import (DB_NAME, START, DbProbe, Recorder, advance, close_engine, events, fields,
                                   status, timers, trace)


# -- sequence, set, if ---------------------------------------------------------

async def test_sequence_runs_steps_one_after_the_other(engines) -> None:
    rec = Recorder()
    engine = await engines({"seq": """
        steps:
          - {id: a, participant: rec, params: {fields: {a: 1}}}
          - {id: b, participant: rec, params: {fields: {b: 2}}}
          - {id: c, participant: rec, params: {fields: {c: 3}}}
        """}, [rec])
    iid = await engine.launch("seq")
    await engine.idle()
    assert [w.step for w in rec.consumed()] == ["a", "b", "c"]
    assert await trace(engine, iid) == [
        ("", "launched"),
        ("a", "dispatched"), ("a", "done"),
        ("b", "dispatched"), ("b", "done"),
        ("c", "dispatched"), ("c", "done"),
        ("", "completed")]
    assert await status(engine, iid) == "completed"


async def test_sequence_step_sees_fields_of_the_steps_before_it(engines) -> None:
    rec = Recorder()
    engine = await engines({"seq": """
        fields: {x: 0}
        steps:
          - {participant: rec, params: {fields: {x: 5}}}
          - {participant: rec, params: {seen: "{{ x }}"}}
        """}, [rec])
    await engine.launch("seq")
    await engine.idle()
    assert rec.consumed()[1].params == {"seen": 5}
    assert rec.consumed()[1].fields == {"x": 5}


async def test_set_templated_values_keep_their_types(engines) -> None:
    engine = await engines({"s": """
        fields: {n: 1}
        steps:
          - set:
              n: "{{ n + 1 }}"
              text: "n is {{ n }}"
              flag: "{{ n > 0 }}"
              items: "{{ [n, n * 10] }}"
              plain: 7
        """})
    iid = await engine.launch("s")
    await engine.idle()
    got = await fields(engine, iid)
    assert got == {"n": 2, "text": "n is 1", "flag": True, "items": [1, 10], "plain": 7}
    assert type(got["n"]) is int
    assert [(e.step, e.event) for e in await engine.history(iid)][1] == ("set@0", "set")


async def test_launch_fields_override_definition_defaults(engines) -> None:
    engine = await engines({"s": """
        fields: {who: world, n: 1}
        steps:
          - set: {greeting: "hello {{ who }}"}
        """})
    iid = await engine.launch("s", {"who": "bob"})
    await engine.idle()
    assert await fields(engine, iid) == {"who": "bob", "n": 1, "greeting": "hello bob"}


IF_ELSE = """
    inputs: {n: int}
    steps:
      - if: "n > 2"
        then:
          - {id: big, participant: rec}
        else:
          - {id: small, participant: rec}
      - {id: after, participant: rec}
    """


async def test_if_true_runs_then_branch(engines) -> None:
    rec = Recorder()
    engine = await engines({"cond": IF_ELSE}, [rec])
    iid = await engine.launch("cond", {"n": 3})
    await engine.idle()
    assert [w.step for w in rec.consumed()] == ["big", "after"]
    assert [w.path for w in rec.consumed()] == ["0.then.0", "1"]
    assert await status(engine, iid) == "completed"


async def test_if_false_runs_else_branch(engines) -> None:
    rec = Recorder()
    engine = await engines({"cond": IF_ELSE}, [rec])
    iid = await engine.launch("cond", {"n": 2})
    await engine.idle()
    assert [w.step for w in rec.consumed()] == ["small", "after"]
    assert [w.path for w in rec.consumed()] == ["0.else.0", "1"]
    assert await status(engine, iid) == "completed"


async def test_if_false_without_else_goes_on(engines) -> None:
    rec = Recorder()
    engine = await engines({"cond": """
        inputs: {n: int}
        steps:
          - if: "n > 2"
            then: [{id: big, participant: rec}]
          - {id: after, participant: rec}
        """}, [rec])
    iid = await engine.launch("cond", {"n": 0})
    await engine.idle()
    assert [w.step for w in rec.consumed()] == ["after"]
    assert await status(engine, iid) == "completed"


async def test_if_on_undefined_field_fails_the_step_with_a_clear_error(engines) -> None:
    rec = Recorder()
    engine = await engines({"cond": """
        steps:
          - id: check
            if: "missing > 2"
            then: [{participant: rec}]
          - {id: after, participant: rec}
        """}, [rec])
    iid = await engine.launch("cond")
    await engine.idle()
    summary = await engine.summary(iid)
    assert summary.status == "failed"
    assert summary.error == "check: condition 'missing > 2': 'missing' is undefined"
    assert summary.waiting_on == "check failed: condition 'missing > 2': 'missing' is undefined"
    assert rec.calls == []
    assert await trace(engine, iid) == [("", "launched"), ("check", "error"), ("check", "failed")]


# -- concurrence ---------------------------------------------------------------

async def test_concurrence_all_waits_for_every_branch(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"par": """
        steps:
          - concurrence:
              - {id: left, participant: pend}
              - {id: right, participant: pend}
            wait_for: all
          - {id: after, participant: echo}
        """}, [pend])
    iid = await engine.launch("par")
    await engine.idle()
    left, right = pend.consumed()
    assert (left.step, right.step) == ("left", "right")
    await engine.reply(left.key, Reply.done({"l": 1}))
    await engine.idle()
    assert await status(engine, iid) == "waiting"
    assert [e.step for e in await events(engine, iid, "dispatched")] == ["left", "right"]
    await engine.reply(right.key, Reply.done({"r": 2}))
    await engine.idle()
    assert await status(engine, iid) == "completed"
    assert await fields(engine, iid) == {"l": 1, "r": 2, "echo": ""}
    assert pend.cancelled() == []


async def test_concurrence_any_cancels_the_losing_branch(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"race": """
        steps:
          - concurrence:
              - {id: slow, participant: pend}
              - {id: fast, participant: pend}
            wait_for: any
          - {id: after, participant: echo}
        """}, [pend])
    iid = await engine.launch("race")
    await engine.idle()
    slow, fast = pend.consumed()
    await engine.reply(fast.key, Reply.done({"winner": "fast"}))
    await engine.idle()
    assert await status(engine, iid) == "completed"
    assert pend.cancelled() == [slow]
    assert [(e.step, e.detail) for e in await events(engine, iid, "cancelled")] == [
        ("slow", "concurrence@0 has what it waits for")]
    assert await fields(engine, iid) == {"winner": "fast", "echo": ""}
    assert await engine.pending() == []
    with pytest.raises(NoSuchWorkitem):
        await engine.reply(slow.key, Reply.done({"winner": "slow"}))


async def test_concurrence_any_cancels_a_branch_whose_participant_is_still_working(engines) -> None:
    busy = Recorder("busy", mode="block")
    engine = await engines({"race": """
        steps:
          - concurrence:
              - {id: busy, participant: busy}
              - {id: quick, participant: echo}
            wait_for: any
        """}, [busy])
    iid = await engine.launch("race")
    for _ in range(200):                      # engine.idle() would wait for the blocked consume
        if busy.cancelled():
            break
        await asyncio.sleep(0.005)
    assert await status(engine, iid) == "completed"
    assert [w.step for w in busy.cancelled()] == ["busy"]
    assert busy.cancelled() == busy.consumed()
    busy.release.set()
    await engine.idle()
    assert await status(engine, iid) == "completed"
    assert [(e.step, e.detail) for e in await events(engine, iid, "cancelled")] == [
        ("busy", "concurrence@0 has what it waits for")]


async def test_concurrence_wait_for_n_finishes_after_n_branches(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"two": """
        steps:
          - concurrence:
              - {id: a, participant: pend}
              - {id: b, participant: pend}
              - {id: c, participant: pend}
            wait_for: 2
        """}, [pend])
    iid = await engine.launch("two")
    await engine.idle()
    a, b, c = pend.consumed()
    await engine.reply(c.key, Reply.done({"c": 1}))
    await engine.idle()
    assert await status(engine, iid) == "waiting"
    assert pend.cancelled() == []
    await engine.reply(a.key, Reply.done({"a": 1}))
    await engine.idle()
    assert await status(engine, iid) == "completed"
    assert pend.cancelled() == [b]
    assert await fields(engine, iid) == {"c": 1, "a": 1}


def merge_process(merge: str) -> str:
    # branch 0 finishes last (answered by the test), branch 1 at once
    return f"""
        fields: {{x: 0, y: 0, z: 0}}
        steps:
          - concurrence:
              - [{{set: {{z: 9}}}}, {{id: late, participant: pend}}]
              - {{set: {{x: 1}}}}
            wait_for: all
            merge: {merge}
        """


async def run_merge(engines, merge: str) -> dict:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"m": merge_process(merge)}, [pend])
    iid = await engine.launch("m")
    await engine.idle()
    (late,) = pend.consumed()
    assert late.fields == {"x": 0, "y": 0, "z": 9}       # a branch sees only its own changes
    await engine.reply(late.key, Reply.done({"y": 2}))
    await engine.idle()
    assert await status(engine, iid) == "completed"
    return await fields(engine, iid)


async def test_merge_union_takes_only_the_fields_each_branch_changed(engines) -> None:
    # the late branch still has x=0 in its copy: it must not undo the other branch's x=1
    assert await run_merge(engines, "union") == {"x": 1, "y": 2, "z": 9}


async def test_merge_first_takes_the_branch_that_finished_first(engines) -> None:
    assert await run_merge(engines, "first") == {"x": 1, "y": 0, "z": 0}


async def test_merge_last_takes_the_branch_that_finished_last(engines) -> None:
    assert await run_merge(engines, "last") == {"x": 0, "y": 2, "z": 9}


async def test_merge_none_keeps_the_fields_as_before(engines) -> None:
    assert await run_merge(engines, "none") == {"x": 0, "y": 0, "z": 0}


async def test_merge_union_later_branch_wins_a_field_both_changed(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"m": """
        fields: {x: 0}
        steps:
          - concurrence:
              - {participant: pend}
              - {set: {x: 1}}
        """}, [pend])
    iid = await engine.launch("m")
    await engine.idle()
    await engine.reply(pend.consumed()[0].key, Reply.done({"x": 2}))
    await engine.idle()
    assert await fields(engine, iid) == {"x": 2}


# -- wait ----------------------------------------------------------------------

async def test_wait_duration_is_over_only_when_due(engines) -> None:
    rec = Recorder()
    engine = await engines({"w": """
        steps:
          - {id: nap, wait: 10s}
          - {id: after, participant: rec}
        """}, [rec])
    iid = await engine.launch("w")
    await engine.idle()
    assert await status(engine, iid) == "waiting"
    assert await timers(engine, iid) == [("wait", "nap", START + 10, False)]
    await advance(engine, 9.5)
    assert await status(engine, iid) == "waiting"
    assert rec.calls == []
    await advance(engine, 0.5)
    assert await status(engine, iid) == "completed"
    assert [w.step for w in rec.consumed()] == ["after"]
    assert [e.at for e in await events(engine, iid, "wait over")] == [START + 10]
    assert await timers(engine, iid) == []


async def test_wait_until_a_time_later_today(engines) -> None:
    engine = await engines({"w": """
        steps:
          - {id: night, wait: {until: "09:30"}}
        """})
    iid = await engine.launch("w")       # at 08:00 UTC
    await engine.idle()
    assert await timers(engine, iid) == [("wait", "night", START + 90 * 60, False)]
    await advance(engine, 90 * 60 - 1)
    assert await status(engine, iid) == "waiting"
    await advance(engine, 1)
    assert await status(engine, iid) == "completed"


async def test_wait_until_a_time_already_past_today_waits_for_tomorrow(engines) -> None:
    engine = await engines({"w": """
        steps:
          - {id: night, wait: {until: "02:00"}}
        """})
    iid = await engine.launch("w")
    await engine.idle()
    assert await timers(engine, iid) == [("wait", "night", START + 18 * 3600, False)]


async def test_wait_until_honours_the_engine_time_zone(engines) -> None:
    engine = await engines({"w": """
        steps:
          - {id: night, wait: {until: "09:30"}}
        """}, timezone="Europe/Berlin")   # UTC+1 in January: 09:30 there is 08:30 UTC
    iid = await engine.launch("w")
    await engine.idle()
    assert await timers(engine, iid) == [("wait", "night", START + 30 * 60, False)]


async def test_wait_until_a_templated_iso_time(engines) -> None:
    engine = await engines({"w": """
        inputs: {when: str}
        steps:
          - {id: then, wait: {until: "{{ when }}"}}
        """})
    iid = await engine.launch("w", {"when": "2027-01-15T10:00:00+00:00"})
    await engine.idle()
    assert await timers(engine, iid) == [("wait", "then", START + 2 * 3600, False)]


# -- repeat --------------------------------------------------------------------

async def test_repeat_stops_when_break_if_holds(engines) -> None:
    rec = Recorder()
    engine = await engines({"loop": """
        fields: {n: 0}
        steps:
          - id: loop
            repeat:
              - set: {n: "{{ n + 1 }}"}
              - {id: work, participant: rec}
            max: 10
            break_if: "n >= 3"
        """}, [rec])
    iid = await engine.launch("loop")
    await engine.idle()
    assert await fields(engine, iid) == {"n": 3}
    assert [w.fields["n"] for w in rec.consumed()] == [1, 2, 3]
    assert len({w.key for w in rec.consumed()}) == 3
    (ended,) = await events(engine, iid, "repeat ended")
    assert (ended.step, ended.detail) == ("loop", "after 3 iteration(s)")
    assert await status(engine, iid) == "completed"


async def test_repeat_stops_at_max(engines) -> None:
    engine = await engines({"loop": """
        fields: {n: 0}
        steps:
          - id: loop
            repeat:
              - set: {n: "{{ n + 1 }}"}
            max: 4
            break_if: "n >= 100"
            on_exhausted: continue      # the default, error, fails the step (test_engine_semantics)
        """})
    iid = await engine.launch("loop")
    await engine.idle()
    assert await fields(engine, iid) == {"n": 4}
    (ended,) = await events(engine, iid, "repeat ended")
    assert ended.detail == "after 4 iteration(s) (max reached)"
    assert await status(engine, iid) == "completed"


async def test_repeat_with_a_wait_in_its_body(engines) -> None:
    engine = await engines({"loop": """
        fields: {n: 0}
        steps:
          - repeat:
              - set: {n: "{{ n + 1 }}"}
              - wait: 5s
            max: 3
        """})
    iid = await engine.launch("loop")
    await engine.idle()
    for expected in (1, 2):
        await advance(engine, 5)
        assert (await fields(engine, iid))["n"] == expected + 1
    await advance(engine, 5)
    assert await status(engine, iid) == "completed"
    assert await fields(engine, iid) == {"n": 3}


# -- subprocess ----------------------------------------------------------------

CHILD = """
    name: child
    fields: {greeting: hi}
    steps:
      - {id: child-work, participant: rec}
      - set: {c: "{{ a + b }}"}
    """


async def test_subprocess_gets_fields_in_and_merges_fields_back(engines) -> None:
    rec = Recorder()
    engine = await engines({"parent": """
        fields: {a: 1}
        steps:
          - {id: call, subprocess: child, fields: {b: "{{ a + 1 }}"}}
          - {id: after, participant: rec}
        """, "child": CHILD}, [rec])
    iid = await engine.launch("parent")
    await engine.idle()
    child_work, after = rec.consumed()
    assert child_work.instance_id == iid + 1
    assert child_work.fields == {"greeting": "hi", "a": 1, "b": 2}
    assert after.fields == {"a": 1, "b": 2, "greeting": "hi", "c": 3}
    child = await engine.summary(iid + 1)
    assert (child.status, child.parent_id, child.process) == ("completed", iid, "child")
    assert await status(engine, iid) == "completed"
    assert ("call", "subprocess") in await trace(engine, iid)
    assert ("call", "subprocess done") in await trace(engine, iid)


async def test_subprocess_failure_fails_the_parent_step(engines) -> None:
    engine = await engines({"parent": """
        steps:
          - {id: call, subprocess: broken}
          - {id: after, participant: echo}
        """, "broken": """
        steps:
          - {id: boom, error: "child broke"}
        """})
    iid = await engine.launch("parent")
    await engine.idle()
    parent = await engine.summary(iid)
    assert parent.status == "failed"
    assert parent.error == f"call: subprocess #{iid + 1} failed at boom: child broke"
    assert (await engine.summary(iid + 1)).status == "failed"
    assert (await engine.describe(iid)).children == [iid + 1]


async def test_subprocess_failure_is_handled_by_on_error_of_the_parent_step(engines) -> None:
    rec = Recorder()
    engine = await engines({"parent": """
        steps:
          - {id: call, subprocess: broken, on_error: skip}
          - {id: after, participant: rec}
        """, "broken": """
        steps:
          - {id: boom, error: "child broke"}
        """}, [rec])
    iid = await engine.launch("parent")
    await engine.idle()
    assert await status(engine, iid) == "completed"
    assert [w.step for w in rec.consumed()] == ["after"]
    (skipped,) = await events(engine, iid, "skipped")
    assert (skipped.step, skipped.detail) == ("call", "on error")
    # the failed child does not stay in the active list once its parent moved on
    assert (await engine.summary(iid + 1)).status == "cancelled"
    assert [s.id for s in await engine.instances()] == []


async def test_subprocess_retried_with_on_error_retry_launches_a_new_child(engines) -> None:
    rec = Recorder(mode="fail")
    engine = await engines({"parent": """
        steps:
          - {id: call, subprocess: child, on_error: {retry: 1, backoff: 1s}}
        """, "child": """
        steps:
          - {id: work, participant: rec}
        """}, [rec])
    iid = await engine.launch("parent")
    await engine.idle()
    rec.mode = "done"
    await advance(engine, 1)
    assert await status(engine, iid) == "completed"
    assert [w.instance_id for w in rec.consumed()] == [iid + 1, iid + 2]


# -- terminate and error ---------------------------------------------------------

async def test_terminate_ends_the_instance_and_cancels_pending_participants(engines) -> None:
    pend = Recorder("pend", mode="pending")
    rec = Recorder()
    engine = await engines({"t": """
        inputs: {who: str}
        steps:
          - concurrence:
              - {id: ask, participant: pend}
              - [{wait: 5s}, {id: stop, terminate: "nothing to do for {{ who }}"}]
          - {id: after, participant: rec}
        """}, [pend, rec])
    iid = await engine.launch("t", {"who": "bob"})
    await engine.idle()
    (ask,) = pend.consumed()
    await advance(engine, 5)
    summary = await engine.summary(iid)
    assert summary.status == "terminated"
    assert pend.cancelled() == [ask]
    assert rec.calls == []
    assert await engine.pending() == []
    assert await timers(engine, iid) == []
    assert (await trace(engine, iid))[-2:] == [("stop", "terminate"), ("", "terminated")]
    assert (await events(engine, iid, "terminated"))[0].detail == "nothing to do for bob"
    with pytest.raises(NoSuchWorkitem):
        await engine.reply(ask.key, Reply.done())


async def test_error_step_fails_the_instance(engines) -> None:
    rec = Recorder()
    engine = await engines({"e": """
        fields: {repo: devel}
        steps:
          - {id: refuse, error: "cannot publish {{ repo }}"}
          - {id: after, participant: rec}
        """}, [rec])
    iid = await engine.launch("e")
    await engine.idle()
    summary = await engine.summary(iid)
    assert (summary.status, summary.error) == ("failed", "refuse: cannot publish devel")
    assert rec.calls == []
    assert (await trace(engine, iid))[-2:] == [("refuse", "error"), ("refuse", "failed")]


async def test_error_step_is_handled_by_an_enclosing_on_error(engines) -> None:
    rec = Recorder()
    engine = await engines({"e": """
        steps:
          - sequence:
              - {error: "nope"}
              - {id: skipped-work, participant: rec}
            on_error: skip
          - {id: after, participant: rec}
        """}, [rec])
    iid = await engine.launch("e")
    await engine.idle()
    assert await status(engine, iid) == "completed"
    assert [w.step for w in rec.consumed()] == ["after"]


# -- retry ---------------------------------------------------------------------

async def test_retry_after_a_failure_dispatches_again_and_completes(engines) -> None:
    rec = Recorder(mode="fail")
    engine = await engines({"r": """
        steps:
          - {id: flaky, participant: rec, params: {message: "disk full"}}
          - {id: after, participant: echo}
        """}, [rec])
    iid = await engine.launch("r")
    await engine.idle()
    summary = await engine.summary(iid)
    assert (summary.status, summary.error) == ("failed", "flaky: disk full")
    rec.mode = "done"
    assert await engine.retry(iid, actor="alice") == ["flaky"]
    await engine.idle()
    summary = await engine.summary(iid)
    assert (summary.status, summary.error) == ("completed", "")
    first, second = rec.consumed()
    assert first.key != second.key
    assert (first.path, second.path) == ("0", "0")
    (retried,) = await events(engine, iid, "retried")
    assert (retried.step, retried.actor) == ("flaky", "alice")


async def test_retry_sets_the_fields_that_were_the_fix(engines) -> None:
    engine = await engines({"r": """
        inputs: {repo: str}
        steps:
          - concurrence:
              - {id: sync, participant: echo, params: {text: "rsync {{ repo }}"}}
              - {participant: echo}
          - {id: after, participant: echo, params: {text: "published {{ repo }}"}}
        """})
    iid = await engine.launch("r")
    await engine.idle()
    summary = await engine.summary(iid)
    assert summary.status == "failed" and "'repo' is undefined" in summary.error
    assert await engine.retry(iid, actor="alice", fields={"repo": "devel"}) == ["sync"]
    await engine.idle()
    detail = await engine.describe(iid)
    assert (detail.summary.status, detail.fields["repo"], detail.fields["echo"]) == (
        "completed", "devel", "published devel")
    (retried,) = await events(engine, iid, "retried")
    assert (retried.step, retried.actor, retried.detail) == ("sync", "alice", "repo='devel'")


async def test_retry_with_nothing_failed_is_refused(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"r": "steps: [{participant: pend}]"}, [pend])
    iid = await engine.launch("r")
    await engine.idle()
    with pytest.raises(NotAllowedNow):
        await engine.retry(iid)
    assert await status(engine, iid) == "waiting"


async def test_on_error_retry_backoff_doubles_then_skips(engines) -> None:
    rec = Recorder(mode="fail")
    after = Recorder("after")
    engine = await engines({"r": """
        steps:
          - id: flaky
            participant: rec
            on_error: {retry: 2, backoff: 10s, then: skip}
          - {id: after, participant: after}
        """}, [rec, after])
    iid = await engine.launch("r")
    await engine.idle()
    assert await timers(engine, iid) == [("retry", "flaky", START + 10, False)]
    assert await status(engine, iid) == "waiting"
    await advance(engine, 10)
    assert await timers(engine, iid) == [("retry", "flaky", START + 10 + 20, False)]
    await advance(engine, 19)
    assert len(rec.consumed()) == 2
    await advance(engine, 1)
    assert len(rec.consumed()) == 3
    assert await status(engine, iid) == "completed"
    assert [w.step for w in after.consumed()] == ["after"]
    assert [e.detail for e in await events(engine, iid, "retry scheduled")] == [
        "attempt 2 of 3 in 10s", "attempt 3 of 3 in 20s"]
    assert [e.at for e in await events(engine, iid, "dispatched") if e.step == "flaky"] == [
        START, START + 10, START + 30]
    (skipped,) = await events(engine, iid, "skipped")
    assert (skipped.step, skipped.detail) == ("flaky", "on error")
    assert len({w.key for w in rec.consumed()}) == 3


async def test_on_error_retry_succeeds_on_a_later_attempt(engines) -> None:
    engine = await engines({"r": """
        steps:
          - id: flaky
            participant: fail
            params: {until_attempt: 2}
            on_error: {retry: 3, backoff: 1s}
        """})
    iid = await engine.launch("r")
    await engine.idle()
    await advance(engine, 1)
    assert await status(engine, iid) == "completed"
    assert await fields(engine, iid) == {"attempts": 2}


async def test_on_error_retry_exhausted_without_then_fails(engines) -> None:
    engine = await engines({"r": """
        steps:
          - {id: flaky, participant: fail, on_error: {retry: 1, backoff: 1s}}
        """})
    iid = await engine.launch("r")
    await engine.idle()
    await advance(engine, 1)
    summary = await engine.summary(iid)
    assert (summary.status, summary.error) == ("failed", "flaky: failed on purpose")


async def test_on_error_subprocess_handler_gets_the_error_and_the_step_completes(engines) -> None:
    rec = Recorder(mode="fail")
    after = Recorder("after")
    engine = await engines({"main": """
        steps:
          - id: flaky
            participant: rec
            params: {message: "disk full"}
            on_error: {subprocess: handler}
          - {id: after, participant: after}
        """, "handler": """
        steps:
          - set: {handled: "{{ error.message }}", where: "{{ error.step }}"}
        """}, [rec, after])
    iid = await engine.launch("main")
    await engine.idle()
    assert await status(engine, iid) == "completed"
    handler = await engine.summary(iid + 1)
    assert (handler.process, handler.status, handler.parent_id) == ("handler", "completed", iid)
    got = await fields(engine, iid)
    assert (got["handled"], got["where"]) == ("disk full", "flaky")
    assert [w.step for w in after.consumed()] == ["after"]
    assert ("flaky", "handler done") in await trace(engine, iid)


# -- timeouts and named timers ---------------------------------------------------

async def test_timeout_with_on_timeout_error_fails_and_cancels_the_participant(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"t": """
        steps:
          - {id: ask, participant: pend, timeout: 5s}
        """}, [pend])
    iid = await engine.launch("t")
    await engine.idle()
    assert await timers(engine, iid) == [("timeout", "ask", START + 5, False)]
    await advance(engine, 4)
    assert await status(engine, iid) == "waiting"
    await advance(engine, 1)
    summary = await engine.summary(iid)
    assert (summary.status, summary.error) == ("failed", "ask: timed out after 5s")
    assert pend.cancelled() == pend.consumed()
    assert ("ask", "timed out") in await trace(engine, iid)
    assert await engine.pending() == []


async def test_timeout_with_on_timeout_skip_goes_on(engines) -> None:
    pend = Recorder("pend", mode="pending")
    rec = Recorder()
    engine = await engines({"t": """
        steps:
          - {id: ask, participant: pend, timeout: 5s, on_timeout: skip}
          - {id: after, participant: rec}
        """}, [pend, rec])
    iid = await engine.launch("t")
    await engine.idle()
    await advance(engine, 5)
    assert await status(engine, iid) == "completed"
    (ask,) = pend.consumed()
    assert pend.cancelled() == [ask]
    assert [w.step for w in rec.consumed()] == ["after"]
    (skipped,) = await events(engine, iid, "skipped")
    assert (skipped.step, skipped.detail) == ("ask", "on timeout")
    with pytest.raises(NoSuchWorkitem):                 # the key went stale with the timeout
        await engine.reply(ask.key, Reply.done())


async def test_timeout_with_on_timeout_subprocess_runs_the_handler(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"t": """
        steps:
          - {id: ask, participant: pend, timeout: 5s, on_timeout: {subprocess: fallback}}
          - set: {after: true}
        """, "fallback": """
        steps:
          - set: {decision: "default because {{ error.message }}"}
        """}, [pend])
    iid = await engine.launch("t")
    await engine.idle()
    await advance(engine, 5)
    assert await status(engine, iid) == "completed"
    assert pend.cancelled() == pend.consumed()
    got = await fields(engine, iid)
    assert (got["decision"], got["after"]) == ("default because timed out after 5s", True)
    assert (await engine.summary(iid + 1)).process == "fallback"


async def test_timeout_on_a_sequence_cancels_its_running_step(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"t": """
        steps:
          - id: block
            timeout: 1m
            on_timeout: skip
            sequence:
              - {id: ask, participant: pend}
          - set: {after: true}
        """}, [pend])
    iid = await engine.launch("t")
    await engine.idle()
    await advance(engine, 60)
    assert await status(engine, iid) == "completed"
    assert pend.cancelled() == pend.consumed()


async def test_step_answered_before_its_timeout_leaves_no_timer(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"t": """
        steps:
          - {id: ask, participant: pend, timers: "2s: remind, 5s: timeout"}
          - wait: 1h
        """}, [pend])
    iid = await engine.launch("t")
    await engine.idle()
    await engine.reply(pend.consumed()[0].key, Reply.done())
    await engine.idle()
    assert await timers(engine, iid) == [("wait", "wait@1", START + 3600, False)]
    await advance(engine, 10)
    assert pend.timers() == []
    assert await status(engine, iid) == "waiting"


async def test_named_timers_reach_the_participant_then_the_timeout_applies(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"t": """
        steps:
          - {id: ask, participant: pend, timers: "2s: remind, 5s: timeout"}
        """}, [pend])
    iid = await engine.launch("t")
    await engine.idle()
    (ask,) = pend.consumed()
    assert await timers(engine, iid) == [("remind", "ask", START + 2, False),
                                         ("timeout", "ask", START + 5, False)]
    await advance(engine, 2)
    assert pend.timers() == [(ask.key, "remind")]
    assert await status(engine, iid) == "waiting"
    assert await timers(engine, iid) == [("timeout", "ask", START + 5, False)]
    assert ("ask", "timer remind") in await trace(engine, iid)
    await advance(engine, 3)
    summary = await engine.summary(iid)
    assert (summary.status, summary.error) == ("failed", "ask: timed out after 5s")
    assert pend.kinds() == ["consume", "timer", "cancel"]
    assert pend.timers() == [(ask.key, "remind")]


async def test_named_timer_reply_answers_the_step(engines) -> None:
    pend = Recorder("pend", mode="pending")
    pend.timer_reply = Reply.done({"escalated": True})
    engine = await engines({"t": """
        steps:
          - {id: ask, participant: pend, timers: "1h: escalate"}
        """}, [pend])
    iid = await engine.launch("t")
    await engine.idle()
    await advance(engine, 3600)
    assert await status(engine, iid) == "completed"
    assert await fields(engine, iid) == {"escalated": True}
    (done,) = await events(engine, iid, "done")
    assert done.actor == "timer escalate"


# -- pending, reply, cancel --------------------------------------------------------

async def test_pending_participant_answered_by_reply_completes_the_step(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"p": """
        fields: {n: 1}
        steps:
          - {id: approve, participant: pend, params: {question: "ok {{ n }}?"}}
          - set: {seen: "{{ approved }}"}
        """}, [pend])
    iid = await engine.launch("p")
    await engine.idle()
    assert await status(engine, iid) == "waiting"
    (approve,) = pend.consumed()
    listed = await engine.pending()
    assert listed == [approve]
    assert await engine.pending("pend") == [approve]
    assert await engine.pending("echo") == []
    assert (approve.params, approve.fields) == ({"question": "ok 1?"}, {"n": 1})
    await engine.reply(approve.key, Reply.done({"approved": True}), actor="bob")
    await engine.idle()
    assert await status(engine, iid) == "completed"
    assert await fields(engine, iid) == {"n": 1, "approved": True, "seen": True}
    assert await engine.pending() == []
    assert [(e.step, e.event) for e in await engine.history(iid)][1:4] == [
        ("approve", "dispatched"), ("approve", "pending"), ("approve", "done")]


async def test_failed_reply_fails_the_step(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"p": "steps: [{id: approve, participant: pend}]"}, [pend])
    iid = await engine.launch("p")
    await engine.idle()
    await engine.reply(pend.consumed()[0].key, Reply.failed("rejected by bob"), actor="bob")
    await engine.idle()
    summary = await engine.summary(iid)
    assert (summary.status, summary.error) == ("failed", "approve: rejected by bob")
    failed = (await events(engine, iid, "failed"))[0]
    assert (failed.actor, failed.detail) == ("bob", "rejected by bob")


async def test_second_reply_to_the_same_key_is_refused(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"p": "steps: [{participant: pend}, {wait: 1h}]"}, [pend])
    iid = await engine.launch("p")
    await engine.idle()
    key = pend.consumed()[0].key
    await engine.reply(key, Reply.done({"first": 1}))
    with pytest.raises(NoSuchWorkitem):
        await engine.reply(key, Reply.done({"second": 2}))
    await engine.idle()
    assert await fields(engine, iid) == {"first": 1}
    assert len(await events(engine, iid, "done")) == 1


async def test_reply_with_a_malformed_or_unknown_key_is_refused(engines) -> None:
    engine = await engines({"p": "steps: [{participant: hold}]"})
    iid = await engine.launch("p")
    await engine.idle()
    for key in ("nonsense", f"{iid}:0", f"{iid}:0:999", f"{iid + 7}:0:1", f"{iid}:5:1"):
        with pytest.raises(NoSuchWorkitem):
            await engine.reply(key, Reply.done())
    assert await status(engine, iid) == "waiting"


async def test_reply_with_a_stale_key_after_cancel_is_refused(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"p": "steps: [{participant: pend}]"}, [pend])
    iid = await engine.launch("p")
    await engine.idle()
    key = pend.consumed()[0].key
    await engine.cancel(iid)
    await engine.idle()
    with pytest.raises(NoSuchWorkitem):
        await engine.reply(key, Reply.done({"late": True}))
    assert await status(engine, iid) == "cancelled"
    assert "late" not in await fields(engine, iid)


async def test_cancel_tells_the_pending_participant_and_marks_cancelled(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"c": """
        steps:
          - {id: ask, participant: pend, timeout: 1h}
          - {id: after, participant: echo}
        """}, [pend])
    iid = await engine.launch("c")
    await engine.idle()
    (ask,) = pend.consumed()
    await engine.cancel(iid, actor="carol")
    await engine.idle()
    assert pend.cancelled() == [ask]
    summary = await engine.summary(iid)
    assert (summary.status, summary.waiting_on) == ("cancelled", "")
    assert await engine.pending() == []
    assert await timers(engine, iid) == []
    (cancelled,) = await events(engine, iid, "cancelled")
    assert (cancelled.path, cancelled.actor) == ("", "carol")
    assert [s.id for s in await engine.instances()] == []


async def test_cancel_reaches_a_pending_participant_of_a_subprocess(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"parent": "steps: [{subprocess: child}]",
                            "child": "steps: [{id: ask, participant: pend}]"}, [pend])
    iid = await engine.launch("parent")
    await engine.idle()
    await engine.cancel(iid, actor="carol")
    await engine.idle()
    assert pend.cancelled() == pend.consumed()
    assert await status(engine, iid) == "cancelled"
    assert await status(engine, iid + 1) == "cancelled"


async def test_cancelling_a_finished_instance_is_not_allowed(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"c": "steps: [{participant: pend}]", "quick": "steps: [{set: {a: 1}}]"}, [pend])
    iid = await engine.launch("c")
    await engine.idle()
    await engine.cancel(iid)
    await engine.idle()
    with pytest.raises(NotAllowedNow):
        await engine.cancel(iid)
    done = await engine.launch("quick")
    await engine.idle()
    with pytest.raises(NotAllowedNow):
        await engine.cancel(done)
    assert await status(engine, done) == "completed"
    assert len(pend.cancelled()) == 1


async def test_history_records_who_launched_replied_cancelled_and_retried(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"h": """
        steps:
          - {id: approve, participant: pend}
          - {id: flaky, participant: fail}
          - {id: ask, participant: pend}
        """}, [pend])
    iid = await engine.launch("h", actor="alice")
    await engine.idle()
    await engine.reply(pend.consumed()[0].key, Reply.done(), actor="bob")
    await engine.idle()
    await engine.retry(iid, actor="dave")
    await engine.idle()
    await engine.cancel(iid, actor="carol")
    await engine.idle()
    by_actor = [(e.step, e.event, e.actor) for e in await engine.history(iid) if e.actor]
    assert by_actor == [("", "launched", "alice"), ("approve", "done", "bob"),
                        ("flaky", "retried", "dave"), ("", "cancelled", "carol")]


# -- dispatch keys -------------------------------------------------------------------

async def test_dispatch_key_is_the_same_wherever_the_step_run_is_seen(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"k": "steps: [{id: ask, participant: pend}]"}, [pend])
    iid = await engine.launch("k")
    await engine.idle()
    (ask,) = pend.consumed()
    assert ask.key.startswith(f"{iid}:0:")
    assert [w.key for w in await engine.pending()] == [ask.key]
    assert (await engine.describe(iid)).steps == [f"ask (pend): pending [key {ask.key}]"]


async def test_dispatch_key_is_stable_across_a_restart(engines) -> None:
    busy = Recorder("busy", mode="block")
    engine = await engines({"k": "steps: [{id: work, participant: busy}]"}, [busy])
    iid = await engine.launch("k")
    for _ in range(10):
        await asyncio.sleep(0)
    (first,) = busy.consumed()
    await close_engine(engine)                # goes down while the participant works
    again = Recorder("busy")
    engine = await engines({"k": "steps: [{id: work, participant: busy}]"}, [again])
    try:
        await engine.idle()
        (second,) = again.consumed()
        assert second.key == first.key
        assert await status(engine, iid) == "completed"
    finally:
        await close_engine(engine)


async def test_dispatch_keys_differ_across_retries(engines) -> None:
    rec = Recorder(mode="fail")
    engine = await engines({"k": """
        steps:
          - {id: flaky, participant: rec, on_error: {retry: 1, backoff: 1s}}
        """}, [rec])
    iid = await engine.launch("k")
    await engine.idle()
    await advance(engine, 1)                  # automatic retry
    assert await status(engine, iid) == "failed"
    await engine.retry(iid)                   # manual retry
    await engine.idle()
    keys = [w.key for w in rec.consumed()]
    assert len(keys) == 3 and len(set(keys)) == 3
    assert all(k.startswith(f"{iid}:0:") for k in keys)


# -- write, then announce; group commit ----------------------------------------------

async def test_rows_are_committed_before_the_participant_is_called(engines, tmp_path: Path) -> None:
    probe = DbProbe(tmp_path / DB_NAME)
    engine = await engines({"w": """
        steps:
          - {set: {a: 1}}
          - {id: look, participant: probe}
          - {id: again, participant: probe}
        """}, [probe])
    iid = await engine.launch("w")
    await engine.idle()
    assert await status(engine, iid) == "completed"
    assert len(probe.seen) == 2
    for seen, path in zip(probe.seen, ("1", "2")):
        assert seen["workitem"] == ("dispatched", "probe", path)
        assert seen["instance"] is not None
        inst_status, runs = seen["instance"]
        assert inst_status == "running"
        assert json.loads(runs)[path]["k"] == seen["key"]


async def test_concurrent_launches_share_commits(engines) -> None:
    engine = await engines({"g": "fields: {i: 0}\nsteps: [{set: {a: 1}}, {participant: echo}]"})
    store = engine.store
    commits, transitions = store.commits, store.transitions
    ids = await asyncio.gather(*(engine.launch("g", {"i": i}) for i in range(200)))
    await engine.idle()
    assert len(set(ids)) == 200
    made = store.transitions - transitions
    assert made == 400                        # 200 launches + 200 echo replies
    assert store.commits - commits <= made // 20   # typically 2
    statuses = {s.status for s in await engine.instances(include_finished=True, limit=500)}
    assert statuses == {"completed"}


async def test_published_events_are_already_in_the_database(engines, tmp_path: Path) -> None:
    engine = await engines({"b": "steps: [{id: say, participant: echo}, {id: nap, wait: 1s}]"})
    seen: list[tuple[str, int]] = []

    async def subscriber(event) -> None:  # type: ignore[no-untyped-def]
        conn = sqlite3.connect(tmp_path / DB_NAME)
        try:
            count = conn.execute("SELECT COUNT(*) FROM history WHERE instance_id = ? AND path = ? AND event = ?",
                                 (event.instance_id, event.path, event.event)).fetchone()[0]
        finally:
            conn.close()
        seen.append((event.event, count))

    engine.bus.subscribe(subscriber)
    iid = await engine.launch("b")
    await engine.idle()
    await advance(engine, 1)
    assert await status(engine, iid) == "completed"
    assert seen == [("launched", 1), ("dispatched", 1), ("done", 1), ("wait over", 1), ("completed", 1)]


async def test_participant_is_told_of_a_cancel_only_after_it_is_committed(engines, tmp_path: Path) -> None:
    db = tmp_path / DB_NAME
    committed: list[tuple] = []

    class Watcher(Recorder):
        async def cancel(self, workitem) -> None:  # type: ignore[no-untyped-def]
            conn = sqlite3.connect(db)
            try:
                committed.append((
                    conn.execute("SELECT status FROM instances WHERE id = ?", (workitem.instance_id,)).fetchone(),
                    conn.execute("SELECT state FROM workitems WHERE key = ?", (workitem.key,)).fetchone()))
            finally:
                conn.close()
            await super().cancel(workitem)

    definitions = {"c": "steps: [{id: ask, participant: pend}]"}
    engine = await engines(definitions, [Recorder("pend", mode="pending")])
    iid = await engine.launch("c")
    await engine.idle()
    await close_engine(engine)
    watcher = Watcher("pend", mode="pending")
    engine = await engines(definitions, [watcher])   # the instance is loaded lazily
    try:
        await engine.idle()
        assert watcher.calls == []                                    # pending is not asked again
        await engine.cancel(iid, actor="carol")
        await engine.idle()
        assert [(w.step, w.fields) for w in watcher.cancelled()] == [("ask", {})]
        assert committed == [(("cancelled",), ("cancelling",))]
        assert await engine.pending() == []
    finally:
        await close_engine(engine)


async def test_pending_step_survives_a_restart_and_is_answered_after_it(engines) -> None:
    definitions = {"p": "steps: [{id: ask, participant: pend, timeout: 1h}, {set: {after: true}}]"}
    engine = await engines(definitions, [Recorder("pend", mode="pending")])
    iid = await engine.launch("p")
    await engine.idle()
    (key,) = [w.key for w in await engine.pending()]
    await close_engine(engine)
    again = Recorder("pend", mode="pending")
    engine = await engines(definitions, [again])
    try:
        await engine.idle()
        assert again.calls == []
        assert [w.key for w in await engine.pending()] == [key]
        await engine.reply(key, Reply.done({"ok": 1}), actor="bob")
        await engine.idle()
        assert await status(engine, iid) == "completed"
        assert await fields(engine, iid) == {"ok": 1, "after": True}
        assert await timers(engine, iid) == []
    finally:
        await close_engine(engine)


async def test_two_concurrent_replies_to_one_key_only_one_wins(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"p": "steps: [{id: ask, participant: pend}]"}, [pend])
    iid = await engine.launch("p")
    await engine.idle()
    key = pend.consumed()[0].key
    results = await asyncio.gather(engine.reply(key, Reply.done({"a": 1}), actor="x"),
                                   engine.reply(key, Reply.done({"b": 1}), actor="y"),
                                   return_exceptions=True)
    await engine.idle()
    assert results[0] is None and isinstance(results[1], NoSuchWorkitem)
    assert await fields(engine, iid) == {"a": 1}
    assert [e.actor for e in await events(engine, iid, "done")] == ["x"]


async def test_participant_that_raises_fails_its_step(engines) -> None:
    class Broken(Recorder):
        async def consume(self, workitem):  # type: ignore[no-untyped-def]
            raise ValueError("kaput")

    engine = await engines({"p": "steps: [{id: work, participant: broken}]"}, [Broken("broken")])
    iid = await engine.launch("p")
    await engine.idle()
    summary = await engine.summary(iid)
    assert (summary.status, summary.error) == ("failed", "work: ValueError: kaput")


async def test_set_with_an_undefined_field_fails_the_step(engines) -> None:
    engine = await engines({"p": "steps: [{id: calc, set: {n: '{{ nope + 1 }}'}}]"})
    iid = await engine.launch("p")
    await engine.idle()
    summary = await engine.summary(iid)
    assert (summary.status, summary.error) == ("failed", "calc: template '{{ nope + 1 }}': 'nope' is undefined")
    assert await fields(engine, iid) == {}


async def test_nested_concurrences_merge_through_both_levels(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"n": """
        fields: {a: 0, b: 0, c: 0}
        steps:
          - concurrence:
              - concurrence:
                  - {set: {a: 1}}
                  - {participant: pend}
              - {set: {c: 3}}
        """}, [pend])
    iid = await engine.launch("n")
    await engine.idle()
    (inner,) = pend.consumed()
    assert inner.fields == {"a": 0, "b": 0, "c": 0}
    await engine.reply(inner.key, Reply.done({"b": 2}))
    await engine.idle()
    assert await fields(engine, iid) == {"a": 1, "b": 2, "c": 3}


async def test_failed_branch_retried_then_merged(engines) -> None:
    rec = Recorder(mode="fail")
    engine = await engines({"p": """
        fields: {x: 0, y: 0}
        steps:
          - concurrence:
              - {id: flaky, participant: rec, params: {fields: {x: 1}}}
              - {set: {y: 2}}
        """}, [rec])
    iid = await engine.launch("p")
    await engine.idle()
    assert (await engine.summary(iid)).waiting_on == "flaky failed: boom"
    rec.mode = "done"
    await engine.retry(iid)
    await engine.idle()
    assert await status(engine, iid) == "completed"
    assert await fields(engine, iid) == {"x": 1, "y": 2}


async def test_process_level_timeout_and_on_error(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({
        "slow": "timeout: 1m\non_timeout: skip\nsteps: [{id: ask, participant: pend}, {set: {never: 1}}]",
        "bad": "on_error: skip\nsteps: [{error: nope}, {set: {never: 1}}]"}, [pend])
    slow = await engine.launch("slow")
    bad = await engine.launch("bad")
    await engine.idle()
    assert await status(engine, bad) == "completed"
    assert await fields(engine, bad) == {}
    await advance(engine, 60)
    assert await status(engine, slow) == "completed"
    assert await fields(engine, slow) == {}
    assert pend.cancelled() == pend.consumed()


async def test_on_error_retry_then_subprocess_handler(engines) -> None:
    engine = await engines({
        "p": "steps: [{id: s, participant: fail, on_error: {retry: 1, backoff: 1s, then: {subprocess: h}}}]",
        "h": "steps: [{set: {m: '{{ error.message }}', at: '{{ error.step }}', who: '{{ error.instance }}'}}]"})
    iid = await engine.launch("p")
    await engine.idle()
    await advance(engine, 1)
    assert await status(engine, iid) == "completed"
    got = await fields(engine, iid)
    assert (got["m"], got["at"], got["who"]) == ("failed on purpose", "s", iid)


async def test_retry_after_a_timeout_rearms_the_step_timers(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"t": "steps: [{id: ask, participant: pend, timers: '2s: remind, 5s: timeout'}]"},
                           [pend])
    iid = await engine.launch("t")
    await engine.idle()
    await advance(engine, 2)
    await advance(engine, 3)
    assert await status(engine, iid) == "failed"
    await engine.retry(iid)
    await engine.idle()
    assert await timers(engine, iid) == [("remind", "ask", START + 7, False), ("timeout", "ask", START + 10, False)]
    await advance(engine, 2)
    first, second = pend.consumed()
    assert pend.timers() == [(first.key, "remind"), (second.key, "remind")]


async def test_cancel_during_retry_backoff_drops_the_retry_timer(engines) -> None:
    engine = await engines({"p": "steps: [{id: s, participant: fail, on_error: {retry: 1, backoff: 1m}}]"})
    iid = await engine.launch("p")
    await engine.idle()
    assert await timers(engine, iid) == [("retry", "s", START + 60, False)]
    await engine.cancel(iid)
    await engine.idle()
    assert await timers(engine, iid) == []
    await advance(engine, 60)
    assert await status(engine, iid) == "cancelled"
    assert len(await events(engine, iid, "dispatched")) == 1


async def test_launching_an_unknown_process_is_refused(engines) -> None:
    from engine.errors import UnknownProcess
    engine = await engines({"p": "steps: [{set: {a: 1}}]"})
    with pytest.raises(UnknownProcess):
        await engine.launch("nope")
    assert await engine.instances(include_finished=True) == []


# -- regressions: bugs found by these tests, since fixed --

async def test_parent_error_is_cleared_when_its_failed_child_is_retried(engines) -> None:
    rec = Recorder(mode="fail")
    engine = await engines({"parent": "steps: [{id: call, subprocess: child}, {id: after, participant: hold}]",
                            "child": "steps: [{id: work, participant: rec}]"}, [rec])
    iid = await engine.launch("parent")
    await engine.idle()
    assert (await engine.summary(iid)).error == f"call: subprocess #{iid + 1} failed at work: boom"
    rec.mode = "done"
    await engine.retry(iid + 1)
    await engine.idle()
    parent = await engine.summary(iid)
    assert (parent.status, parent.waiting_on) == ("waiting", "after pending")   # it went on: right
    assert parent.error == ""                                                   # stale error: wrong


async def test_error_of_a_dropped_failed_branch_does_not_stay_on_the_instance(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"p": """
        steps:
          - concurrence:
              - {id: broken, participant: fail}
              - {id: ask, participant: pend}
            wait_for: any
        """}, [pend])
    iid = await engine.launch("p")
    await engine.idle()
    assert await status(engine, iid) == "failed"
    await engine.reply(pend.consumed()[0].key, Reply.done())
    await engine.idle()
    summary = await engine.summary(iid)
    assert summary.status == "completed"
    assert summary.error == ""


async def test_reminder_is_never_delivered_after_the_step_was_cancelled(engines) -> None:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"t": "steps: [{id: ask, participant: pend, timers: '2s: remind, 5s: timeout'}]"},
                           [pend])
    iid = await engine.launch("t")
    await engine.idle()
    await advance(engine, 10)         # both overdue at once, as after the bot was down for a while
    assert await status(engine, iid) == "failed"
    assert pend.kinds()[-1] == "cancel", pend.kinds()


async def test_status_is_running_while_a_participant_works(engines) -> None:
    busy = Recorder("busy", mode="block")
    engine = await engines({"p": "steps: [{id: work, participant: busy}]"}, [busy])
    iid = await engine.launch("p")
    summary = await engine.summary(iid)
    assert (summary.status, summary.waiting_on) == ("running", "work running")
    busy.release.set()
    await engine.idle()
    assert await status(engine, iid) == "completed"


async def test_retry_policy_exhausted_hands_the_error_to_an_enclosing_on_error(engines) -> None:
    rec = Recorder()
    engine = await engines({"p": """
        steps:
          - id: block
            on_error: skip
            sequence:
              - {id: flaky, participant: fail, on_error: {retry: 1, backoff: 1s}}
              - {id: skipped-work, participant: rec}
          - {id: after, participant: rec}
        """}, [rec])
    iid = await engine.launch("p")
    await engine.idle()
    await advance(engine, 1)
    assert await status(engine, iid) == "completed"
    assert [w.step for w in rec.consumed()] == ["after"]
    assert [(e.step, e.detail) for e in await events(engine, iid, "skipped")] == [("block", "on error")]


async def test_timers_due_at_one_instant_fire_in_one_commit(engines) -> None:
    engine = await engines({"nap": "steps: [{wait: 10s}]"})
    ids = [await engine.launch("nap") for _ in range(50)]
    await engine.idle()
    store = engine.store
    commits, transitions = store.commits, store.transitions
    assert isinstance(engine.clock, ManualClock)
    engine.clock.advance(10)
    assert await engine.timers.fire_due() == 50
    await engine.idle()
    assert (store.commits - commits, store.transitions - transitions) == (1, 1)
    assert {await status(engine, i) for i in ids} == {"completed"}


# -- decisions taken on the review of these tests --

async def test_a_manual_retry_gives_on_error_retries_a_fresh_budget(engines) -> None:
    rec = Recorder("rec", mode="fail")
    engine = await engines({"p": """
        steps:
          - id: work
            participant: rec
            on_error: {retry: 1, backoff: 10s}
        """}, [rec])
    iid = await engine.launch("p")
    await engine.idle()
    await advance(engine, 10)
    assert await status(engine, iid) == "failed"
    assert len(rec.consumed()) == 2
    await engine.retry(iid)                      # still failing: the automatic retry applies again
    await engine.idle()
    assert await status(engine, iid) == "waiting"
    assert [e.event for e in await engine.history(iid)][-1] == "retry scheduled"
    rec.mode = "done"
    await advance(engine, 10)
    assert await status(engine, iid) == "completed"
    assert len(rec.consumed()) == 4


async def test_a_reply_must_be_done_or_failed(engines) -> None:
    rec = Recorder("rec", mode="pending")
    engine = await engines({"p": "steps:\n  - participant: rec\n"}, [rec])
    iid = await engine.launch("p")
    await engine.idle()
    [item] = await engine.pending()
    with pytest.raises(NotAllowedNow):
        await engine.reply(item.key, Reply.pending())
    assert await status(engine, iid) == "waiting"
    assert [w.key for w in await engine.pending()] == [item.key]


async def test_a_failed_error_handler_is_cancelled_when_the_step_is_retried(engines) -> None:
    rec = Recorder("rec", mode="fail")
    engine = await engines({
        "p": """
            steps:
              - id: work
                participant: rec
                on_error: {subprocess: handler}
            """,
        "handler": "steps:\n  - error: 'handler broke too'\n"}, [rec])
    iid = await engine.launch("p")
    await engine.idle()
    assert await status(engine, iid) == "failed"
    [handler] = [r for r in await engine.instances() if r.process == "handler"]
    assert handler.status == "failed"
    rec.mode = "done"
    await engine.retry(iid)
    await engine.idle()
    assert await status(engine, iid) == "completed"
    assert await status(engine, handler.id) == "cancelled"
    assert await engine.instances() == []
