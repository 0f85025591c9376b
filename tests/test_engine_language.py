"""Instances already running keep their meaning: each stored definition
carries the definition language it was written in, and an instance launched
under language 1 (before inputs, on_exhausted, handled outcomes) keeps
language 1's rules after the upgrade, even when its definition's text is
unchanged.  The database is ``tests/fixtures/language1.sqlite3``, written by
the engine before the language existed (``tests/fixtures/make_language1.py``
at commit d423761: #1 loop pending in its first iteration, #2 handled pending
at its gate, #3 flaky failed)."""
from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from engine.errors import EngineError
from engine.participants import Reply
from tests.engine_fixtures import DB_NAME, EngineFactory, events, fields, status
from tests.fixtures.make_language1 import DEFINITIONS

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "language1.sqlite3"


@pytest.fixture
async def upgraded(engines: EngineFactory, tmp_path: Path):  # type: ignore[no-untyped-def]
    """The old database under today's engine, with today's definitions: the very same texts."""
    shutil.copy(FIXTURE, tmp_path / DB_NAME)
    return await engines(dict(DEFINITIONS))


async def answer(engine, iid: int, values: dict) -> None:  # type: ignore[no-untyped-def]
    [item] = [w for w in await engine.pending() if w.instance_id == iid]
    await engine.reply(item.key, Reply.done(values))
    await engine.idle()


async def test_the_stored_definitions_are_language_1_and_new_ones_language_2(upgraded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    conn = sqlite3.connect(tmp_path / DB_NAME)
    try:
        rows = conn.execute("SELECT name, language FROM definitions ORDER BY first_seen, name").fetchall()
    finally:
        conn.close()
    assert sorted(r for r in rows if r[1] == 1) == [("flaky", 1), ("handled", 1), ("loop", 1), ("notify", 1)]
    assert sorted(r for r in rows if r[1] == 2) == [("flaky", 2), ("handled", 2), ("loop", 2), ("notify", 2)]


async def test_an_old_loop_that_runs_out_still_goes_on(upgraded) -> None:  # type: ignore[no-untyped-def]
    engine = upgraded
    await answer(engine, 1, {})
    await answer(engine, 1, {})
    assert await status(engine, 1) == "completed"
    assert (await fields(engine, 1))["after"] is True
    (ended,) = await events(engine, 1, "repeat ended")
    assert ended.detail == "after 2 iteration(s) (max reached)"
    # the same text launched today is language 2: running out is a failure
    new = await engine.launch("loop")
    await engine.idle()
    await answer(engine, new, {})
    await answer(engine, new, {})
    assert await status(engine, new) == "failed"


async def test_an_old_handler_is_told_what_it_was_told_before(upgraded) -> None:  # type: ignore[no-untyped-def]
    engine = upgraded
    await answer(engine, 2, {})
    assert await status(engine, 2) == "completed"
    assert (await fields(engine, 2))["told"] == "sequence@root"
    new = await engine.launch("handled")
    await engine.idle()
    await answer(engine, new, {})
    assert (await fields(engine, new))["told"] == "publish"
    assert (await engine.summary(new)).outcome == "recovered"


async def test_an_old_instance_takes_any_retry_field(upgraded) -> None:  # type: ignore[no-untyped-def]
    engine = upgraded
    assert await engine.retry(3, fields={"anything": "1"}) == ["deploy"]
    await engine.idle()
    assert (await fields(engine, 3))["anything"] == "1"
    new = await engine.launch("flaky")
    await engine.idle()
    with pytest.raises(EngineError, match="unknown field 'anything'"):
        await engine.retry(new, fields={"anything": "1"})
