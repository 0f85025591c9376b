"""Transitions are atomic in memory as they are in SQLite: a transition whose
commit fails leaves nothing behind, not even through a later transition of
the same instance, and no transition sees another's half-done changes."""
from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from engine.engine import Engine
from engine.instances import Transition
from engine.participants import Reply, Workitem
from engine.runs import RunState
from engine.store import Op, StoreError
from engine.timers import ManualClock
from tests.engine_fixtures import DB_NAME, EngineFactory, Recorder, close_engine, trace

TWO_ASKS = """
steps:
  - concurrence:
      - {id: left, participant: pend}
      - {id: right, participant: pend}
"""
REFUSED: Op = ("INSERT INTO no_such_table VALUES (1)", (), False)


def refuse_the_answer_to(engine: Engine, step: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The transition applying the answer to ``step`` carries a statement
    SQLite refuses: its commit fails, whatever shares it."""
    real = engine._ops

    def ops(tx: Transition) -> list[Op]:
        out = real(tx)
        if any(e.step == step and e.event == "done" for e in tx.history):
            out.append(REFUSED)
        return out
    monkeypatch.setattr(engine, "_ops", ops)


def stored(tmp_path: Path, iid: int) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Status, fields and runs of an instance as SQLite has them."""
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        status, fields, runs = conn.execute("SELECT status, fields, runs FROM instances WHERE id = ?",
                                            (iid,)).fetchone()
    return status, json.loads(fields), json.loads(runs)


async def asked(engines: EngineFactory) -> tuple[Engine, int, Workitem, Workitem]:
    pend = Recorder("pend", mode="pending")
    engine = await engines({"two": TWO_ASKS}, [pend])
    iid = await engine.launch("two")
    await engine.idle()
    left, right = sorted(pend.consumed(), key=lambda w: w.step)
    return engine, iid, left, right


def assert_only_right_answered(engine: Engine, tmp_path: Path, iid: int, left: Workitem) -> None:
    assert stored(tmp_path, iid) == ("waiting", {}, {
        "": {"s": "active", "g": 1, "i": 0},
        "0": {"s": "active", "g": 2, "bf": {"0": {}, "1": {"r": 2}}, "done": [1]},   # right is done
        "0.0": {"s": "active", "g": 3, "i": 0},
        "0.0.0": {"s": "pending", "g": 4, "k": left.key},          # left is still open: its answer was not written
    })
    in_memory = engine._instances[iid]                              # and the engine holds the same
    assert in_memory.runs["0"].branch_fields == {0: {}, 1: {"r": 2}}
    assert in_memory.runs["0.0.0"].state is RunState.PENDING and "0.1" not in in_memory.runs


async def test_a_transition_sharing_a_failed_commit_does_not_write_the_failed_ones_changes(
        engines: EngineFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine, iid, left, right = await asked(engines)
    refuse_the_answer_to(engine, "left", monkeypatch)
    # both answers reach the instance at once: one commit, and the right answer is applied
    # on top of the left one in memory
    results = await asyncio.gather(engine.reply(left.key, Reply.done({"l": 1})),
                                   engine.reply(right.key, Reply.done({"r": 2})), return_exceptions=True)
    assert isinstance(results[0], StoreError) and results[1] is None
    assert_only_right_answered(engine, tmp_path, iid, left)
    assert ("left", "done") not in await trace(engine, iid)
    monkeypatch.undo()
    await engine.reply(left.key, Reply.done({"l": 1}))             # the left answer, again, goes through
    assert stored(tmp_path, iid) == ("completed", {"l": 1, "r": 2}, {})


async def test_a_transition_after_a_commit_in_flight_waits_and_starts_from_what_was_written(
        engines: EngineFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine, iid, left, right = await asyncio.create_task(asked(engines))
    refuse_the_answer_to(engine, "left", monkeypatch)
    disk = asyncio.Event()                   # a slow disk: the left answer's commit is in flight until set
    real_commit = engine.store.commit

    def slow_commit(*parts: list[Op], shared: list[Op] = []) -> asyncio.Future[None]:
        inner = real_commit(*parts, shared=shared)
        outer: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def later() -> None:
            await disk.wait()
            try:
                await inner
                outer.set_result(None)
            except StoreError as exc:
                outer.set_exception(exc)
        asyncio.ensure_future(later())
        return outer
    monkeypatch.setattr(engine.store, "commit", slow_commit)

    first = asyncio.ensure_future(engine.reply(left.key, Reply.done({"l": 1})))
    for _ in range(5):
        await asyncio.sleep(0)
    assert iid in engine._unsettled                                # the left answer is being written
    second = asyncio.ensure_future(engine.reply(right.key, Reply.done({"r": 2})))
    await asyncio.sleep(0.05)
    assert not second.done()                                       # it waits: the left answer may yet fail
    disk.set()
    with pytest.raises(StoreError):
        await first
    await second
    assert_only_right_answered(engine, tmp_path, iid, left)


OUTER = "steps: [{id: call, subprocess: inner}]"
INNER = """
timeout: 1h
steps:
  - {id: ask, participant: pend}
  - {id: more, subprocess: leaf}
"""
LEAF = "steps: [{set: {leaf: true}}]"


async def test_no_transition_sees_another_half_done_across_an_await(
        engines: EngineFactory, tmp_path: Path) -> None:
    definitions = {"outer": OUTER, "inner": INNER, "leaf": LEAF}
    engine = await engines(definitions, [Recorder("pend", mode="pending")])
    outer = await engine.launch("outer")
    await engine.idle()
    inner = outer + 1
    [ask] = await engine.pending()
    await close_engine(engine)
    pend = Recorder("pend", mode="pending")
    engine = await engines(definitions, [pend])                    # nothing in memory: loaded when used

    # the answer to ``ask`` starts ``more``, whose subprocess needs ``outer`` read from SQLite
    # (how deep would it be?); that read hangs, then fails once
    real_load, disk, reading = engine.store.load_instances, asyncio.Event(), asyncio.Event()

    async def load(ids: Any) -> Any:
        ids = list(ids)
        if outer in ids and not reading.is_set():
            reading.set()
            await disk.wait()
            raise sqlite3.OperationalError("disk I/O error")
        return await real_load(ids)
    engine.store.load_instances = load  # type: ignore[method-assign]  # a disk that fails on one read

    answer = asyncio.ensure_future(engine.reply(ask.key, Reply.done({"a": 1})))
    await reading.wait()                  # half-way: ask answered and ``more`` started, in memory only
    assert isinstance(engine.clock, ManualClock)
    engine.clock.advance(3600)
    firing = asyncio.ensure_future(engine.timers.fire_due())       # inner's timeout
    await asyncio.sleep(0.05)
    assert not firing.done()              # waits for the half-done transition to finish
    assert stored(tmp_path, inner)[0] == "waiting"
    disk.set()
    with pytest.raises(sqlite3.OperationalError):
        await answer
    await firing
    await engine.idle()
    # the timeout met the instance as it was written: ask still open, so cancelled with it
    status, fields, runs = stored(tmp_path, inner)
    assert (status, fields, list(runs)) == ("failed", {}, [""])
    assert [w.key for w in pend.cancelled()] == [ask.key]
    assert ("ask", "done") not in await trace(engine, inner)
    assert await engine.pending() == []
