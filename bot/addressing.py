"""Which chat lines are commands for the bot, the same on every network.

A line is for the bot when it starts with the command prefix (``!ps``, and
``! ps`` too), when it is addressed to the bot by nick in a room
(``releasebot: ps``, ``releasebot, ps``), or when it is a private message
(every private line is a command; a leading prefix is dropped there too).
A prefix or an address with nothing after it is still for the bot: the
answer is a hint, within the sender's rate limit.
"""
from __future__ import annotations

from typing import Callable

#: Returned for a line addressed to the bot with no command in it: answer with a hint.
EMPTY = ""


def command_text(text: str, prefix: str, *, in_room: bool,
                 is_own_nick: Callable[[str], bool]) -> str | None:
    """The command in ``text`` with its addressing stripped, ``EMPTY`` for a
    bare prefix or address, or None when the line is not for the bot.

    ``is_own_nick`` compares a candidate with the bot's nick by the network's
    rules (IRC case mapping, XMPP room nick)."""
    stripped = text.strip()
    if prefix and stripped.startswith(prefix):
        return stripped[len(prefix):].strip()
    if not in_room:
        return stripped or None
    for sep in (":", ","):
        head, found, rest = stripped.partition(sep)
        if found and head.strip() and is_own_nick(head.strip()):
            return rest.strip()
    return None
