"""Fuzzing the dispatcher: 10,000 generated command lines (random unicode,
control characters, quotes, huge numbers, key=value shapes, YAML tricks),
from an admin who may run everything and from a stranger.  Every line gets
an answer that is not "internal error", and the engine keeps working.

The lines come from a seeded generator so a failure can be replayed; set
FUZZ_SEED to try other seeds locally.
"""
from __future__ import annotations

import logging
import os
import random
import shlex
from pathlib import Path

from bot.access import Directory
from bot.chat import UNVERIFIED, VERIFIED_CONSOLE, Identity, Message, Room
from bot.commands import Dispatcher, default_registry
from bot.config import load_config
from engine.participants import ParticipantRegistry
from participants import discover

ROOT = Path(__file__).resolve().parent.parent
LINES = 10_000

COMMANDS = ["help", "whoami", "launch", "ps", "show", "history", "cancel", "retry", "schedules",
            "HELP", "Launch", "nosuch", ""]
PROCESSES = ["hello", "parallel-checks", "timed-release", "nosuch", "../etc/passwd", "hello\x00"]
WEIRD = ["²", "١٢", "𝟙", "\u202e", "\x00", "\x1b[31m", "\x07", "\r", "\n", "\t", "\ufeff", "\udc80",
         "'", '"', "\\", "'unterminated", '"also', "#", "#1", "-1", "0", "00", "1e999", ".inf", ".nan",
         "0x" + "f" * 40, "9" * 5000, "-" + "9" * 400, "~", "null", "yes", "no", "on", "[1, 2", "{a: 1}",
         "!!python/object/apply:os.system ['id']", "&a [*a]", "*a", "%TAG", "---", "...", "?", ":",
         "=", "==", "a=b=c", "é" * 300, "🙂" * 50, " " * 20, "project=", "project=Other",
         "project=Project:Devel:Tools", "project=[1]", "all", "handler"]


def random_word(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.35:
        return rng.choice(WEIRD)
    if kind < 0.55:
        return str(rng.choice([0, 1, 2, 3, 10 ** rng.randint(1, 30), -5, 2 ** 63]))
    if kind < 0.75:
        key = rng.choice(["who", "n", "project", "threshold", "x" * rng.randint(1, 80), "1bad", "_", "a-b",
                          "é", "who\n"])
        value = random_word(rng) if rng.random() < 0.5 else rng.choice(WEIRD)
        return f"{key}={value}"
    if kind < 0.85:
        return rng.choice(PROCESSES)
    length = rng.randint(1, 30)
    return "".join(chr(rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0x2FFF),
                                   rng.randint(0x1F000, 0x1FAFF), rng.randint(0, 0x1F)]))
                   for _ in range(length))


def shaped_line(rng: random.Random) -> str:
    """A line with a real command's shape, so that the engine is reached."""
    command = rng.choice(["launch", "launch", "show", "history", "cancel", "retry", "ps"])
    if command == "launch":
        process = rng.choice(["hello", "hello", "parallel-checks", "timed-release"])
        pairs = [f"{rng.choice(['who', 'n', 'threshold', 'note'])}={random_word(rng)}"
                 for _ in range(rng.randint(0, 3))]
        return " ".join([command, process, *(shlex.quote(p) for p in pairs)])
    if command == "ps":
        return rng.choice(["ps", "ps all", "ps some"])
    return f"{command} {rng.choice(['1', '2', str(rng.randint(1, 400)), '#3', random_word(rng)])}"


def random_line(rng: random.Random) -> str:
    if rng.random() < 0.4:
        return shaped_line(rng)
    words = [rng.choice(COMMANDS)] if rng.random() < 0.9 else []
    words += [random_word(rng) for _ in range(rng.randint(0, 6))]
    sep = rng.choice([" ", " ", "  ", "\t", " '", '" '])
    line = sep.join(words)
    if rng.random() < 0.05:
        line = line * rng.randint(2, 50)
    return line


async def test_ten_thousand_hostile_lines_never_reach_internal_error(engines, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.ERROR)
    registry = ParticipantRegistry(discover())
    config = load_config(ROOT / "conf", registry.names())
    engine = await engines(specs=config.specs, registry=registry)
    dispatcher = Dispatcher(engine, Directory(config.users), default_registry())
    admin = Identity("console", "console", "admin", account="admin", verified_by=VERIFIED_CONSOLE)
    stranger = Identity("irc", "libera", "mallory", verified_by=UNVERIFIED, hostmask="mallory!~m@evil.test",
                        origin="evil.test")
    room = Room("irc", "libera", "#ops")
    rng = random.Random(int(os.environ.get("FUZZ_SEED", "20261206")))
    answered = launched = 0
    for i in range(LINES):
        line = random_line(rng)
        sender = admin if i % 4 else stranger
        response = await dispatcher.handle(Message(sender, line, room if i % 3 == 0 else None))
        assert response.lines, f"no answer to {line!r}"
        assert not any("internal error" in out for out in response.lines), (line, response.lines)
        answered += 1
        launched += response.lines[0].startswith("launched ")
    assert answered == LINES
    assert launched >= 50, f"only {launched} launches: the generator no longer reaches the engine"
    # still working afterwards: a normal launch runs to completion
    ok = await dispatcher.handle(Message(admin, "launch hello who=fuzz"))
    assert ok.lines[0].startswith("launched hello as #")
    await engine.idle()
    iid = int(ok.lines[0].rsplit("#", 1)[1])
    assert (await engine.summary(iid)).status == "completed"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], \
        [r.getMessage()[:200] for r in caplog.records if r.levelno >= logging.ERROR][:5]
