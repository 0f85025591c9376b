#!/usr/bin/env python3
"""Chat front-end benchmarks against real servers started here (ngircd,
InspIRCd, prosody).  Prints one ``name=value`` line per figure:

  irc_command_rtt_p50_ms / _p99_ms    1,000 commands from a real IRC client, one at a time
  xmpp_command_rtt_p50_ms / _p99_ms   the same over XMPP
  irc_notice_lines_per_s              output rate with pacing on (and irc_disconnects)
  irc_fair_wait_ms_p99                another user's one-line answer while a 200-line answer
                                      drains at the default pacing (InspIRCd; target <= 2000)
"""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]   # bench/bugzilla.py
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))                                       # is not python-bugzilla

from bench import chat_irc, chat_xmpp  # noqa: E402


def main() -> None:
    for module in (chat_irc, chat_xmpp):
        figures = asyncio.run(module.run())
        for name, value in figures.items():
            print(f"{name}={value:.2f}" if isinstance(value, float) else f"{name}={value}", flush=True)


if __name__ == "__main__":
    main()
