"""One outgoing mail, built with the standard library's ``email`` package.

The headers a receiver needs to thread, deduplicate and not answer the bot:
From, To, Subject, Date, Message-ID (the outbox's, stable across retries, so
a receiver drops a repeat), In-Reply-To and References, Reply-To (a
single-use reply address) and ``Auto-Submitted: auto-generated`` (RFC 3834:
vacation responders and other robots must not reply, so two robots cannot
loop).  The body is UTF-8 in quoted-printable or base64, whichever is
shorter, so no server needs 8BITMIME; it is sent whole however long it is.

Header injection is impossible: an address or message id with anything but
one plain ``local@domain`` in it is refused (``BadMessage``), and a subject
has every run of whitespace (newlines included) folded into one space.
Addresses are ASCII: an internationalised address would need SMTPUTF8 from
every server on the way, which the bot does not ask for.
"""
from __future__ import annotations

import re
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from datetime import datetime, timezone
from typing import Iterable

from bot.chat import Outgoing

#: SMTP line ends, every header encoded for 7-bit transport; the body's transfer
#: encoding is chosen for 7 bits too (quoted-printable or base64).
POLICY = policy.SMTP.clone(cte_type="7bit")
#: A subject made from the text's first line keeps at most this many characters.
SUBJECT_CHARS = 120
AUTO_SUBMITTED = "auto-generated"

_ONE_ADDRESS = "expected one address like name@example.org"
_ADDR_SPEC = re.compile(r"^[^@\s]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")   # a domain name, no IP literal
_MSGID = re.compile(r"^<?([^<>@\s\"\\,;()\[\]]+@[^<>@\s\"\\,;()\[\]]+)>?$")


class BadMessage(ValueError):
    """A message that cannot be built as asked (a malformed address or id)."""


def mailbox(value: str) -> Address | str:
    """``value`` as one mailbox (``bot@example.org`` or ``Release Bot
    <bot@example.org>``), or the reason it is not one."""
    if not value.isprintable():
        return "contains control characters (a newline, a tab, ...)"
    if not value.isascii():
        return "only ASCII addresses are supported (an internationalised address needs SMTPUTF8)"
    try:
        header = POLICY.header_factory("To", value)
    except Exception:   # the parser raises on some malformed input (IndexError for "a@") instead of a defect
        return _ONE_ADDRESS
    addresses = header.addresses         # an AddressHeader, for "To"
    if header.defects or len(addresses) != 1:
        return _ONE_ADDRESS
    address: Address = addresses[0]
    if not _ADDR_SPEC.match(address.addr_spec):
        return _ONE_ADDRESS
    return address


def address_problem(value: str, *, display_name: bool = False) -> str | None:
    """Why ``value`` is not a usable address (None if it is); a display name
    (``Name <addr>``) only where ``display_name`` allows one."""
    parsed = mailbox(value)
    if isinstance(parsed, str):
        return parsed
    if parsed.display_name and not display_name:
        return "expected a bare address like name@example.org"
    return None


def _address(value: str, what: str) -> Address:
    parsed = mailbox(value)
    if isinstance(parsed, str):
        raise BadMessage(f"{what} {value!r}: {parsed}")
    return parsed


def _msgid(value: str, what: str) -> str:
    """``<id@host>``; brackets are added when missing."""
    match = _MSGID.match(value) if value.isprintable() and value.isascii() else None
    if match is None:
        raise BadMessage(f"{what} {value!r}: expected a message id like <id@example.org>")
    return f"<{match.group(1)}>"


def subject_of(message: Outgoing) -> str:
    """The subject asked for, else the text's first non-blank line (shortened);
    whitespace runs, newlines included, become one space."""
    if message.subject.strip():
        return " ".join(message.subject.split())
    for line in message.text.splitlines():
        if line.strip():
            words = " ".join(line.split())
            return words if len(words) <= SUBJECT_CHARS else words[:SUBJECT_CHARS - 1].rstrip() + "…"
    return "(no subject)"


def build(sender: Address, recipients: Iterable[str], message: Outgoing, *,
          now: datetime | None = None) -> EmailMessage:
    """The message for ``recipients`` from ``sender`` (the configured ``from``).
    Raises ``BadMessage`` for a malformed recipient, reply address or id."""
    to = [_address(r, "recipient") for r in recipients]
    if not to:
        raise BadMessage("no recipient address")
    mail = EmailMessage(policy=POLICY)
    mail["From"] = sender
    mail["To"] = to
    mail["Subject"] = subject_of(message)
    mail["Date"] = format_datetime(now or datetime.now(timezone.utc))
    mail["Message-ID"] = (_msgid(message.message_id, "message id") if message.message_id
                          else make_msgid(domain=sender.domain))
    if message.in_reply_to:
        mail["In-Reply-To"] = _msgid(message.in_reply_to, "in-reply-to")
    if message.references:
        mail["References"] = " ".join(_msgid(r, "reference") for r in message.references)
    if message.reply_to:
        mail["Reply-To"] = _address(message.reply_to, "reply-to")
    mail["Auto-Submitted"] = AUTO_SUBMITTED
    mail.set_content(message.text, charset="utf-8")
    return mail


def envelope(mail: EmailMessage) -> tuple[str, tuple[str, ...], bytes]:
    """What goes over SMTP: MAIL FROM, the RCPT TO addresses, and the DATA bytes."""
    sender = mail["From"].addresses[0].addr_spec
    recipients = tuple(a.addr_spec for a in mail["To"].addresses)
    return sender, recipients, mail.as_bytes(policy=POLICY)
