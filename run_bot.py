#!/usr/bin/env python3
"""The release bot.

    python run_bot.py [run] [--conf DIR]     run with the configured networks
    python run_bot.py --console [--conf DIR] run with a console on stdin/stdout too
    python run_bot.py check [CONF_DIR]       validate all configuration, print every problem
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

log = logging.getLogger("run_bot")
WIRE_LOGGERS = ("slixmpp", "irc")


def load(conf: Path):  # type: ignore[no-untyped-def]
    from bot.config import load_config
    from engine.participants import ParticipantRegistry
    from participants import discover

    registry = ParticipantRegistry(discover())
    return load_config(conf, registry.names()), registry


def check(conf: Path) -> int:
    from engine.yamlconfig import ConfigError

    try:
        config, _ = load(conf)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        print(f"{len(exc.problems)} problem(s) found", file=sys.stderr)
        return 1
    print(config.summary())
    return 0


async def serve(conf: Path, console: bool) -> int:
    from bot.app import App
    from bot.chat import TransportError
    from engine.yamlconfig import ConfigError
    from engine.store import StoreError

    try:
        config, registry = load(conf)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print("refusing to start: fix the configuration (python run_bot.py check)", file=sys.stderr)
        return 1
    logging.getLogger().setLevel(config.log_level)
    # The protocol libraries dump raw traffic at DEBUG, and slixmpp's includes the
    # SASL exchange (the password, base64-encoded): secrets never reach the log.
    for wire in WIRE_LOGGERS:
        logging.getLogger(wire).setLevel(logging.INFO)
    app = App(config, registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    extra = []
    if console:
        from bot.transports.console import ConsoleTransport

        terminal = ConsoleTransport(config.console_user)
        extra.append(terminal)
    try:
        await app.start(extra)
    except (TransportError, StoreError) as exc:   # a network refuses us, or the database is unusable
        print(f"refusing to start: {exc}", file=sys.stderr)
        return 1
    if console:
        print(f"release bot ready ({config.summary()}); you are {config.console_user}; "
              "type 'help', Ctrl-D to quit", flush=True)
        closed = asyncio.ensure_future(terminal.closed.wait())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([closed, stopped], return_when=asyncio.FIRST_COMPLETED)
        closed.cancel()
        stopped.cancel()
    else:
        await stop.wait()
    await app.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="chat-ops release bot")
    parser.add_argument("command", nargs="?", default="run", choices=("run", "check"))
    parser.add_argument("conf_dir", nargs="?", help="configuration directory (check only)")
    parser.add_argument("--conf", type=Path, default=HERE / "conf", help="configuration directory")
    parser.add_argument("--console", action="store_true", help="also chat on stdin/stdout")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.WARNING)  # it logs every re-arm at INFO
    if args.command == "check":
        return check(Path(args.conf_dir) if args.conf_dir else args.conf)
    if args.conf_dir:
        parser.error("a configuration directory argument is for 'check'; use --conf DIR")
    return asyncio.run(serve(args.conf, args.console))


if __name__ == "__main__":
    sys.exit(main())
