"""Connects front-ends to the dispatcher and sends replies back where the
command came from; long output in a room goes to the caller privately."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from bot.chat import Message, Transport
from bot.commands import Dispatcher

log = logging.getLogger(__name__)


@dataclass
class Router:
    dispatcher: Dispatcher
    max_room_lines: int = 4

    async def serve(self, transport: Transport) -> None:
        async def on_message(message: Message) -> None:
            await self.answer(transport, message)
        await transport.start(on_message)

    async def answer(self, transport: Transport, message: Message) -> None:
        try:
            response = await self.dispatcher.handle(message)
        except Exception:  # a bug must not take the front-end down
            log.exception("command %r from %s failed", message.text[:80], message.sender)
            response_lines = ["internal error; the bot's log has details"]
        else:
            response_lines = response.lines
            if response.durable:    # written to the outbox with the change it reports: sent from there
                return
        if not response_lines:      # nothing to say (a rate-limited user already told once)
            return
        if message.room is None:
            target: object = message.sender
        elif len(response_lines) > self.max_room_lines:
            await transport.send(message.room, f"{message.sender.nick}: {len(response_lines)} lines, "
                                               "sent to you privately")
            target = message.sender
        else:
            # In a room every answer is addressed, so people asking at once can tell theirs apart
            # (an answer is one send, so its lines stay together).
            target = message.room
            response_lines = [f"{message.sender.nick}: {response_lines[0]}", *response_lines[1:]]
        # One send per answer: the transport decides how lines travel (IRC: a line each,
        # XMPP: as few messages as the size limit allows).
        await transport.send(target, "\n".join(response_lines))  # type: ignore[arg-type]
