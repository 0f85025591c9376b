"""Connects front-ends to the dispatcher and sends replies back where the
command came from; long output in a room goes to the caller privately."""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from bot.chat import Message, Transport
from bot.commands import Dispatcher, Response
from notifiers.destinations import Address

log = logging.getLogger(__name__)


@dataclass
class Router:
    dispatcher: Dispatcher
    max_room_lines: int = 4
    outbox: Any = None            # mail is answered through it (notifiers.outbox.Outbox)

    async def serve(self, transport: Transport) -> None:
        async def on_message(message: Message) -> None:
            await self.answer(transport, message)
        await transport.start(on_message)

    async def answer(self, transport: Transport, message: Message) -> None:
        if message.sender.protocol == "email":
            await self.answer_mail(message)
            return
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

    async def answer_mail(self, message: Message) -> None:
        """A mail: the reply goes through the outbox to the user's configured
        address, in the mail's thread, written with the mail's handled mark
        (unless the command's effect already wrote both, or the mark)."""
        outbox = self.outbox
        if outbox is None:
            raise RuntimeError("mail needs the outbox")
        user = message.sender.account
        if message.refusal:
            lines, marked = [f"Your mail was not acted on: {message.refusal}"], False
        else:
            try:
                response = await self.dispatcher.handle(message)
            except Exception:
                log.exception("mailed command %r from %s failed", message.text[:80], message.sender)
                response = Response(["internal error; the bot's log has details"], ok=False)
            if response.durable:          # reply and mark were written with the change
                return
            lines, marked = response.lines, response.consumed
            known = self.dispatcher.directory.resolve(message.sender).user
            user = known.name if known is not None else None
        ops: list[Any] = [] if marked else list(message.commit_with)
        if lines and user:
            thread = (message.thread,) if message.thread else ()
            cause = f"mail {message.thread or uuid.uuid4().hex}"
            try:
                ops += outbox.rows(cause, [Address("user", message.sender.network, user)], "\n".join(lines),
                                   subject=f"Re: {message.text[:60] or 'your mail'}", in_reply_to=message.thread,
                                   references=thread, origin=f"reply to mail from {user}")
            except Exception as exc:      # the claimed user has no address here: nobody to tell
                log.info("mail from %s: no reply (%s)", message.sender.handle, exc)
        if ops:
            await outbox.storage.write(*ops)
            outbox.wake()
