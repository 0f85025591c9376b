"""One incoming mail, read from its raw bytes: who sent it, what it answers,
what it asks for, and whether it must never be answered.  Pure: no I/O.

Mail is the most hostile input the bot sees, so nothing here raises on bad
input and every step's work is bounded: the input is cut at ``max_bytes``
(the mail is then refused as too large), at most ``MAX_PARTS`` MIME parts are
looked at, a body is decoded to at most ``MAX_TEXT`` characters and scanned
for at most ``MAX_SCAN_LINES`` lines.  Unknown and broken charsets decode
with replacement characters; HTML-only mail is reduced to its text with the
standard library's HTML parser (scripts, styles and ``<blockquote>`` quotes
dropped), never rendered.

The sender is the one addr-spec of the one ``From`` header.  Two ``From``
headers, none, a group or a list of addresses, an address two parsers read
differently, or a display name dressed as an address (``"alice@example.org"
<mallory@evil.test>`` is mallory) leave no sender and a reason.  This proves
nothing about who wrote the mail: ``verify`` and ``tokens`` do that.

``never_answer`` says why a mail must get no answer at all (RFC 3834): the
bot's own mail, an auto-reply, a bounce or a delivery report.  Answering
those is how two robots loop.
"""
from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from email import message_from_bytes
from email.header import decode_header
from email.headerregistry import Address, HeaderRegistry
from email.message import Message
from email.utils import getaddresses
from html.parser import HTMLParser
from typing import Callable, Collection, Iterable, Sequence

MAX_BYTES = 1_000_000           # the default size limit, as the listener's
MAX_PARTS = 50                  # MIME parts looked at
MAX_TEXT = 100_000              # characters of body text kept
MAX_SCAN_LINES = 1_000          # lines searched for the command / answer
MAX_LINE = 1_000                # characters of a command or answer line
MAX_COMMENT = 4_000             # characters of an answer's comment
MAX_HEADER = 2_000              # characters of an address or id header that is parsed

#: A plain internet address: a dot-atom local part and a host name.  Quoted
#: local parts, IP literals and non-ASCII addresses are refused: none is needed
#: to reach a person, and each has been used to make parsers disagree.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
ADDR_SPEC = re.compile(rf"^{_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                       rf"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+$")
_MSGID = re.compile(r"<([^<>\s]{1,500})>")
#: "Re:", "Fwd:", "AW:" (German Re), "WG:" (German Fwd), "SV:"/"VS:" (Nordic),
#: with an optional counter ("Re[2]:"), and "[list]" tags, in any order.
_SUBJECT_PREFIX = re.compile(r"^\s*(?:(?:re|fwd?|aw|wg|sv|vs|antw)\s*(?:\[\d+\]|\(\d+\))?\s*:|\[[^\[\]]{0,80}\])\s*",
                             re.IGNORECASE)
#: The line that introduces a quote: "On Mon, 1 Jan 2026, Alice <a@x> wrote:"
#: (and the German, French, Spanish, Italian, Dutch and Nordic forms), possibly
#: wrapped over up to three lines.
_ATTRIBUTION_START = re.compile(r"^\s*(?:on|am|le|el|il|op|den)\s\S", re.IGNORECASE)
_ATTRIBUTION = re.compile(r"^\s*(?:on|am|le|el|il|op|den)\s.{0,400}\b(?:wrote|schrieb|a écrit|escribió|ha scritto|"
                          r"schreef|skrev)\b.{0,200}:\s*$", re.IGNORECASE | re.DOTALL)
#: Lines after which everything is the quoted original (top-posting clients).
_QUOTE_START = re.compile(r"^\s*(?:-{2,}\s*(?:original message|forwarded message|ursprüngliche nachricht)\s*-{2,}|"
                          r"_{20,}|begin forwarded message:)\s*$", re.IGNORECASE)
_BOUNCE_SENDERS = ("mailer-daemon", "postmaster")


@dataclass(frozen=True)
class Mail:
    """What the bot reads from one mail (module docstring)."""

    message_id: str | None              # without the angle brackets; None if absent or malformed
    sender: str | None                  # the From addr-spec (domain lower-cased), or None: see sender_problem
    sender_problem: str | None          # why there is no sender
    subject: str                        # decoded, one line
    in_reply_to: tuple[str, ...]        # message ids, without brackets
    references: tuple[str, ...]
    recipients: tuple[str, ...]         # To, Cc and Delivered-To addr-specs, lower-cased, in that order
    auth_results: tuple[tuple[int, str], ...]   # Authentication-Results: (position among all headers, value)
    text: str                           # the body as plain text (bounded)
    command: str | None                 # the command: the subject if it is one, else the first body line
    command_source: str | None          # "subject" | "body" | None
    answer: str | None                  # for a question: the first body line that is not quoted ...
    comment: str                        # ... and the lines after it (signature and quotes left out)
    never_answer: str | None            # why no answer may be sent (a loop, an auto-reply, a bounce)
    refused: str | None                 # why the mail cannot be acted on (too large, no sender)
    size: int                           # bytes received
    notes: tuple[str, ...] = ()         # decoding trouble, for the one log line

    @property
    def sender_domain(self) -> str | None:
        return self.sender.rpartition("@")[2] if self.sender else None


def parse(raw: bytes, *, is_command: Callable[[str], bool], own_addresses: Collection[str] = (),
          own_id_domains: Collection[str] = (), envelope_from: str | None = None,
          max_bytes: int = MAX_BYTES) -> Mail:
    """``raw`` (the mail as received) read into a ``Mail``.  ``is_command``
    says whether a line is a command (the dispatcher's parser); the bot's own
    addresses (``bot@example.org``; its ``bot+token@`` forms count too) and
    the domains of the Message-IDs it makes mark its own mail.  ``envelope_from``
    is the SMTP sender when known ("" for a bounce's ``<>``).  Never raises."""
    size = len(raw)
    notes: list[str] = []
    too_large = size > max_bytes
    if too_large:
        raw = _headers_only(raw[:max_bytes])
    msg = message_from_bytes(raw)       # compat32: never raises, records defects
    sender, sender_problem = _sender(msg)
    subject = _subject(msg)
    recipients = _addresses(msg, ("to", "cc", "delivered-to"))
    own = {a.lower() for a in own_addresses}
    never = ("bounce (empty envelope sender)" if envelope_from == ""
             else _never_answer(msg, sender, own, {d.lower() for d in own_id_domains}))
    text = "" if too_large else _body_text(msg, notes)
    lines = text.split("\n", MAX_SCAN_LINES)[:MAX_SCAN_LINES]
    answer, comment = _first_line_and_rest(lines)
    command: str | None = None
    source: str | None = None
    stripped = strip_subject(subject)
    if stripped and is_command(stripped):
        command, source = stripped, "subject"
    elif answer is not None and is_command(answer):
        command, source = answer, "body"
    refused = (f"message too large (over {max_bytes} bytes)" if too_large
               else None if sender is not None else f"no usable sender: {sender_problem}")
    return Mail(message_id=_first_id(msg.get_all("message-id")), sender=sender, sender_problem=sender_problem,
                subject=subject, in_reply_to=_ids(msg.get_all("in-reply-to")),
                references=_ids(msg.get_all("references")), recipients=recipients,
                auth_results=tuple((n, _header_str(v)) for n, (k, v) in enumerate(msg.items())
                                   if k.lower() == "authentication-results"),
                text=text, command=command, command_source=source, answer=answer, comment=comment,
                never_answer=never, refused=refused, size=size, notes=tuple(notes))


def message_id_of(raw: bytes) -> str | None:
    """The Message-ID of a mail not yet parsed (only its headers are read), or
    None when it has none or two."""
    return _first_id(message_from_bytes(_headers_only(raw[:MAX_BYTES])).get_all("message-id"))


def strip_subject(subject: str) -> str:
    """The subject without its reply, forward and list prefixes."""
    previous = None
    while previous != subject:
        previous, subject = subject, _SUBJECT_PREFIX.sub("", subject, count=1)
    return subject.strip()


def is_own_address(address: str, own_addresses: Collection[str]) -> bool:
    """``address`` is one of the bot's (``bot@d``), or a ``bot+anything@d`` form of one."""
    address = address.lower()
    if address in own_addresses:
        return True
    local, _, domain = address.rpartition("@")
    base = local.split("+", 1)[0]
    return "+" in local and f"{base}@{domain}" in own_addresses


# -- headers -----------------------------------------------------------------

def _header_str(value: object) -> str:
    """A header as text: compat32 hands non-ASCII headers over as ``Header``
    objects whose bytes are not decodable; str() gives their surrogate-free form."""
    try:
        text = str(value)
    except Exception:
        return ""
    return text.encode("utf-8", "replace").decode("utf-8")


def _sender(msg: Message) -> tuple[str | None, str | None]:
    values = msg.get_all("from") or []
    if not values:
        return None, "no From header"
    if len(values) > 1:
        return None, f"{len(values)} From headers"
    value = _header_str(values[0])
    if len(value) > MAX_HEADER:
        return None, "From header too long"
    pairs = [p for p in getaddresses([value]) if p != ("", "")]
    if len(pairs) != 1:
        return None, "From header holds no address" if not pairs else f"From header holds {len(pairs)} addresses"
    address = pairs[0][1]
    if not ADDR_SPEC.match(address):
        return None, "From address is not a plain address (local@domain)"
    try:   # the standard library's strict RFC 5322 parser must read the same single address
        strict: tuple[Address, ...] = tuple(getattr(HeaderRegistry()("from", value), "addresses", ()))
    except Exception:
        strict = ()
    if len(strict) != 1 or strict[0].addr_spec.lower() != address.lower():
        return None, "From header is ambiguous (parsers disagree on its address)"
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}", None


def _addresses(msg: Message, names: Iterable[str]) -> tuple[str, ...]:
    found: list[str] = []
    for name in names:
        for value in msg.get_all(name) or []:
            text = _header_str(value)[:MAX_HEADER * 5]
            for _, address in getaddresses([text]):
                address = address.lower()
                if ADDR_SPEC.match(address) and address not in found:
                    found.append(address)
    return tuple(found[:100])


def _ids(values: Sequence[object] | None) -> tuple[str, ...]:
    ids: list[str] = []
    for value in values or []:
        ids += _MSGID.findall(_header_str(value)[:MAX_HEADER * 10])
    return tuple(ids[:100])


def _first_id(values: Sequence[object] | None) -> str | None:
    if not values or len(values) != 1:
        return None                      # none, or two: no trustworthy key from this header
    ids = _ids(values)
    return ids[0] if ids else None


def _subject(msg: Message) -> str:
    value = msg.get_all("subject") or [""]
    raw = _header_str(value[0])[:MAX_HEADER]
    try:
        parts = decode_header(raw)
    except Exception:
        parts = [(raw, None)]
    text = "".join(_decode(chunk, charset) if isinstance(chunk, bytes) else chunk for chunk, charset in parts)
    return " ".join(text.split())[:MAX_LINE]


def _never_answer(msg: Message, sender: str | None, own: set[str], own_id_domains: set[str]) -> str | None:
    auto = _header_str(msg.get("auto-submitted", "")).split(";")[0].strip().lower()
    if auto and auto != "no":
        return f"auto-submitted ({auto[:40]})"
    precedence = _header_str(msg.get("precedence", "")).strip().lower()
    if precedence in ("bulk", "junk", "list"):
        return f"Precedence: {precedence}"
    for name in ("x-autoreply", "x-autorespond", "x-auto-response-suppress"):
        value = _header_str(msg.get(name, "")).strip().lower()
        if value and value not in ("no", "none"):
            return f"auto-reply ({name})"
    return_path = msg.get_all("return-path") or []
    if any(_header_str(v).strip() in ("<>", "") for v in return_path):
        return "bounce (empty Return-Path)"
    if msg.get_content_type() == "multipart/report":
        return "delivery or read report (multipart/report)"
    if sender is not None:
        local = sender.rpartition("@")[0].lower()
        if local in _BOUNCE_SENDERS:
            return f"bounce (from {local})"
        if is_own_address(sender, own):
            return "the bot's own mail (From)"
    message_id = _first_id(msg.get_all("message-id"))
    if message_id and message_id.rpartition("@")[2].lower() in own_id_domains:
        return "the bot's own mail (Message-ID)"
    return None


def _headers_only(raw: bytes) -> bytes:
    """The header block of a cut-off mail (its body is not read)."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = raw.find(sep)
        if end >= 0:
            return raw[:end + len(sep)]
    return raw


# -- the body ----------------------------------------------------------------

def _decode(data: bytes, charset: str | None) -> str:
    """Bytes in a declared charset, with replacement characters for what does
    not decode; an unknown or non-text codec falls back to UTF-8."""
    name = (charset or "utf-8").strip().strip('"').lower()
    try:
        if not codecs.lookup(name)._is_text_encoding:       # base64_codec, zlib_codec, rot13 ...
            name = "utf-8"
    except (LookupError, TypeError, ValueError):
        name = "utf-8"
    try:
        return data.decode(name, "replace")
    except Exception:
        return data.decode("utf-8", "replace")


def _parts(msg: Message) -> list[Message]:
    parts: list[Message] = []
    stack = [msg]
    while stack and len(parts) < MAX_PARTS:
        part = stack.pop(0)
        parts.append(part)
        payload = part.get_payload() if part.is_multipart() else None
        if isinstance(payload, list):
            stack.extend(p for p in payload if isinstance(p, Message))
    return parts


def _body_text(msg: Message, notes: list[str]) -> str:
    """The first inline text/plain part; else the first text/html one, as text."""
    html: Message | None = None
    for part in _parts(msg):
        if part.is_multipart():
            continue
        if _header_str(part.get("content-disposition", "")).strip().lower().startswith("attachment"):
            continue
        kind = part.get_content_type()
        if kind == "text/plain":
            return _normalise(_payload_text(part, notes))
        if kind == "text/html" and html is None:
            html = part
    if html is not None:
        notes.append("HTML only")
        return _normalise(html_to_text(_payload_text(html, notes)))
    return ""


def _payload_text(part: Message, notes: list[str]) -> str:
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    if not isinstance(data, bytes):
        notes.append("undecodable body")
        return ""
    data = data[:MAX_TEXT * 4]
    charset = part.get_content_charset()
    text = _decode(data, charset)
    if "\ufffd" in text:
        notes.append(f"charset {str(charset)[:30]!r} did not decode cleanly")
    return text[:MAX_TEXT]


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")[:MAX_TEXT]


class _TextOfHtml(HTMLParser):
    SKIP = {"script", "style", "head", "title", "blockquote"}
    BREAK = {"br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "table", "hr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BREAK:
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BREAK:
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.out.append(data)


def html_to_text(html: str) -> str:
    """The text of an HTML body, one line per block; quotes, scripts and styles dropped."""
    parser = _TextOfHtml()
    try:
        parser.feed(html[:MAX_TEXT * 4])
        parser.close()
    except Exception:
        pass
    lines = ("".join(parser.out)).split("\n")
    return "\n".join(" ".join(line.split()) for line in lines)[:MAX_TEXT]


def _first_line_and_rest(lines: list[str]) -> tuple[str | None, str]:
    """The first line the sender wrote (not quoted, not an attribution, not
    signature) and the lines they wrote after it."""
    mine: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if line == "--" or _QUOTE_START.match(line):
            break                                        # a signature, or the quoted original below
        if line.lstrip().startswith(">"):
            i += 1
            continue
        if _ATTRIBUTION_START.match(line):
            span = _attribution_span(lines, i)
            if span:
                i += span
                continue
        mine.append(line.strip())
        i += 1
    while mine and not mine[0]:
        mine.pop(0)
    if not mine:
        return None, ""
    first = mine[0][:MAX_LINE]
    comment = "\n".join(mine[1:]).strip()
    return first, comment[:MAX_COMMENT]


def _attribution_span(lines: list[str], start: int) -> int:
    """How many lines from ``start`` make an attribution ("On ... wrote:"), or 0."""
    for count in (1, 2, 3):
        if start + count > len(lines):
            break
        if _ATTRIBUTION.match(" ".join(l.strip() for l in lines[start:start + count])):
            return count
    return 0
