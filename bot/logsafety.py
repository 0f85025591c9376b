"""User-controlled text made safe for logs, once for the whole bot.

Anything a user controls (fields, nicks, JIDs, room names, mail headers) can
carry a newline, CR, ESC or BEL.  Written raw, ``x\\n2026-12-06 15:00:00,000
CRITICAL ...`` forges a log record and ESC sequences repaint a terminal.  The
bot's log handlers format records with ``SafeFormatter``: control characters
in a record's message are written as visible escapes (``\\n``, ``\\x1b``), so
one record is one line; a traceback keeps its own line breaks, but every line
after the first is indented with ``  | `` so that nothing in it can look like
a record of its own.  ``install`` puts it on the root logger's handlers.
"""
from __future__ import annotations

import logging

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(ch: str) -> str:
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str, keep_newlines: bool = False) -> str:
    """Every non-printable character as a visible escape (newlines kept if asked)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or (keep_newlines and ch == "\n") else _visible(ch) for ch in text)


def sanitise(text: str, limit: int = 200) -> str:
    """User text for a log line or a reply: no control characters, bounded."""
    clean = escape_controls(text)
    return clean if len(clean) <= limit else clean[:limit] + "..."


CONTINUATION = "\n  | "


class SafeFormatter(logging.Formatter):
    """A ``logging.Formatter`` whose output cannot be split into forged records."""

    def format(self, record: logging.LogRecord) -> str:
        # Another handler may have cached its own, unindented traceback text on the record.
        cached = record.exc_text
        record.exc_text = None
        try:
            return super().format(record)
        finally:
            record.exc_text = cached

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: object) -> str:
        return self._indent(super().formatException(ei))  # type: ignore[arg-type]  # logging's own ExcInfo type

    def formatStack(self, stack_info: str) -> str:
        return self._indent(super().formatStack(stack_info))

    @staticmethod
    def _indent(text: str) -> str:
        return escape_controls(text, keep_newlines=True).replace("\n", CONTINUATION)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def install(root: logging.Logger | None = None) -> None:
    """Format every handler of ``root`` (default: the root logger) safely."""
    for handler in (root or logging.getLogger()).handlers:
        handler.setFormatter(SafeFormatter(LOG_FORMAT))
