"""The layering, declared as a table and enforced on every first-party file.

Each row names a module (or package) and the first-party modules it may
import; the most specific row for a file applies.  Imports of third-party
and standard-library modules are free, except the protocol libraries (in the
bot only in their adapter; test clients may use them) and pytest (only in
tests that are not the server kit).
Lazy imports inside functions count as much as those at the top.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIRST_PARTY = ("engine", "participants", "notifiers", "bot", "tests", "bench", "run_bot")

# The building blocks every front-end adapter may use; never the dispatcher,
# the commands, the router, access control or the app that assembles them.
ADAPTER_TOOLKIT = ("bot.chat", "bot.addressing", "bot.network", "bot.outqueue", "bot.logsafety",
                   "bot.pacing", "engine.configkit", "engine.yamlconfig", "engine.durations", "engine.errors")
# What configuration parsing may use: never the engine's runtime (engine.engine, the store, the timers).
CONFIG_PARSING = ("bot.access", "engine.configkit", "bot.transports", "bot.chat", "engine.definitions",
                  "engine.schedules", "engine.yamlconfig", "engine.durations", "engine.templating",
                  "engine.errors", "engine.cron", "notifiers.destinations",
                  "notifiers.routes")

LAYERS: dict[str, tuple[str, ...]] = {
    "engine": ("engine",),                                   # the inner layer: nothing outer
    "participants": ("engine", "participants"),              # workflow steps see only the engine
    "notifiers": ("engine", "notifiers", "bot.chat"),        # when / what / where; sinks speak the chat vocabulary
    "bot": ("bot", "engine", "notifiers"),
    "bot.app": ("bot", "engine", "notifiers", "participants"),   # assembly: the one place that wires all
    "bot.config": CONFIG_PARSING,
    "bot.transports": ADAPTER_TOOLKIT,                       # the table of front-ends imports nothing first-party
    "bot.transports.irc": ("bot.transports.irc", *ADAPTER_TOOLKIT),
    "bot.transports.xmpp": ("bot.transports.xmpp", *ADAPTER_TOOLKIT),
    "bot.transports.email": ("bot.transports.email", *ADAPTER_TOOLKIT,
                             "engine.participant_runtime", "engine.store"),   # reply tokens: rows in the bot's database
    "bot.transports.console": ("bot.chat",),
    "run_bot": ("bot", "engine", "participants", "notifiers"),
    "bench": ("bench", "bot", "engine", "participants", "notifiers", "tests.serverkit", "tests.fakebugzilla",
              "run_bot"),
    "tests": FIRST_PARTY,
    "tests.serverkit": ("tests.serverkit",),                 # usable by bench/: no pytest, no fixtures
    "tests.fakebugzilla": ("tests.fakebugzilla",),           # likewise
}
PROTOCOL_LIBRARIES = {"irc": "bot.transports.irc", "jaraco": "bot.transports.irc",
                      "slixmpp": "bot.transports.xmpp", "aiosmtplib": "bot.transports.email",
                      "aiosmtpd": "bot.transports.email", "aioimaplib": "bot.transports.email",
                      "authres": "bot.transports.email"}
NO_PYTEST = ("engine", "participants", "notifiers", "bot", "run_bot", "bench", "tests.serverkit", "tests.fakebugzilla")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:     # relative: resolve against the importing package
                base = package.split(".")
                base = base[:len(base) - node.level + 1] if node.level > 1 else base
                found.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                found.add(node.module)
    return found


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def rule_for(module: str) -> tuple[str, ...] | None:
    matches = [key for key in LAYERS if within(module, key)]
    return LAYERS[max(matches, key=len)] if matches else None


def python_files() -> list[Path]:
    files = [ROOT / "run_bot.py"]
    for top in ("engine", "participants", "notifiers", "bot", "tests", "bench"):
        files += sorted((ROOT / top).rglob("*.py"))
    return files


def violations() -> list[str]:
    found = []
    for path in python_files():
        module = module_name(path)
        allowed = rule_for(module)
        assert allowed is not None, f"{module} has no row in LAYERS"
        for name in sorted(imports(path)):
            top = name.split(".")[0]
            if top in FIRST_PARTY and not any(within(name, ok) for ok in allowed):
                found.append(f"{module} imports {name}")
            if (top in PROTOCOL_LIBRARIES and not within(module, PROTOCOL_LIBRARIES[top])
                    and not module.startswith(("tests.", "bench."))):     # test clients speak the protocol
                found.append(f"{module} imports {name} (a protocol library, only for its adapter)")
            if top in ("pytest", "_pytest") and any(within(module, p) for p in NO_PYTEST):
                found.append(f"{module} imports {name} (pytest, outside the tests)")
    return found


def test_every_import_follows_the_layer_table() -> None:
    assert violations() == []


def test_the_table_sees_what_it_must_forbid(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The checker finds imports and applies the most specific row, or the test above proves nothing."""
    assert "engine.store" in imports(ROOT / "engine" / "engine.py")
    assert rule_for("bot.transports.irc.delivery") == LAYERS["bot.transports.irc"]
    assert rule_for("bot.config") == CONFIG_PARSING
    assert not any(within("bot.commands", ok) for ok in LAYERS["bot.transports.irc"])
    assert not any(within("engine.engine", ok) for ok in CONFIG_PARSING)
    assert not any(within("engine.timers", ok) for ok in CONFIG_PARSING)
    assert not any(within("bot", ok) for ok in LAYERS["engine"])
    # the two violations this table was written against are caught
    fake = tmp_path / "bot" / "transports" / "irc.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from bot.commands import sanitise\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert imports(fake) == {"bot.commands"}
    assert not any(within("bot.commands", ok) for ok in rule_for(module_name(fake)) or ())


def test_engine_and_bot_are_mypy_strict_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "engine/", "bot/", "run_bot.py"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
