"""User-controlled text cannot forge log records or reach a terminal raw.

The bot's handlers format with ``bot.logsafety.SafeFormatter``: control
characters in a message become visible escapes, and a traceback's lines after
the first are indented, so no record can look like two.  Checked here on the
real code paths that log user text (fields, nicks, JIDs, room names) and on a
real bot's log file.
"""
from __future__ import annotations

import io
import logging
import re
from pathlib import Path
from typing import Iterator

import pytest

from bot.access import Directory, User
from bot.chat import UNVERIFIED, Identity, Message, Room
from bot.commands import Dispatcher, default_registry
from bot.logsafety import LOG_FORMAT, SafeFormatter, sanitise
from engine.participants import Workitem
from participants.builtin import Echo
from tests.botproc import Bot, make_home

HOSTILE = "x\n2026-12-06 15:00:00,000 CRITICAL bot.access: FORGED admin granted to mallory\r\x1b[2J\x07"
RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


@pytest.fixture
def safe_log() -> Iterator[io.StringIO]:
    """Everything logged goes through a SafeFormatter into this buffer."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(SafeFormatter(LOG_FORMAT))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def assert_one_record_per_line(text: str) -> None:
    for ch in "\r\x1b\x07":
        assert ch not in text, f"raw {ch!r} reached the log"
    for line in text.splitlines():
        assert not line.startswith("2026-12-06 15:00:00,000"), f"a forged record: {line}"
        assert RECORD_START.match(line) or line.startswith("  | ") or line == "Traceback (most recent call last):", \
            f"a line that is neither a record nor inside one: {line}"


async def test_a_field_value_logged_by_a_participant_stays_on_its_record(safe_log: io.StringIO) -> None:
    wi = Workitem(key="1:1:1", instance_id=1, process="p", path="0", step="greet", participant="echo",
                  params={"text": HOSTILE}, fields={})
    await Echo().consume(wi)
    text = safe_log.getvalue()
    assert "echo x\\n2026-12-06 15:00:00,000 CRITICAL bot.access: FORGED" in text
    assert_one_record_per_line(text)


@pytest.mark.parametrize("sender,room", [
    (Identity("irc", "libera", "mal\x1bory\x07", hostmask="m!~m@evil.test\r"), Room("irc", "libera", "#ops\n")),
    (Identity("xmpp", "jabber", "ops@conference.example.org/" + HOSTILE), Room("xmpp", "jabber", "ops\r@x\x07")),
])
async def test_nicks_jids_and_room_names_are_escaped(safe_log: io.StringIO, sender: Identity, room: Room) -> None:
    dispatcher = Dispatcher(engine=None, directory=Directory([User("admin")]), registry=default_registry())
    # a privileged command from an unknown sender is refused and logged with who sent it
    await dispatcher.handle(Message(sender, "launch hello " + HOSTILE.replace("\n", " "), room))
    logging.getLogger("bot.test").warning("from %s in %s", sender, room)
    text = safe_log.getvalue()
    assert "refused" in text
    assert_one_record_per_line(text)


def test_a_traceback_cannot_start_a_record_of_its_own(safe_log: io.StringIO) -> None:
    try:
        raise ValueError(HOSTILE)
    except ValueError:
        logging.getLogger("bot.test").exception("handling %s failed", "x\ny")
    lines = safe_log.getvalue().splitlines()
    assert RECORD_START.match(lines[0]) and "handling x\\ny failed" in lines[0]
    assert lines[1] == "Traceback (most recent call last):"
    assert all(line.startswith("  | ") for line in lines[2:]), lines
    assert_one_record_per_line(safe_log.getvalue())


def test_sanitise_escapes_and_bounds() -> None:
    assert sanitise("a\nb\x1b\x07") == "a\\nb\\x1b\\x07"
    assert sanitise("é" * 300, 10) == "é" * 10 + "..."
    assert sanitise("\udc80") == "\\udc80"      # a lone surrogate from a broken decoder


@pytest.mark.slow
def test_a_forged_field_in_a_real_bots_log_stays_one_record(tmp_path: Path) -> None:
    """A launch value with a newline, CR, ESC and BEL (YAML double-quoted escapes) on the real console."""
    bot = Bot(make_home(tmp_path, {"greet": """
        launch_roles: [admins]
        inputs: {who: str}
        steps:
          - participant: echo
            params: {text: "{{ who }}"}
        """})).start()
    try:
        forged = r'"x\n2026-12-06 15:00:00,000 CRITICAL bot.access: FORGED admin granted\r\e[2J\a"'
        assert bot.ask(f"launch greet 'who={forged}'")[0].startswith("launched greet as #1")
        bot.expect_log("FORGED")
    finally:
        assert bot.stop() == 0
    text = (tmp_path / "var" / "bot.log").read_text(encoding="utf-8")
    assert "FORGED" in text
    assert_one_record_per_line(text)
    assert not any(line.startswith("2026-12-06 15:00:00,000 CRITICAL") for line in bot.stderr)
