"""The repository configuration checked at file:line, hostile names refused
at config and at launch (nothing runs), and freeze windows: a publish waits
on the engine's clock, and only the override role forces it."""
from __future__ import annotations

import asyncio

import datetime
import os
from pathlib import Path
from typing import Any

import pytest

from engine.engine import Engine
from tests.engine_fixtures import EngineFactory, advance, status
from tests.servers.publish import config_for, config_from, family_of, repo_engine, settle, write_tree

HOSTILE = ["../x", "-e sh", "a;b", "a\nb"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_repository_names_refused_at_config(name: str) -> None:
    import json

    _, problems = config_from(json.dumps({"repositories": {
        name: {"project": "P", "source": "/srv/src", "destination": "/srv/www"}}}))
    assert len(problems) == 1 and problems[0].startswith("bot.yaml:1: ") and "repository name" in problems[0]


def test_config_problems_name_their_line() -> None:
    _, problems = config_from("""\
        repositories:
          devel:
            project: Project:Devel
            source: relative/path
            destination: ssh://127.0.0.1/srv/x
            retention: 0
            freeze:
              - {start: "61 * * * *", duration: 1h, timezone: Mars/Olympus}
          stable:
            project: Project
            source: /srv/src
            destination: "rsync://mirror.example.org/repo/../etc"
            ssh_key: /k
            sign: {key: "-e sh"}
        """)
    text = "\n".join(problems)
    assert "bot.yaml:4: participants repo_publish repository devel: source: expected an absolute path" in text
    assert "bot.yaml:5: " in text and "names its user" in text
    assert "bot.yaml:6: " in text and "retention" in text
    assert "bot.yaml:8: " in text and "unknown time zone 'Mars/Olympus'" in text
    assert "bot.yaml:12: " in text and "bad path" in text
    assert "bot.yaml:14: " in text and "key: expected a key fingerprint" in text
    _, problems = config_from("""\
        repositories:
          devel: {project: P, source: /srv/src, destination: "rsync://m.example.org/repo", ssh_key: /k}
        """)
    assert problems == ["bot.yaml:2: participants repo_publish repository devel: ssh_key: only for an ssh:// "
                        "destination"]


def local(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {"project": "Project:Devel", "source": str(tmp_path / "src"), "destination": str(tmp_path / "www"),
            **extra}


@pytest.mark.parametrize("name", HOSTILE)
async def test_hostile_names_refused_at_launch(engines: EngineFactory, tmp_path: Path, name: str) -> None:
    write_tree(tmp_path / "src", "one")
    engine = await repo_engine(engines, config_for({"devel": local(tmp_path)}))
    iid = await engine.launch("publish", {"repo": name})
    await settle(engine)
    summary = await engine.summary(iid)
    assert summary.status == "failed" and "lock: not run: unknown repository" in summary.error
    assert "\n" not in summary.error
    assert not (tmp_path / "www").exists() and not (tmp_path / "x").exists()
    publisher = engine.participants.get("repo_publish")
    with pytest.raises(ValueError, match="unknown repository"):
        publisher.publish_request(name)          # type: ignore[union-attr]
    assert publisher.publish_request("devel", True) == (   # type: ignore[union-attr]
        "repo-publish", {"repo": "devel", "force": True, "project": "Project:Devel"})


# Friday 2027-01-01 00:00 UTC is 1798761600; the manual clock starts there
START = datetime.datetime(2027, 1, 1, 0, 0, tzinfo=datetime.timezone.utc).timestamp()
FREEZE = [{"name": "new-year", "start": "0 1 1 1 *", "duration": "2h", "timezone": "Europe/Berlin"}]


async def frozen_engine(engines: EngineFactory, tmp_path: Path) -> Engine:
    from engine.timers import ManualClock

    write_tree(tmp_path / "src", "one")
    # 01:00 Berlin on 1 January is 00:00 UTC: the freeze runs from START to START + 2h
    config = config_for({"devel": local(tmp_path, freeze=FREEZE)}, freeze_recheck="10ms")
    return await repo_engine(engines, config, clock=ManualClock(START + 60))


async def test_a_publish_waits_for_the_freeze_to_end(engines: EngineFactory, tmp_path: Path) -> None:
    engine = await frozen_engine(engines, tmp_path)
    iid = await engine.launch("publish", {"repo": "devel"}, actor="alice via console:console")
    await settle(engine)
    assert await status(engine, iid) == "waiting"
    [st] = await family_of(engine).status()
    assert st.freeze == "new-year" and st.frozen_until == START + 7200 and st.holder is None
    lock = engine.participants.get("repo_lock")
    [key] = list(family_of(engine).waiting)
    assert "frozen (new-year) until 2027-01-01 02:00:00Z" in lock.progress(key)   # type: ignore[union-attr]
    await advance(engine, 3600)
    await settle(engine)
    assert await status(engine, iid) == "waiting" and not (tmp_path / "www").exists()
    await advance(engine, 3600)
    for _ in range(200):                   # the wait looks at the clock every freeze_recheck (10ms)
        if await status(engine, iid) == "completed":
            break
        await asyncio.sleep(0.02)
        await settle(engine)
    assert await status(engine, iid) == "completed"
    assert os.path.islink(tmp_path / "www" / "current")


async def test_only_the_override_role_forces_a_freeze(engines: EngineFactory, tmp_path: Path) -> None:
    engine = await frozen_engine(engines, tmp_path)
    refused = await engine.launch("publish", {"repo": "devel", "force": "true"}, actor="alice via console:console")
    scheduled = await engine.launch("publish", {"repo": "devel", "force": "true"}, actor="schedule nightly")
    await settle(engine)
    for iid, who in ((refused, "alice via console:console"), (scheduled, "schedule nightly")):
        assert (await engine.summary(iid)).error == (f"lock: force refused: {who} does not hold the "
                                                     "publishers-override role on Project:Devel")
    forced = await engine.launch("publish", {"repo": "devel", "force": "true"}, actor="olga via irc:libera")
    await settle(engine)
    assert await status(engine, forced) == "completed", (await engine.summary(forced)).error
    assert not (tmp_path / "www" / "current").exists() or os.path.islink(tmp_path / "www" / "current")


async def test_the_shipped_processes_publish_and_roll_back(engines: EngineFactory, tmp_path: Path) -> None:
    from bot.access import Directory
    from engine.participant_runtime import ParticipantEnv
    from engine.participants import ParticipantRegistry
    from participants import discover
    from tests.servers.publish import USERS

    root = Path(__file__).resolve().parent.parent / "conf" / "processes"
    definitions = {name: (root / f"{name}.yaml").read_text()
                   for name in ("repo-publish", "repo-rollback", "repo-publish-notice")}
    config = config_for({"devel": {**local(tmp_path), "project": "Project"}})
    engine = await engines(definitions, registry=ParticipantRegistry(discover()),
                           participant_env=ParticipantEnv(config={"repo_publish": config}, users=Directory(USERS)))
    for marker in ("one", "two"):
        write_tree(tmp_path / "src", marker)
        iid = await engine.launch("repo-publish", {"repo": "devel"}, actor="alice via console:console")
        await settle(engine)
        assert await status(engine, iid) == "completed", (await engine.summary(iid)).error
    iid = await engine.launch("repo-rollback", {"repo": "devel"}, actor="alice via console:console")
    await settle(engine)
    assert await status(engine, iid) == "completed", (await engine.summary(iid)).error
    from tests.servers.publish import markers, published

    assert markers(published(tmp_path / "www")) == {"one"}
