"""IRC text: comparing nicks and channels the server's way, and cutting
output into lines that fit the protocol's 512 bytes."""
from __future__ import annotations

from typing import Callable

IRC_LINE_BYTES = 512            # including CR LF (RFC 1459 / 2812)
MAX_HOST = 63                   # assumed for our own host until the server tells us

Fold = Callable[[str], str]

_UPPER, _LOWER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz"
_TABLES = {
    "ascii": str.maketrans(_UPPER, _LOWER),
    "strict-rfc1459": str.maketrans(_UPPER + "[]\\", _LOWER + "{}|"),
    "rfc1459": str.maketrans(_UPPER + "[]\\~", _LOWER + "{}|^"),
}


def casefolder(casemapping: str) -> Fold:
    """Nick/channel comparison per the server's ISUPPORT CASEMAPPING (rfc1459 by default)."""
    table = _TABLES.get(casemapping, _TABLES["rfc1459"])
    return lambda s: s.translate(table)


def split_utf8(text: str, limit: int) -> tuple[str, str]:
    """(head, rest): head fits in ``limit`` bytes of UTF-8 and never ends inside
    a character; a break at a space is preferred (that one space is dropped)."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text, ""
    cut = max(limit, 1)
    while cut > 0 and (data[cut] & 0xC0) == 0x80:     # a continuation byte: back up
        cut -= 1
    if cut == 0:                                       # limit smaller than one character
        cut = len(text[0].encode("utf-8"))
    head = data[:cut].decode("utf-8")
    space = head.rfind(" ")
    if space > len(head) * 2 // 3:
        return head[:space], text[space + 1:]
    return head, text[len(head):]


def split_all(text: str, limit: int) -> list[str]:
    """``text`` as consecutive pieces of at most ``limit`` bytes (``split_utf8``)."""
    pieces = []
    while True:
        head, text = split_utf8(text, limit)
        pieces.append(head)
        if not text:
            return pieces


def clean_lines(text: str) -> list[str]:
    """One IRC line per line of text; NUL cannot travel, blank lines carry nothing."""
    return [line.replace("\x00", "\ufffd") for line in text.splitlines() if line.strip()]


def text_budget(nick: str, user: str, host: str | None, command: str, target: str) -> int:
    """Bytes of text that fit in one line as the server relays it, with the
    sender's nick!user@host in front (unknown host: assume the longest)."""
    prefix = f":{nick}!{user}@{host or 'x' * MAX_HOST} {command} {target} :"
    return IRC_LINE_BYTES - 2 - len(prefix.encode("utf-8"))
