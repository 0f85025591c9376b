"""The console front-end, as a user types at it: the real run_bot.py in a
subprocess, commands on stdin, answers on stdout."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.botproc import Bot, make_home

FLAKY = """
name: flaky
launch_roles: [release-managers]
steps:
  - id: deploy
    participant: fail
    params: {message: "mirror unreachable", until_attempt: 2}
  - set: {deployed: true}
"""
WAITS = """
name: waits
inputs: {ticket: int, title: str}
steps:
  - id: approve
    participant: hold
    timeout: 1h
"""
SCHEDULE = """
schedules:
  - name: nightly
    cron: "0 2 * * *"
    process: waits
"""


@pytest.fixture
def bot(tmp_path: Path):  # type: ignore[no-untyped-def]
    home = make_home(tmp_path, {"flaky": FLAKY, "waits": WAITS}, bot_extra=SCHEDULE)
    b = Bot(home).start()
    yield b
    assert b.stop() == 0


def test_help_lists_commands_and_explains_one(bot: Bot) -> None:
    [line] = bot.ask("help")
    for name in ("launch", "ps", "show", "history", "cancel", "retry", "schedules", "whoami"):
        assert name in line
    assert bot.ask("help launch") == ["launch [--once TOKEN] <process> [key=value ...] - start a process with the "
                                      "given fields; with --once, at most once per TOKEN (kept 8 days)"]


def test_launch_show_history_cancel(bot: Bot) -> None:
    assert bot.ask("launch waits ticket=42 'title=Fix the build'") == ["launched waits as #1"]
    [ps] = bot.ask("ps")
    assert ps.startswith("#1 waits waiting - approve pending")
    show = bot.ask("show 1")
    assert show[0].startswith("#1 waits: waiting")
    assert show[1] == "fields: ticket=42, title='Fix the build'"
    assert any(line.startswith("step approve (hold): pending [key 1:0:") for line in show)
    assert any(line.startswith("timer timeout on approve at ") for line in show)
    history = bot.ask("history 1")
    assert [h.split(" ", 2)[2] for h in history] == [
        "process launched by admin via console:console: ticket=42, title='Fix the build'",
        "approve dispatched: hold", "approve pending"]
    assert bot.ask("cancel 1") == ["cancelled #1"]
    assert bot.ask("ps") == ["no running, waiting or failed instances"]
    [ps_all] = bot.ask("ps all")
    assert ps_all.startswith("#1 waits cancelled")
    assert bot.ask("cancel 1") == ["#1 is already cancelled"]


def test_failed_step_is_retried_after_a_fix(bot: Bot) -> None:
    assert bot.ask("launch flaky") == ["launched flaky as #1"]
    [ps] = bot.ask("ps")
    assert ps.startswith("#1 flaky failed - deploy failed: mirror unreachable")
    assert bot.ask("retry 1") == ["retrying #1: deploy"]
    show = bot.ask("show 1")
    assert show[0].startswith("#1 flaky: completed")
    assert "deployed=True" in show[1]
    assert bot.ask("retry 1") == ["#1 has no failed step to retry (it is completed)"]
    events = [h.split(" ", 2)[2] for h in bot.ask("history 1")]
    assert "deploy retried by admin via console:console" in events


def test_schedules_and_whoami(bot: Bot) -> None:
    [line] = bot.ask("schedules")
    assert line.startswith("nightly: 0 2 * * * -> waits, next ") and line.endswith("last -, misfire run_once")
    assert bot.ask("whoami") == ["admin on console is admin, verified by local console; roles: *: admins"]


@pytest.mark.parametrize("command, reply", [
    ("frobnicate", "unknown command 'frobnicate'; try: help"),
    ("launch", "missing process name. Usage: launch [--once TOKEN] <process> [key=value ...]"),
    ("launch nosuch", "unknown process 'nosuch' (known: flaky, waits). Usage: launch [--once TOKEN] <process> [key=value ...]"),
    ("launch waits ticket", "bad key=value 'ticket'. Usage: launch [--once TOKEN] <process> [key=value ...]"),
    ("launch waits 9x=1", "bad key=value '9x=1'. Usage: launch [--once TOKEN] <process> [key=value ...]"),
    ("launch waits 'unbalanced", "cannot parse the command (No closing quotation); try: help"),
    ("show", "expected one instance id. Usage: show <id>"),
    ("show abc", "bad instance id 'abc'. Usage: show <id>"),
    ("show 99", "no instance #99"),
    ("history 99", "no instance #99"),
    ("cancel 99", "no instance #99"),
    ("retry 1 2", "bad key=value '2'. Usage: retry <id> [handler] [key=value ...]"),
    ("ps now", "unexpected arguments. Usage: ps [all]"),
    ("help nosuch", "unknown command 'nosuch'; try: help"),
])
def test_bad_input_explains_and_changes_nothing(bot: Bot, command: str, reply: str) -> None:
    assert bot.ask(command) == [reply]
    assert bot.statuses() == {}


def test_end_of_input_stops_the_bot_cleanly(tmp_path: Path) -> None:
    bot = Bot(make_home(tmp_path, {"waits": WAITS})).start()
    assert bot.proc and bot.proc.stdin
    bot.proc.stdin.close()
    assert bot.proc.wait(10) == 0
    assert any("stopped" in line for line in bot.log)
