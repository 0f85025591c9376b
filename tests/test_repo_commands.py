"""publish / rollback / repos / show as a user types them: the real bot on
the console with the shipped repo-publish processes and a local destination
(real rsync)."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.botproc import ROOT, Bot, make_home
from tests.serverkit.repotree import write_tree

pytestmark = pytest.mark.usefixtures("rsync_bin")

USERS = """
users:
  admin:
    roles:
      "*": [admins]
  bob:
    roles:
      "Project:Devel": [publishers]
  olga:
    roles:
      "Project:Devel": [publishers, publishers-override]
"""


def wait_for(bot: Bot, iid: int, status: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while bot.statuses().get(iid) != status:
        assert time.monotonic() < deadline, (bot.statuses(), bot.ask(f"show {iid}"))
        time.sleep(0.05)


def test_publish_rollback_repos_and_refusals(tmp_path: Path) -> None:
    src, www = tmp_path / "src", tmp_path / "www"
    write_tree(src, "one", packages=5)
    home = make_home(tmp_path, {}, users=USERS, bot_extra=f"""
        participants:
          repo_publish:
            repositories:
              devel: {{project: "Project:Devel", source: "{src}", destination: "{www}", grace: 1s}}
    """)
    for name in ("repo-publish", "repo-rollback", "repo-publish-notice"):
        shutil.copy(ROOT / "conf" / "processes" / f"{name}.yaml", home / "conf" / "processes")
    bot = Bot(home).start()
    try:
        assert bot.ask("repos") == ["devel (Project:Devel): idle; never published"]
        assert bot.ask("publish devel") == ["launched repo-publish for devel as #1"]
        wait_for(bot, 1, "completed")
        first = os.readlink(www / "current")
        write_tree(src, "two", packages=5, changed=2)
        assert bot.ask("as bob publish devel") == ["launched repo-publish for devel as #2"]
        wait_for(bot, 2, "completed")
        second = os.readlink(www / "current")
        assert first != second
        [line] = bot.ask("repos")
        assert line.startswith("devel (Project:Devel): idle; published ") and "by #2" in line
        assert bot.ask("as bob publish devel force") == [
            "not authorised: force needs publishers-override on Project:Devel"]
        assert bot.ask("publish ../x")[0].startswith("unknown repository '../x'")
        assert "Usage: publish <repo> [force]" in bot.ask("publish devel now")[0]
        assert bot.ask("as bob rollback devel") == ["launched repo-rollback for devel as #3"]
        wait_for(bot, 3, "completed")
        assert os.readlink(www / "current") == first
        assert any("rollback" in line or "swapped" in line or "current" in line for line in bot.ask("history 3"))
    finally:
        assert bot.stop() == 0


def test_a_launch_in_another_project_is_refused_by_the_lock(tmp_path: Path) -> None:
    src, www = tmp_path / "src", tmp_path / "www"
    write_tree(src, "one", packages=2)
    home = make_home(tmp_path, {}, users=USERS, bot_extra=f"""
        participants:
          repo_publish:
            repositories:
              devel: {{project: "Project:Devel", source: "{src}", destination: "{www}"}}
    """)
    for name in ("repo-publish", "repo-rollback", "repo-publish-notice"):
        shutil.copy(ROOT / "conf" / "processes" / f"{name}.yaml", home / "conf" / "processes")
    bot = Bot(home).start()
    try:
        assert bot.ask("launch repo-publish repo=devel") == ["launched repo-publish as #1"]   # in Project
        wait_for(bot, 1, "failed")
        assert any("belongs to Project:Devel, not Project: use `publish devel`" in line for line in bot.ask("show 1"))
        assert not (www / "current").exists()
    finally:
        assert bot.stop() == 0


def test_a_repository_with_approval_asks_its_roles_first(tmp_path: Path) -> None:
    src, www = tmp_path / "src", tmp_path / "www"
    write_tree(src, "one", packages=2)
    home = make_home(tmp_path, {}, users=USERS, bot_extra=f"""
        participants:
          repo_publish:
            repositories:
              devel: {{project: "Project:Devel", source: "{src}", destination: "{www}",
                       approval: {{roles: [publishers-override]}}}}
    """)
    for name in ("repo-publish", "repo-rollback", "repo-publish-notice"):
        shutil.copy(ROOT / "conf" / "processes" / f"{name}.yaml", home / "conf" / "processes")
    bot = Bot(home).start()
    try:
        assert bot.ask("publish devel") == ["launched repo-publish for devel as #1"]
        deadline = time.monotonic() + 10
        while not bot.ask("as olga pending")[0].startswith("q1: Publish devel now?"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert bot.ask("as bob approve q1") == ["q1 was not asked of you"]       # publishers, not the role asked
        assert not (www / "current").exists()
        assert bot.ask("as olga approve q1")[0].endswith("q1 is decided: approve")
        wait_for(bot, 1, "completed")
        assert (www / "current").is_symlink()
    finally:
        assert bot.stop() == 0
