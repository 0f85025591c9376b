"""The console front-end: stdin/stdout as the configured local user.

Whoever runs the console is trusted as ``console.user`` from bot.yaml (they
can read the database anyway).  End of input (Ctrl-D) stops the bot."""
from __future__ import annotations

import asyncio
import sys
import threading
from typing import TextIO

from bot.chat import VERIFIED_CONSOLE, Identity, Message, MessageHandler, Outgoing, Target


class ConsoleTransport:
    protocol = "console"
    network = "console"

    def __init__(self, user: str, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
        self.identity = Identity("console", "console", user, account=user, verified_by=VERIFIED_CONSOLE)
        self._in = stdin or sys.stdin
        self._out = stdout or sys.stdout
        self.closed = asyncio.Event()
        self._prompt = self._in.isatty()

    async def start(self, on_message: MessageHandler) -> None:
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[str | None] = asyncio.Queue()

        def read() -> None:  # a thread: works for terminals, pipes and files alike
            for line in self._in:
                loop.call_soon_threadsafe(lines.put_nowait, line)
            loop.call_soon_threadsafe(lines.put_nowait, None)

        threading.Thread(target=read, name="console-stdin", daemon=True).start()

        async def pump() -> None:
            self._write_prompt()
            while True:
                line = await lines.get()
                if line is None:
                    break
                if line.strip():
                    await on_message(Message(self.identity, line.strip()))
                self._write_prompt()
            self.closed.set()

        self._task = loop.create_task(pump())

    def _write_prompt(self) -> None:
        if self._prompt:
            self._out.write("bot> ")
            self._out.flush()

    ready = True

    async def send(self, target: Target, text: str | Outgoing) -> asyncio.Future[None]:
        """Written to stdout: delivered when this returns."""
        body = text.text if isinstance(text, Outgoing) else text
        for line in body.splitlines() or [""]:
            self._out.write(line + "\n")
        self._out.flush()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def close(self) -> None:
        task = getattr(self, "_task", None)
        if task is not None and not task.done():
            task.cancel()
