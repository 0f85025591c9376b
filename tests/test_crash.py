"""Crash safety: a real bot process is SIGKILLed at several points and
restarted; every instance must finish exactly as an uninterrupted run does,
and an idempotent participant's side effect must happen exactly once."""
from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.botproc import Bot, make_home

PIPELINE = """
name: pipeline
inputs: {n: str, out: str}
steps:
  - id: build
    participant: record
    params: {file: "{{ out }}", text: "build {{ n }}", seconds: 0.4}
  - id: cool-down
    wait: 1s
  - id: publish
    participant: record
    params: {file: "{{ out }}", text: "publish {{ n }}"}
  - id: announce
    participant: record
    params: {file: "{{ out }}", text: "announce {{ n }}", seconds: 0.3}
"""

EXPECTED = [
    ("", "launched"),
    ("build", "dispatched"), ("build", "done"),
    ("cool-down", "wait over"),
    ("publish", "dispatched"), ("publish", "done"),
    ("announce", "dispatched"), ("announce", "done"),
    ("", "completed"),
]


def wait_until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def effects(out: Path) -> Counter[str]:
    if not out.exists():
        return Counter()
    return Counter(line.split(" ", 1)[1] for line in out.read_text().splitlines())


def check_all_done(bot: Bot, out: Path, count: int) -> None:
    assert bot.statuses() == {i: "completed" for i in range(1, count + 1)}
    for i in range(1, count + 1):
        assert [(s, e) for s, e in bot.trace(i)] == EXPECTED, f"instance #{i}"
    done = effects(out)
    for n in range(count):
        for step in ("build", "publish", "announce"):
            assert done[f"{step} {n}"] == 1, f"{step} {n} happened {done[f'{step} {n}']} times"
    assert sum(done.values()) == 3 * count


def launch(bot: Bot, out: Path, count: int) -> None:
    for n in range(count):
        bot.send(f"launch pipeline n={n} out={out}")
        bot.expect(f"as #{n + 1}")


def test_uninterrupted_run_gives_the_expected_trace(tmp_path: Path) -> None:
    home = make_home(tmp_path, {"pipeline": PIPELINE})
    out = tmp_path / "effects.txt"
    bot = Bot(home).start()
    try:
        launch(bot, out, 2)
        try:
            wait_until(lambda: set(bot.statuses().values()) == {"completed"}, 15, "completion")
        except AssertionError:
            print("\n".join(bot.log))        # shown by pytest on failure
            raise
        check_all_done(bot, out, 2)
    finally:
        bot.stop()


@pytest.mark.slow
@pytest.mark.parametrize("point", ["during a participant", "while a timer is due", "between two steps"])
def test_sigkill_at_a_known_point_loses_nothing(tmp_path: Path, point: str) -> None:
    home = make_home(tmp_path, {"pipeline": PIPELINE})
    out = tmp_path / "effects.txt"
    bot = Bot(home).start()
    launch(bot, out, 3)
    if point == "during a participant":
        time.sleep(0.15)                      # build (0.4 s) is running for all three
        assert not effects(out)
    elif point == "while a timer is due":
        wait_until(lambda: len(effects(out)) == 3, 5, "builds")   # all in cool-down (1 s)
        time.sleep(0.2)
    else:
        wait_until(lambda: sum(1 for k in effects(out) if k.startswith("publish")) >= 1, 10, "a publish")
    bot.kill()
    if point == "while a timer is due":
        time.sleep(1.2)                       # the timers become overdue while the bot is down
    bot = Bot(home).start()
    try:
        wait_until(lambda: set(bot.statuses().values()) == {"completed"}, 20, "completion after restart")
        check_all_done(bot, out, 3)
    finally:
        bot.stop()


@pytest.mark.slow
def test_repeated_sigkill_at_random_moments(tmp_path: Path) -> None:
    home = make_home(tmp_path, {"pipeline": PIPELINE})
    out = tmp_path / "effects.txt"
    rng = random.Random(20261125)
    bot = Bot(home).start()
    launch(bot, out, 6)
    for _ in range(6):
        time.sleep(rng.uniform(0.05, 0.6))
        bot.kill()
        bot = Bot(home).start()
    try:
        wait_until(lambda: set(bot.statuses().values()) == {"completed"}, 30, "completion")
        check_all_done(bot, out, 6)
    finally:
        bot.stop()


HOLD = """
name: approval
inputs: {out: str}
steps:
  - id: prepare
    participant: record
    params: {file: "{{ out }}", text: "prepare"}
  - id: decide
    participant: hold
    timers: "1h: remind"
"""


@pytest.mark.slow
def test_pending_step_stays_pending_across_sigkill_and_is_not_asked_again(tmp_path: Path) -> None:
    home = make_home(tmp_path, {"approval": HOLD})
    out = tmp_path / "effects.txt"
    bot = Bot(home).start()
    bot.send(f"launch approval out={out}")
    bot.expect("as #1")
    wait_until(lambda: bot.statuses() == {1: "waiting"}, 5, "pending")
    wait_until(lambda: any("holding workitem" in line for line in bot.log), 5, "the hold log line")
    bot.kill()
    before_restart = len(bot.log)           # var/bot.log outlives the process: look only past this
    bot = Bot(home).start()
    try:
        lines = bot.ask("show 1")
        assert any("decide (hold): pending" in line for line in lines), lines
        assert any("timer remind on decide" in line for line in lines), lines
        time.sleep(0.5)
        with bot.db() as c:
            assert c.execute("SELECT state FROM workitems").fetchall() == [("pending",)]
        assert bot.trace(1).count(("decide", "dispatched")) == 1
        assert not any("holding workitem" in line for line in bot.log[before_restart:]), "asked again after restart"
        assert effects(out) == Counter({"prepare": 1})
        assert bot.ask("cancel 1") == ["cancelled #1"]
        assert bot.statuses() == {1: "cancelled"}
    finally:
        bot.stop()
