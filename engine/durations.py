"""Durations as people write them in definitions and config: ``90s``, ``4h``, ``1h30m``."""
from __future__ import annotations

import math
import re
from typing import Any

UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# The longest duration anything may name.  Far beyond any release chore, and far
# inside what datetime can represent: a due time years past 9999 would stop every
# timer from being armed (and the bot from starting) instead of failing one step.
MAX_DURATION = 3650 * 86400.0
MAX_DURATION_TEXT = "10 years (3650d)"


def parse_duration(text: Any) -> float:
    """'90s', '4h', '2d', '1h30m', '500ms' -> seconds, at most MAX_DURATION.  Raises ValueError."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ValueError(f"bad duration {text!r}: expected e.g. 90s, 4h, 2d")
    if isinstance(text, (int, float)):
        if not math.isfinite(text):
            raise ValueError(f"bad duration {text!r}: must be finite")
        if text < 0:
            raise ValueError(f"bad duration {text!r}: negative")
        seconds = float(text)
    else:
        s = text.strip().replace(" ", "")
        parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)", s)
        if not s or "".join(n + u for n, u in parts) != s:
            raise ValueError(f"bad duration {text!r}: expected e.g. 90s, 4h, 2d, 1h30m")
        seconds = sum(float(n) * UNITS[u] for n, u in parts)
    if seconds > MAX_DURATION:
        raise ValueError(f"bad duration {text!r}: longer than {MAX_DURATION_TEXT}")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds as people write them: 90 -> '90s', 7200 -> '2h', 1.5 -> '1.5s'."""
    for unit in ("w", "d", "h", "m"):
        size = UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds >= UNITS["d"]:
        return f"about {seconds / UNITS['d']:.0f}d"
    return f"{seconds:g}s"
