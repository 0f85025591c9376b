"""engine/ is the inner layer: it imports nothing from bot/, notifiers/ or
participants/.  Protocol libraries are imported only by their adapter."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_engine_imports_no_outer_layer() -> None:
    offenders = []
    for path in sorted((ROOT / "engine").rglob("*.py")):
        for name in imports(path):
            if name.split(".")[0] in ("bot", "notifiers", "participants"):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []


def test_protocol_libraries_stay_in_their_adapter() -> None:
    allowed = {"irc": "bot/transports/irc.py", "slixmpp": "bot/transports/xmpp.py"}
    offenders = []
    for path in sorted(ROOT.glob("*/**/*.py")):
        rel = str(path.relative_to(ROOT))
        if rel.startswith((".venv", "tests/", "bench/")):
            continue
        for name in imports(path):
            top = name.split(".")[0]
            if top in allowed and rel != allowed[top]:
                offenders.append(f"{rel} imports {name}")
    assert offenders == []


def test_the_layer_check_sees_imports() -> None:
    """The walker must find imports, or the tests above prove nothing."""
    assert "engine.store" in imports(ROOT / "engine" / "engine.py")
    assert "bot.access" in imports(ROOT / "bot" / "commands.py")


def test_engine_is_mypy_clean() -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "mypy", "engine/"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
