"""How chat text becomes XMPP message bodies: lines cut to a size limit,
then packed so that consecutive lines share a message while they fit."""
from __future__ import annotations


def split_lines(text: str, limit: int) -> list[str]:
    """``text``'s lines, none longer than ``limit``: an overlong line is cut at
    its last space within the limit (that one space becomes the break) or,
    failing that, hard at the limit.  Nothing is dropped but empty lines."""
    pieces: list[str] = []
    for line in text.splitlines():
        while len(line) > limit:
            space = line.rfind(" ", 1, limit + 1)
            if space > 0:
                pieces.append(line[:space])
                line = line[space + 1:]
            else:
                pieces.append(line[:limit])
                line = line[limit:]
        if line:
            pieces.append(line)
    return pieces


def pack(lines: list[str], limit: int) -> list[str]:
    """Message bodies of at most ``limit`` characters carrying ``lines`` (each
    at most ``limit`` long) in order; a message breaks only between lines."""
    out: list[str] = []
    for line in lines:
        if out and len(out[-1]) + 1 + len(line) <= limit:
            out[-1] += "\n" + line
        else:
            out.append(line)
    return out


def split_text(text: str, limit: int) -> list[str]:
    """Messages of at most ``limit`` characters carrying ``text``'s lines."""
    return pack(split_lines(text, limit), limit)
