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
from typing import TYPE_CHECKING

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

if TYPE_CHECKING:
    from bot.config import BotConfig
    from engine.participants import ParticipantRegistry

log = logging.getLogger("run_bot")
WIRE_LOGGERS = ("slixmpp", "irc")


def load(conf: Path, need_secrets: bool = True) -> tuple[BotConfig, ParticipantRegistry]:
    from bot.config import load_config
    from engine.participants import ParticipantRegistry
    from participants import discover

    registry = ParticipantRegistry(discover())
    return load_config(conf, registry.by_name(), need_secrets=need_secrets), registry


def check(conf: Path) -> int:
    """Checking needs no secrets: an unset password variable is a warning here."""
    from engine.participants import DiscoveryError
    from engine.yamlconfig import ConfigError

    try:
        config, _ = load(conf, need_secrets=False)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        print(f"{len(exc.problems)} problem(s) found", file=sys.stderr)
        return 1
    except DiscoveryError as exc:
        print(exc)
        print("1 problem(s) found", file=sys.stderr)
        return 1
    for warning in config.warnings:
        print(f"{warning.file}:{warning.line}: warning: {warning.message}")
    print(config.summary() + (f", {len(config.warnings)} warning(s)" if config.warnings else ""))
    return 0


def setup_logging(config: BotConfig, console: bool) -> Path | None:
    """Every handler formats with SafeFormatter (user text cannot forge records).
    On the console a person reads answers, so the log goes to var/bot.log and
    only warnings and errors also reach the terminal; returns the log file."""
    from bot.logsafety import LOG_FORMAT, SafeFormatter, install

    root = logging.getLogger()
    root.setLevel(config.log_level)
    log_file = None
    if console:
        log_file = config.home / "var" / "bot.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        for handler in root.handlers:
            handler.setLevel(logging.WARNING)
        to_file = logging.FileHandler(log_file, encoding="utf-8")
        to_file.setFormatter(SafeFormatter(LOG_FORMAT))
        root.addHandler(to_file)
    install(root)
    # The protocol libraries dump raw traffic at DEBUG, and slixmpp's includes the
    # SASL exchange (the password, base64-encoded): secrets never reach the log.
    for wire in WIRE_LOGGERS:
        logging.getLogger(wire).setLevel(logging.INFO)
    # aiosmtpd (the mail listener) logs each SMTP command at INFO: five lines per mail, and
    # the bot already writes one line per mail it takes
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    return log_file


async def serve(conf: Path, console: bool) -> int:
    from bot.app import App
    from bot.chat import TransportError
    from engine.errors import EngineError
    from engine.participants import DiscoveryError
    from engine.yamlconfig import ConfigError
    from engine.store import StoreError

    try:
        config, registry = load(conf)
    except (ConfigError, DiscoveryError) as exc:
        for problem in exc.problems if isinstance(exc, ConfigError) else [exc]:
            print(problem, file=sys.stderr)
        print("refusing to start: fix the configuration (python run_bot.py check)", file=sys.stderr)
        return 1
    log_file = setup_logging(config, console)
    for warning in config.warnings:
        log.warning("%s", warning)
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
    except (TransportError, StoreError, EngineError) as exc:
        # a network refuses us, the database is unusable, or a participant cannot start
        print(f"refusing to start: {exc}", file=sys.stderr)
        return 1
    if console:
        print(f"release bot ready ({config.summary()}); you are {config.console_user}; "
              f"type 'help', Ctrl-D to quit; log: {log_file}", flush=True)
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
    from bot.logsafety import LOG_FORMAT, install

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=LOG_FORMAT)
    install()
    logging.getLogger("apscheduler").setLevel(logging.WARNING)  # it logs every re-arm at INFO
    if args.command == "check":
        return check(Path(args.conf_dir) if args.conf_dir else args.conf)
    if args.conf_dir:
        parser.error("a configuration directory argument is for 'check'; use --conf DIR")
    return asyncio.run(serve(args.conf, args.console))


if __name__ == "__main__":
    sys.exit(main())
