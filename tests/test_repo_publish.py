"""Publishing to a local destination with the real rsync: snapshots linked
against the previous one, metadata last, verify, sign (checked with gpgv),
the atomic swap, retention and grace, rollback, and the lock's queue."""
from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from engine.engine import Engine
from tests.engine_fixtures import EngineFactory, advance, fields, status, trace
from tests.servers.publish import (GpgKey, config_for, family_of, markers, published, repo_engine, settle, write_tree)

pytestmark = pytest.mark.usefixtures("rsync_bin")


def local_repo(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {"project": "Project:Devel", "source": str(tmp_path / "src"), "destination": str(tmp_path / "www"),
            **extra}


async def publish(engine: Engine, repo: str = "devel", **values: Any) -> int:
    iid = await engine.launch("publish", {"repo": repo, **values}, actor="alice via console:console")
    await settle(engine)
    return iid


async def test_publish_links_unchanged_files_and_swaps_atomically(engines: EngineFactory, tmp_path: Path) -> None:
    write_tree(tmp_path / "src", "one", packages=30)
    engine = await repo_engine(engines, config_for({"devel": local_repo(tmp_path)}))
    first = await publish(engine)
    assert await status(engine, first) == "completed", (await engine.summary(first)).error
    got = await fields(engine, first)
    assert got["added"] == 32 and got["changed"] == 0 and got["deleted"] == 0
    assert got["published"] == got["snapshot"] and got["verified"] == 2
    www = tmp_path / "www"
    assert os.readlink(www / "current") == f"snapshots/{got['snapshot']}"
    assert markers(published(www)) == {"one"}

    write_tree(tmp_path / "src", "two", packages=30, changed=3)
    (tmp_path / "src" / "Packages" / "p00029.rpm").unlink()
    second = await publish(engine)
    assert await status(engine, second) == "completed", (await engine.summary(second)).error
    got2 = await fields(engine, second)
    # 3 packages and the 2 metadata files changed (the primary under a new name: added, old one gone)
    assert (got2["added"], got2["changed"], got2["deleted"]) == (1, 4, 2)
    assert got2["previous"] == got["snapshot"]
    new, old = www / "snapshots" / got2["snapshot"], www / "snapshots" / got["snapshot"]
    assert os.readlink(www / "current") == f"snapshots/{got2['snapshot']}"
    # unchanged packages cost nothing: the same inode in both snapshots
    assert (new / "Packages" / "p00010.rpm").stat().st_ino == (old / "Packages" / "p00010.rpm").stat().st_ino
    assert (new / "Packages" / "p00001.rpm").stat().st_ino != (old / "Packages" / "p00001.rpm").stat().st_ino
    assert not (new / "Packages" / "p00029.rpm").exists()
    assert (tmp_path / "www" / "snapshots" / got["snapshot"]).is_dir()      # within retention


async def test_metadata_goes_last(engines: EngineFactory, tmp_path: Path) -> None:
    """The first rsync run carries no metadata, the second only metadata."""
    write_tree(tmp_path / "src", "one")
    engine = await repo_engine(engines, config_for({"devel": local_repo(tmp_path)}))
    family = family_of(engine)
    from participants.repo.transfer import Transfer

    transfer = Transfer(family.config.repositories["devel"])
    packages, metadata = transfer.sync_argvs("n", "p")
    assert "--exclude=/repodata" in packages and "--link-dest=../p" in packages
    assert metadata[-4:-2] == ["--include=/repodata/***", "--exclude=*"] and "--checksum" in metadata
    packages, metadata = transfer.sync_argvs("n", None)
    target = tmp_path / "www" / "snapshots" / "n"
    subprocess.run(packages, check=True, capture_output=True)
    assert (target / "Packages").is_dir() and not (target / "repodata").exists()
    before = {p for p in target.rglob("*")}
    subprocess.run(metadata, check=True, capture_output=True)
    assert {p.relative_to(target).parts[0] for p in set(target.rglob("*")) - before} == {"repodata"}


async def test_verify_fails_on_a_bad_checksum_and_nothing_is_published(engines: EngineFactory,
                                                                      tmp_path: Path) -> None:
    write_tree(tmp_path / "src", "one")
    primary = next((tmp_path / "src" / "repodata").glob("*-primary.xml"))
    primary.write_text("marker:one\ntampered\n")
    engine = await repo_engine(engines, config_for({"devel": local_repo(tmp_path)}))
    iid = await publish(engine)
    summary = await engine.summary(iid)
    assert summary.status == "failed" and "does not verify" in summary.error and "sha256" in summary.error
    assert not (tmp_path / "www" / "current").exists()
    assert family_of(engine).locks.holder("devel") is None       # a failed publish never blocks the next


async def test_signature_checks_with_gpgv(engines: EngineFactory, tmp_path: Path, gpg_key: GpgKey) -> None:
    write_tree(tmp_path / "src", "one")
    repo = local_repo(tmp_path, sign={"key": gpg_key.fingerprint, "gnupg_home": str(gpg_key.home)})
    engine = await repo_engine(engines, config_for({"devel": repo}))
    iid = await publish(engine)
    assert await status(engine, iid) == "completed", (await engine.summary(iid)).error
    repodata = published(tmp_path / "www") / "repodata"
    check = subprocess.run(["gpgv", "--status-fd", "1", "--keyring", str(gpg_key.public),
                            str(repodata / "repomd.xml.asc"), str(repodata / "repomd.xml")],
                           capture_output=True, text=True)
    assert check.returncode == 0 and f"VALIDSIG {gpg_key.fingerprint}" in check.stdout
    (repodata / "repomd.xml").write_text((repodata / "repomd.xml").read_text() + "<!-- x -->")
    bad = subprocess.run(["gpgv", "--keyring", str(gpg_key.public), str(repodata / "repomd.xml.asc"),
                          str(repodata / "repomd.xml")], capture_output=True, text=True)
    assert bad.returncode == 1


async def test_retention_and_grace(engines: EngineFactory, tmp_path: Path) -> None:
    engine = await repo_engine(engines, config_for({"devel": local_repo(tmp_path, retention=2, grace="1h")}))
    names = []
    for n in range(4):
        write_tree(tmp_path / "src", f"m{n}")
        iid = await publish(engine)
        assert await status(engine, iid) == "completed", (await engine.summary(iid)).error
        names.append((await fields(engine, iid))["snapshot"])
    snapshots = tmp_path / "www" / "snapshots"
    # beyond retention, but retired less than the grace period ago: all kept
    assert sorted(p.name for p in snapshots.iterdir()) == sorted(names)
    await advance(engine, 3601)
    write_tree(tmp_path / "src", "m4")
    iid = await publish(engine)
    names.append((await fields(engine, iid))["snapshot"])
    assert (await fields(engine, iid))["pruned"] == sorted(names[:3], reverse=False) or \
        sorted((await fields(engine, iid))["pruned"]) == sorted(names[:3])
    assert sorted(p.name for p in snapshots.iterdir()) == sorted(names[3:])


async def test_rollback_swaps_back_and_is_in_the_history(engines: EngineFactory, tmp_path: Path) -> None:
    engine = await repo_engine(engines, config_for({"devel": local_repo(tmp_path)}))
    for marker in ("good", "bad"):
        write_tree(tmp_path / "src", marker)
        await publish(engine)
    assert markers(published(tmp_path / "www")) == {"bad"}
    iid = await engine.launch("rollback", {"repo": "devel"}, actor="alice via console:console")
    await settle(engine)
    assert await status(engine, iid) == "completed", (await engine.summary(iid)).error
    assert markers(published(tmp_path / "www")) == {"good"}
    assert ("rollback", "done") in await trace(engine, iid)
    # nothing earlier than 'good' was published: a second rollback refuses, and changes nothing
    again = await engine.launch("rollback", {"repo": "devel"}, actor="alice via console:console")
    await settle(engine)
    assert "no earlier snapshot" in (await engine.summary(again)).error
    assert markers(published(tmp_path / "www")) == {"good"}
    [st] = await family_of(engine).status()
    assert st.current == (await fields(engine, iid))["rolled_back_to"] and st.holder is None


async def test_concurrent_publishes_queue_in_order(engines: EngineFactory, tmp_path: Path) -> None:
    write_tree(tmp_path / "src", "one", packages=200)
    engine = await repo_engine(engines, config_for({"devel": local_repo(tmp_path)}))
    ids = await asyncio.gather(*(engine.launch("publish", {"repo": "devel"}, actor="alice via console:console")
                                 for _ in range(4)))
    await asyncio.sleep(0.05)
    [st] = await family_of(engine).status()
    assert st.holder == ids[0] and list(st.queue) == list(ids[1:])
    await settle(engine)
    for iid in ids:
        assert await status(engine, iid) == "completed", (await engine.summary(iid)).error
    # one at a time, in launch order: each publish started after the one before was published
    history = [e for iid in ids for e in await engine.history(iid)]
    published_at = {e.instance_id: e.at for e in history if e.step == "publish" and e.event == "done"}
    locked_at = {e.instance_id: e.at for e in history if e.step == "lock" and e.event == "done"}
    for before, after in zip(ids, ids[1:]):
        assert locked_at[after] >= published_at[before]


async def test_refuses_with_the_holder_when_asked_not_to_wait(engines: EngineFactory, tmp_path: Path) -> None:
    nowait = PUBLISH_NOWAIT
    write_tree(tmp_path / "src", "one")
    engine = await repo_engine(engines, config_for({"devel": local_repo(tmp_path)}),
                               definitions={"hold": HOLDER, "publish": nowait})
    holder = await engine.launch("hold", {"repo": "devel"})
    await settle(engine)
    second = await engine.launch("publish", {"repo": "devel"})
    await settle(engine)
    assert (await engine.summary(second)).error == f"lock: repository devel is locked by #{holder}"
    await engine.cancel(holder)
    await settle(engine)
    third = await engine.launch("publish", {"repo": "devel"})
    await settle(engine)
    assert await status(engine, third) == "completed"


HOLDER = """\
name: hold
project: Project:Devel
inputs: {repo: str}
fields: {repo: devel}
steps:
  - {id: lock, participant: repo_lock, params: {repo: "{{ repo }}"}}
  - {id: wait, participant: hold}
"""
PUBLISH_NOWAIT = """\
name: publish
project: Project:Devel
inputs: {repo: str}
fields: {repo: devel}
steps:
  - {id: lock, participant: repo_lock, params: {repo: "{{ repo }}", wait: false}}
  - {id: sync, participant: repo_sync, params: {repo: "{{ repo }}"}}
  - {id: publish, participant: repo_publish, params: {repo: "{{ repo }}"}}
"""


async def test_start_removes_only_partials_without_a_live_workitem(engines: EngineFactory, tmp_path: Path) -> None:
    write_tree(tmp_path / "src", "one", packages=4, size=50_000)
    config = config_for({"devel": local_repo(tmp_path, bwlimit=50)})
    engine = await repo_engine(engines, config, db_name="p.sqlite3")
    iid = await engine.launch("publish", {"repo": "devel"})
    live = tmp_path / "www" / "snapshots" / f"{iid}-1-3"
    for _ in range(500):
        if (live / "Packages").is_dir() and any((live / "Packages").iterdir()):
            break
        await asyncio.sleep(0.01)
    await engine.stop()            # the sync is cut off: its workitem stays dispatched (live)
    await asyncio.to_thread(engine.store.close)
    dead = tmp_path / "www" / "snapshots" / "99-1-1"
    (dead / "Packages").mkdir(parents=True)
    import sqlite3

    with sqlite3.connect(tmp_path / "p.sqlite3") as c:
        c.execute("INSERT INTO repo_publish_snapshots (repo, name, key, instance_id, state, created) "
                  "VALUES ('devel', '99-1-1', '99:1:1', 99, 'partial', 0)")
    engine = await repo_engine(engines, config_for({"devel": local_repo(tmp_path)}), db_name="p.sqlite3")
    family = family_of(engine)
    await family.cleaned
    assert not dead.exists() and live.is_dir()
    await settle(engine)
    assert await status(engine, iid) == "completed"
    assert os.readlink(tmp_path / "www" / "current") == f"snapshots/{iid}-1-3"


async def test_consistency_reader_sees_one_snapshot_per_walk(engines: EngineFactory, tmp_path: Path) -> None:
    """A reader resolving ``current`` once per walk never sees two snapshots' files, while publishes run."""
    from tests.serverkit.repotree import Reader

    engine = await repo_engine(engines, config_for({"devel": local_repo(tmp_path, retention=2, grace="1h")}))
    write_tree(tmp_path / "src", "m0", packages=40)
    await publish(engine)
    reader = Reader(tmp_path / "www")
    reader.start()
    try:
        for n in range(1, 6):
            write_tree(tmp_path / "src", f"m{n}", packages=40)
            iid = await publish(engine)
            assert await status(engine, iid) == "completed", (await engine.summary(iid)).error
    finally:
        reader.stop()
    assert reader.inconsistencies == 0, reader.problems[:3]
    assert reader.walks >= 6 and len(reader.seen) >= 3
