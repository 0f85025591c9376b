"""Publishing to an rsync daemon module and to an ssh target on 127.0.0.1:
the snapshot synced remotely with --link-dest, the ``current`` link swapped
by a transfer of its own, metadata verified after fetching it back, the
signature pushed, old snapshots pruned remotely, and rollback."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from engine.engine import Engine
from tests.engine_fixtures import EngineFactory, advance, fields, status
from tests.servers.publish import GpgKey, config_for, markers, published, repo_engine, settle, write_tree
from tests.serverkit.rsyncd import Rsyncd
from tests.serverkit.sshd import Sshd

pytestmark = [pytest.mark.servers, pytest.mark.slow]


async def run(engine: Engine, process: str = "publish") -> int:
    iid = await engine.launch(process, {"repo": "devel"}, actor="alice via console:console")
    await settle(engine)
    assert await status(engine, iid) == "completed", (await engine.summary(iid)).error
    return iid


async def publish_twice_and_roll_back(engine: Engine, src: Path, where: Path) -> None:
    write_tree(src, "one", packages=20)
    first = await run(engine)
    assert os.readlink(where / "current") == f"snapshots/{(await fields(engine, first))['snapshot']}"
    assert markers(published(where)) == {"one"}
    write_tree(src, "two", packages=20, changed=2)
    second = await run(engine)
    got = await fields(engine, second)
    assert (got["added"], got["changed"]) == (1, 3)       # 2 packages + repomd.xml changed, a new primary
    new, old = where / "snapshots" / got["snapshot"], where / "snapshots" / got["previous"]
    assert (new / "Packages" / "p00009.rpm").stat().st_ino == (old / "Packages" / "p00009.rpm").stat().st_ino
    assert markers(published(where) / "repodata") == {"two"}
    await run(engine, "rollback")
    assert markers(published(where)) == {"one"}


async def test_rsync_daemon(engines: EngineFactory, tmp_path: Path, rsyncd: Rsyncd, gpg_key: GpgKey) -> None:
    repo: dict[str, Any] = {"project": "Project:Devel", "source": str(tmp_path / "src"),
                            "destination": f"{rsyncd.url}/devel", "retention": 1, "grace": "10m",
                            "sign": {"key": gpg_key.fingerprint, "gnupg_home": str(gpg_key.home)}}
    engine = await repo_engine(engines, config_for({"devel": repo}))
    where = rsyncd.path / "devel"
    await publish_twice_and_roll_back(engine, tmp_path / "src", where)
    repodata = published(where) / "repodata"
    check = subprocess.run(["gpgv", "--keyring", str(gpg_key.public), str(repodata / "repomd.xml.asc"),
                            str(repodata / "repomd.xml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    # the link is stored as written: munge symlinks = no
    assert os.readlink(where / "current").startswith("snapshots/")
    # retention 1: after the grace period, a publish prunes the withdrawn snapshot remotely; the one it
    # replaces was current until now, so it stays for the grace period
    before = os.readlink(where / "current").rpartition("/")[2]
    await advance(engine, 601)
    write_tree(tmp_path / "src", "three", packages=20, changed=1)
    last = await run(engine)
    assert sorted(p.name for p in (where / "snapshots").iterdir()) == sorted(
        [before, (await fields(engine, last))["snapshot"]])


async def test_ssh_target(engines: EngineFactory, tmp_path: Path, sshd: Sshd) -> None:
    where = tmp_path / "remote"
    repo = {"project": "Project:Devel", "source": str(tmp_path / "src"),
            "destination": f"ssh://root@127.0.0.1:{sshd.port}{where}", "ssh_key": str(sshd.client_key),
            "known_hosts": str(sshd.known_hosts)}
    engine = await repo_engine(engines, config_for({"devel": repo}))
    await publish_twice_and_roll_back(engine, tmp_path / "src", where)


async def test_ssh_refuses_an_unknown_host_key(engines: EngineFactory, tmp_path: Path, sshd: Sshd) -> None:
    other = tmp_path / "known_hosts"
    other.write_text(f"[127.0.0.1]:{sshd.port} ssh-ed25519 "
                     "AAAAC3NzaC1lZDI1NTE5AAAAIFakeFakeFakeFakeFakeFakeFakeFakeFakeFakeFakeFake\n")
    repo = {"project": "Project:Devel", "source": str(tmp_path / "src"),
            "destination": f"ssh://root@127.0.0.1:{sshd.port}{tmp_path / 'remote'}",
            "ssh_key": str(sshd.client_key), "known_hosts": str(other)}
    engine = await repo_engine(engines, config_for({"devel": repo}))
    write_tree(tmp_path / "src", "one")
    iid = await engine.launch("publish", {"repo": "devel"})
    await settle(engine)
    summary = await engine.summary(iid)
    assert summary.status == "failed" and "sync: rsync exited with status" in summary.error
    assert not (tmp_path / "remote").exists()
