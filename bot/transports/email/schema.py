"""The email front-end's own tables in the bot's database, owner ``email``.

The app runs ``MIGRATIONS`` once at start with
``store.migrate_participant(OWNER, MIGRATIONS)`` and hands the modules an
``engine.participant_runtime.Storage(store, OWNER)``.  They see it through
the ``Storage`` protocol below, so the front-end does not import the engine's
runtime: its writes are ``Op``s, written alone (``Storage.write``) or in the
commit of whatever a mail causes, so that a mail's effect and its mark
("this token is spent", "this mail is handled") are durable together.

Append new migrations; never edit one that has shipped.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

OWNER = "email"
Op = tuple[str, Sequence[Any], bool]      # engine.store.Op: (sql, params, executemany)

MIGRATIONS: list[str] = [
    # 1: single-use reply addresses, and the inbox every accepted mail is written to first
    """
    CREATE TABLE email_tokens (
        token TEXT PRIMARY KEY,          -- lower-case letters and digits
        user TEXT NOT NULL,
        purpose TEXT NOT NULL CHECK (purpose IN ('thread', 'question')),
        ref TEXT NOT NULL,               -- what it refers to: an instance, a question's workitem
        created REAL NOT NULL,
        expires REAL NOT NULL,
        used_at REAL,                    -- the first valid use
        used_by TEXT,                    -- the key of the mail that used it first
        uses INTEGER NOT NULL DEFAULT 0,
        -- a question is answered once: a second spend fails the commit it is in
        CHECK (purpose = 'thread' OR uses <= 1)
    );
    CREATE INDEX email_tokens_expires ON email_tokens(expires);
    CREATE TABLE email_inbox (
        id INTEGER PRIMARY KEY,
        key TEXT NOT NULL UNIQUE,        -- mid:<Message-ID>, imap:<uidvalidity>:<uid> or sha256:<digest>
        source TEXT NOT NULL,            -- imap | smtp
        envelope_from TEXT,
        envelope_to TEXT NOT NULL DEFAULT '',   -- comma-separated
        raw BLOB NOT NULL,
        received REAL NOT NULL,
        handled INTEGER NOT NULL DEFAULT 0 CHECK (handled <= 1),   -- handled twice fails the commit
        handled_at REAL,
        outcome TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX email_inbox_pending ON email_inbox(id) WHERE handled = 0;
    """,
]


class Storage(Protocol):
    """What the front-end uses of ``engine.participant_runtime.Storage``."""

    def op(self, sql: str, *params: Any) -> Op: ...

    async def write(self, *ops: Op) -> None: ...

    async def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]: ...

    async def query_one(self, sql: str, *params: Any) -> tuple[Any, ...] | None: ...
