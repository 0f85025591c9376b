"""Crash safety of publishing, with a real bot process SIGKILLed and
restarted: during the sync, once the snapshot is synced (before the swap),
and right after ``current`` changed (before the answer was written).  The
published tree is always one complete snapshot, the instance finishes, the
lock follows it, and at start the bot removes only the partial snapshots
whose sync step has no live workitem."""
from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.botproc import Bot, make_home
from tests.servers.publish import PUBLISH, markers, write_tree

pytestmark = [pytest.mark.usefixtures("rsync_bin"), pytest.mark.slow]


# a pause after the sync: the moment "synced, not yet swapped" lasts long enough to be hit
PAUSED = PUBLISH.replace("  - {id: publish,", "  - {id: pause, participant: sleep, params: {seconds: 0.5}}\n  - {id: publish,")


def home_for(tmp_path: Path, bwlimit: int = 0) -> Path:
    home = tmp_path / "bot"
    if not home.exists():
        make_home(home, {"publish": PAUSED})
    text = (home / "conf" / "bot.yaml").read_text().split("participants:")[0]
    (home / "conf" / "bot.yaml").write_text(text + f"""participants:
  repo_publish:
    repositories:
      devel:
        project: Project:Devel
        source: {tmp_path / 'src'}
        destination: {tmp_path / 'www'}
        bwlimit: {bwlimit}
""")
    return home


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.001)
    raise AssertionError(f"timed out waiting for {what}")


def rows(bot: Bot, sql: str) -> list[tuple[object, ...]]:
    try:
        with bot.db() as c:
            return list(c.execute(sql))
    except sqlite3.OperationalError:
        return []


def complete(www: Path) -> set[str]:
    """The markers of the published tree, resolved once; one marker means one complete snapshot."""
    return markers(Path(os.path.realpath(www / "current")))


def test_sigkill_during_sync_then_cancel_leaves_only_live_partials(tmp_path: Path) -> None:
    www = tmp_path / "www"
    write_tree(tmp_path / "src", "one", packages=6, size=40_000)
    bot = Bot(home_for(tmp_path)).start()
    try:
        bot.send("launch publish repo=devel")
        bot.expect("as #1")
        wait_until(lambda: bot.statuses().get(1) == "completed", 20, "the first publish")
    finally:
        bot.stop()
    write_tree(tmp_path / "src", "two", packages=6, size=40_000)
    # 240 kB at 100 kB/s: the sync takes a couple of seconds
    bot = Bot(home_for(tmp_path, bwlimit=100)).start()
    bot.send("launch publish repo=devel")
    bot.expect("as #2")
    partial = www / "snapshots" / "2-1-3" / "Packages"
    wait_until(lambda: partial.is_dir() and any(partial.iterdir()), 20, "the sync to start writing")
    bot.kill()
    assert complete(www) == {"one"}
    assert rows(bot, "SELECT state FROM repo_publish_snapshots WHERE name = '2-1-3'") == [("partial",)]
    assert rows(bot, "SELECT instance_id FROM repo_publish_locks") == [(2,)]

    bot = Bot(home_for(tmp_path, bwlimit=100)).start()   # the sync is dispatched again: its partial stays
    try:
        time.sleep(0.3)
        assert partial.is_dir()
        bot.send("launch publish repo=devel")            # #3 waits for the lock
        bot.expect("as #3")
        bot.send("cancel 2")
        bot.expect("cancelled #2")
        third = www / "snapshots" / "3-1-3" / "Packages"
        wait_until(lambda: third.is_dir() and any(third.iterdir()), 20, "#3 to take the lock and sync")
        assert rows(bot, "SELECT instance_id FROM repo_publish_locks") == [(3,)]
    finally:
        bot.kill()
    assert complete(www) == {"one"}
    assert (www / "snapshots" / "2-1-3").is_dir()       # cancelled mid-sync: a partial nobody will finish

    bot = Bot(home_for(tmp_path)).start()
    try:
        wait_until(lambda: bot.statuses().get(3) == "completed", 20, "#3 to finish")
        wait_until(lambda: not (www / "snapshots" / "2-1-3").exists(), 10, "the dead partial to go")
        assert complete(www) == {"two"}
        assert os.readlink(www / "current") == "snapshots/3-1-3"
        assert bot.statuses() == {1: "completed", 2: "cancelled", 3: "completed"}
        assert rows(bot, "SELECT * FROM repo_publish_locks") == []
        assert rows(bot, "SELECT name, state FROM repo_publish_snapshots ORDER BY name") == [
            ("1-1-3", "retired"), ("3-1-3", "current")]
        assert any("removed partial snapshot(s) 2-1-3" in line for line in bot.log), bot.log
    finally:
        bot.stop()


def test_sigkill_around_the_swap(tmp_path: Path) -> None:
    """Killed once the snapshot is synced (the swap still ahead), then the moment
    ``current`` changed (seen by polling: usually before the answer is written): after each restart the
    instance completes, ``current`` is the new snapshot, the database agrees,
    and the lock is free."""
    www = tmp_path / "www"
    write_tree(tmp_path / "src", "one", packages=400, size=100)
    bot = Bot(home_for(tmp_path)).start()
    try:
        bot.send("launch publish repo=devel")
        bot.expect("as #1")
        wait_until(lambda: bot.statuses().get(1) == "completed", 20, "the first publish")
        write_tree(tmp_path / "src", "two", packages=400, size=100)
        bot.send("launch publish repo=devel")
        bot.expect("as #2")
        wait_until(lambda: rows(bot, "SELECT state FROM repo_publish_snapshots WHERE name = '2-1-3'")
                   == [("synced",)], 20, "the sync to be recorded")
    finally:
        bot.kill()
    assert complete(www) == {"one"}
    bot = Bot(home_for(tmp_path)).start()
    try:
        wait_until(lambda: bot.statuses().get(2) == "completed", 20, "#2 to finish after the restart")
        assert complete(www) == {"two"}
        assert rows(bot, "SELECT current, swapping_to FROM repo_publish_repos") == [("2-1-3", None)]
        write_tree(tmp_path / "src", "three", packages=400, size=100)
        bot.send("launch publish repo=devel")
        bot.expect("as #3")
        wait_until(lambda: os.readlink(www / "current") == "snapshots/3-1-3", 20, "the swap")
    finally:
        bot.kill()
    assert complete(www) == {"three"}
    bot = Bot(home_for(tmp_path)).start()
    try:
        wait_until(lambda: bot.statuses().get(3) == "completed", 20, "#3 to finish after the restart")
        assert complete(www) == {"three"}
        assert rows(bot, "SELECT current, swapping_to FROM repo_publish_repos") == [("3-1-3", None)]
        assert rows(bot, "SELECT * FROM repo_publish_locks") == []
        assert bot.statuses() == {1: "completed", 2: "completed", 3: "completed"}
    finally:
        bot.stop()
