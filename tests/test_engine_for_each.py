"""for_each: a body of steps run once per item, one after the other or side by
side (concurrent, with wait_for, merge and max_parallel as for concurrence);
each body's changed fields are collected, in item order, in ``collect``
(default ``results``).  Its state lives in the instance's step runs, so it
survives a restart like everything else."""
from __future__ import annotations

import time
from pathlib import Path

from engine.participants import Reply
from tests.botproc import Bot, make_home
from tests.engine_fixtures import EngineFactory, Recorder, close_engine, events, fields, status, trace


async def test_a_sequential_for_each_runs_the_body_once_per_item_in_order(engines: EngineFactory) -> None:
    rec = Recorder()
    engine = await engines({"p": """
        fields: {arches: [x86_64, aarch64, ppc64le], count: 0}
        steps:
          - id: build-all
            for_each: "{{ arches }}"
            as: arch
            do:
              - id: build
                participant: rec
                params: {fields: {built: "{{ arch }}"}}
              - set: {count: "{{ count + 1 }}", last: "{{ arch }}"}
        """}, [rec])
    iid = await engine.launch("p")
    await engine.idle()
    assert await status(engine, iid) == "completed"
    assert [w.fields["arch"] for w in rec.consumed()] == ["x86_64", "aarch64", "ppc64le"]
    assert [w.fields["count"] for w in rec.consumed()] == [0, 1, 2]      # each body sees the ones before
    got = await fields(engine, iid)
    assert "arch" not in got
    assert (got["count"], got["last"]) == (3, "ppc64le")
    assert got["results"] == [{"built": "x86_64", "count": 1, "last": "x86_64"},
                              {"built": "aarch64", "count": 2, "last": "aarch64"},
                              {"built": "ppc64le", "count": 3, "last": "ppc64le"}]
    steps = [s for s, e in await trace(engine, iid) if e == "dispatched"]
    assert steps == ["build[0]", "build[1]", "build[2]"]
    (started,) = await events(engine, iid, "for_each started")
    assert started.detail == "3 item(s) as arch: 'x86_64', 'aarch64', 'ppc64le'"
    (ended,) = await events(engine, iid, "for_each ended")
    assert ended.detail == "3 of 3 item(s) done"


async def test_a_concurrent_for_each_runs_the_bodies_side_by_side(engines: EngineFactory) -> None:
    rec = Recorder(mode="pending")
    engine = await engines({"p": """
        steps:
          - for_each: [a, b, c]
            as: name
            concurrent: true
            collect: built
            do:
              - {id: build, participant: rec}
          - set: {after: true}
        """}, [rec])
    iid = await engine.launch("p")
    await engine.idle()
    items = rec.consumed()
    assert [w.fields["name"] for w in items] == ["a", "b", "c"]          # all three at once
    for item, answer in zip(reversed(items), ("C", "B", "A")):
        await engine.reply(item.key, Reply.done({"out": answer, f"only_{answer}": 1}))
    await engine.idle()
    got = await fields(engine, iid)
    assert got["built"] == [{"out": "A", "only_A": 1}, {"out": "B", "only_B": 1}, {"out": "C", "only_C": 1}]
    assert got["out"] == "A"                 # union in finishing order: the last to finish wins
    assert (got["only_A"], got["only_B"], got["only_C"], got["after"]) == (1, 1, 1, True)


async def test_max_parallel_limits_how_many_bodies_run_at_once(engines: EngineFactory) -> None:
    rec = Recorder(mode="pending")
    engine = await engines({"p": """
        steps:
          - for_each: "{{ range(5) | list }}"
            concurrent: true
            max_parallel: 2
            do:
              - {participant: rec}
        """}, [rec])
    iid = await engine.launch("p")
    await engine.idle()
    seen: list[int] = []
    while len(seen) < 5:
        open_items = [w for w in rec.consumed() if w.fields["item"] not in seen]
        assert len(open_items) <= 2
        first = open_items[0]
        seen.append(first.fields["item"])
        await engine.reply(first.key, Reply.done({"v": first.fields["item"]}))
        await engine.idle()
    assert await status(engine, iid) == "completed"
    assert (await fields(engine, iid))["results"] == [{"v": i} for i in range(5)]


async def test_wait_for_any_cancels_the_other_bodies(engines: EngineFactory) -> None:
    rec = Recorder(mode="pending")
    engine = await engines({"p": """
        steps:
          - id: mirrors
            for_each: [m1, m2, m3]
            as: mirror
            concurrent: true
            wait_for: any
            merge: first
            do:
              - {id: try, participant: rec}
        """}, [rec])
    iid = await engine.launch("p")
    await engine.idle()
    second = rec.consumed()[1]
    await engine.reply(second.key, Reply.done({"used": "m2"}))
    await engine.idle()
    assert await status(engine, iid) == "completed"
    got = await fields(engine, iid)
    assert got["used"] == "m2"
    assert got["results"] == [None, {"used": "m2"}, None]
    assert sorted(w.fields["mirror"] for w in rec.cancelled()) == ["m1", "m3"]
    cancelled = [(e.step, e.detail) for e in await events(engine, iid, "cancelled")]
    assert cancelled == [("try[0]", "mirrors has what it waits for"), ("try[2]", "mirrors has what it waits for")]


async def test_an_empty_list_runs_nothing_and_collects_an_empty_list(engines: EngineFactory) -> None:
    engine = await engines({"p": "fields: {xs: []}\nsteps:\n  - for_each: '{{ xs }}'\n    do: [{set: {a: 1}}]\n"})
    iid = await engine.launch("p")
    await engine.idle()
    assert await fields(engine, iid) == {"xs": [], "results": []}


async def test_items_that_are_not_a_list_fail_the_step(engines: EngineFactory) -> None:
    engine = await engines({"p": "fields: {xs: 3}\nsteps:\n  - id: each\n    for_each: '{{ xs }}'\n"
                                 "    do: [{set: {a: 1}}]\n"})
    iid = await engine.launch("p")
    await engine.idle()
    summary = await engine.summary(iid)
    assert (summary.status, summary.error) == ("failed", "each: for_each: expected a list, got 3")


async def test_a_failed_body_is_retried_and_the_for_each_goes_on(engines: EngineFactory) -> None:
    rec = Recorder()
    flaky = Recorder("flaky", mode="fail")
    engine = await engines({"p": """
        steps:
          - for_each: [1, 2, 3]
            as: n
            concurrent: true
            do:
              - if: "n == 2"
                then: [{id: fragile, participant: flaky}]
                else: [{id: solid, participant: rec}]
        """}, [rec, flaky])
    iid = await engine.launch("p")
    await engine.idle()
    summary = await engine.summary(iid)
    assert summary.status == "failed" and summary.waiting_on == "fragile[1] failed: boom"
    flaky.mode = "done"
    assert await engine.retry(iid) == ["fragile[1]"]
    await engine.idle()
    assert await status(engine, iid) == "completed"
    assert len(rec.consumed()) == 2 and len(flaky.consumed()) == 2


async def test_for_each_nested_in_a_for_each(engines: EngineFactory) -> None:
    engine = await engines({"p": """
        fields: {total: 0}
        steps:
          - for_each: [a, b]
            as: outer
            do:
              - for_each: [1, 2]
                as: inner
                collect: pairs
                do:
                  - set: {total: "{{ total + 1 }}", seen: "{{ outer }}{{ inner }}"}
        """})
    iid = await engine.launch("p")
    await engine.idle()
    got = await fields(engine, iid)
    assert got["total"] == 4 and got["seen"] == "b2"
    assert got["pairs"] == [{"total": 3, "seen": "b1"}, {"total": 4, "seen": "b2"}]


async def test_a_for_each_survives_a_restart_half_way(engines: EngineFactory) -> None:
    rec = Recorder(mode="pending")
    definition = {"p": """
        steps:
          - for_each: [a, b, c]
            concurrent: true
            do:
              - {id: ask, participant: rec}
        """}
    engine = await engines(definition, [rec])
    iid = await engine.launch("p")
    await engine.idle()
    first = rec.consumed()[0]
    await engine.reply(first.key, Reply.done({"x": 1}))
    await close_engine(engine)

    rec2 = Recorder(mode="pending")
    engine = await engines(definition, [rec2])
    assert (await engine.summary(iid)).waiting_on == "ask[1] pending; ask[2] pending"
    for item in await engine.pending():
        await engine.reply(item.key, Reply.done({"x": item.fields["item"]}))
    await engine.idle()
    assert (await fields(engine, iid))["results"] == [{"x": 1}, {"x": "b"}, {"x": "c"}]
    assert rec2.consumed() == []              # pending work stayed pending: nobody was asked again


FAN = """
name: fan
inputs: {n: int, out: str}
steps:
  - id: each
    for_each: "{{ range(n | int) | list }}"
    as: i
    concurrent: true
    max_parallel: 4
    do:
      - id: work
        participant: record
        params: {file: "{{ out }}", text: "work {{ i }}", seconds: 0.15}
"""


def test_a_concurrent_for_each_killed_half_way_finishes_each_item_once(tmp_path: Path) -> None:
    home = make_home(tmp_path, {"fan": FAN})
    out = tmp_path / "effects.txt"
    bot = Bot(home).start()
    try:
        bot.send(f"launch fan n=12 out={out}")
        bot.expect("as #1")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
            time.sleep(0.02)
        bot.kill()
        assert len(out.read_text().splitlines()) < 12, "killed too late to test anything"
        bot = Bot(home).start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and bot.statuses() != {1: "completed"}:
            time.sleep(0.05)
        assert bot.statuses() == {1: "completed"}
        done = sorted(line.split(" ", 1)[1] for line in out.read_text().splitlines())
        assert done == sorted(f"work {i}" for i in range(12))
    finally:
        bot.stop()


async def test_concurrences_and_guards_inside_bodies_and_a_for_each_inside_a_branch(engines: EngineFactory) -> None:
    engine = await engines({"p": """
        steps:
          - concurrence:
              - - for_each: [x86_64, aarch64, ppc64le]
                  as: arch
                  collect: builds
                  do:
                    - concurrence:
                        - {set: {rpm: "{{ arch }}.rpm"}}
                        - {set: {log: "{{ arch }}.log"}, if: "arch != 'ppc64le'"}
              - set: {other: 1}
        """})
    iid = await engine.launch("p")
    await engine.idle()
    got = await fields(engine, iid)
    assert got["builds"] == [{"rpm": "x86_64.rpm", "log": "x86_64.log"}, {"rpm": "aarch64.rpm", "log": "aarch64.log"},
                             {"rpm": "ppc64le.rpm"}]
    assert (got["other"], got["rpm"], got["log"]) == (1, "ppc64le.rpm", "aarch64.log")
    assert [(e.step, e.detail) for e in await events(engine, iid, "skipped")] == [
        ("set@0.0.0.2.1.0", "if: arch != 'ppc64le'")]     # a one-step body is that step: no sequence
