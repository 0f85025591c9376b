"""Changelog entries and the bug references in them: which bugs a change
*fixes* and which it only *mentions*.

Input is RPM ``%changelog`` text (``rpm -qp --changelog``, a spec file's
section) or an openSUSE ``.changes`` file, newest entry first::

    * Mon Nov 20 2026 Name <mail> - 1.2-3          -------------------------------------------
    - Fixes: BMC#1, BMC#2                           Mon Nov 20 12:00:00 UTC 2026 - name@mail
    - Related: BMC#3                                - Resolves rhbz#123456

The rule for fixed (and its reason): a reference is **fixed** when it comes
directly after one of its tracker's trigger words (any case, whole word, an
optional colon), or continues such a list: references joined by commas,
``and``, ``&`` or white space.  Any other word ends the list.  So
``Fixes BMC#1, BMC#2 and BMC#3`` fixes all three, while ``Fixes a crash
(BMC#4)``, ``Related: BMC#5`` and ``Fixes BMC#6; see BMC#7`` (for BMC#7)
only mention.  A list may wrap onto the next line of its item.  An item that
starts with "Revert" fixes nothing (``Revert "Fixes BMC#3"``).  Every other
reference is **mentioned**; a bug both fixed and mentioned is fixed.  A
closed bug that was only mentioned must never be closed, so when in doubt the
rule says "mentioned".
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

_RPM_HEADER = re.compile(r"^\*\s+(?P<head>.*?)(?:\s+-\s+(?P<version>\S+))?\s*$")
_CHANGES_RULE = re.compile(r"^-{10,}\s*$")
_ITEM = re.compile(r"^\s*[-*+]\s+")
_REVERT = re.compile(r"^\W*revert", re.IGNORECASE)
_SEPARATOR = re.compile(r"(?:\s*,\s*(?:and\s+)?|\s+(?:and|&)\s+|\s*&\s*|\s+)", re.IGNORECASE)


@dataclass(frozen=True)
class Entry:
    """One changelog entry: its header line, the version it names (RPM style), its items."""

    header: str
    version: str
    items: tuple[str, ...]


@dataclass(frozen=True)
class Syntax:
    """How one tracker's references look: its compiled regex (group ``key``) and trigger words."""

    name: str
    reference: re.Pattern[str]
    triggers: frozenset[str]        # lower case


@dataclass(frozen=True)
class Reference:
    tracker: str
    key: str                        # what the ``key`` group matched (a bug number, normally)
    text: str                       # the whole reference, as written (``BMC#1``)
    fixed: bool
    item: str                       # the changelog item it is in


@dataclass
class Referenced:
    """One bug's references from all packages: fixed if any of them fixes it."""

    tracker: str
    bug: int
    text: str
    fixed: bool = False
    packages: dict[str, tuple[str, list[str]]] = field(default_factory=dict)   # name -> (version, items)


def parse(text: str) -> list[Entry]:
    """Entries newest first, in either format; text before the first header
    (or text with no header at all) is one entry without a header."""
    entries: list[Entry] = []
    header, version = "", ""
    lines: list[str] = []
    started = False
    pending_changes_header = False

    def close() -> None:
        if started or any(line.strip() for line in lines):
            entries.append(Entry(header, version, tuple(_items(lines))))

    for line in text.splitlines():
        if _CHANGES_RULE.match(line):
            close()
            header, version, lines, started = "", "", [], True
            pending_changes_header = True
            continue
        if pending_changes_header and line.strip():
            header, pending_changes_header = line.strip(), False
            continue
        rpm = _RPM_HEADER.match(line) if line.startswith("*") else None
        if rpm is not None:
            close()
            header, version, lines, started = rpm.group("head"), rpm.group("version") or "", [], True
            continue
        lines.append(line)
    close()
    return entries


def _items(lines: Sequence[str]) -> list[str]:
    """Items: a line starting with ``-`` begins one, other non-blank lines continue it."""
    items: list[str] = []
    for line in lines:
        if not line.strip():
            continue
        if _ITEM.match(line) or not items:
            items.append(_ITEM.sub("", line, count=1).strip())
        else:
            items[-1] += " " + line.strip()
    return items


def references(items: Iterable[str], syntaxes: Sequence[Syntax]) -> list[Reference]:
    """Every reference of every tracker in ``items``, fixed or mentioned (module docstring)."""
    found: list[Reference] = []
    triggers = sorted({t for s in syntaxes for t in s.triggers}, key=len, reverse=True)
    trigger_re = (re.compile(r"(?<!\w)(" + "|".join(re.escape(t) for t in triggers) + r")(?!\w)\s*:?\s*",
                             re.IGNORECASE) if triggers else None)
    for item in items:
        text = " ".join(item.split())
        spans: list[tuple[int, int, Syntax, str]] = []
        for syntax in syntaxes:
            for match in syntax.reference.finditer(text):
                if match.end() > match.start():
                    spans.append((match.start(), match.end(), syntax, match.group("key")))
        spans.sort(key=lambda s: (s[0], -s[1]))
        kept: list[tuple[int, int, Syntax, str]] = []
        for span in spans:               # overlapping matches: the earliest (then longest) wins
            if not kept or span[0] >= kept[-1][1]:
                kept.append(span)
        by_start = {s[0]: i for i, s in enumerate(kept)}
        fixed: set[int] = set()
        for trigger in trigger_re.finditer(text) if trigger_re and not _REVERT.match(text) else ():
            word = trigger.group(1).lower()
            index = by_start.get(trigger.end())
            while index is not None:
                start, end, syntax, _key = kept[index]
                if word in syntax.triggers:
                    fixed.add(index)
                gap = _SEPARATOR.match(text, end)
                index = by_start.get(gap.end()) if gap and gap.end() > end else None
        for i, (start, end, syntax, key) in enumerate(kept):
            found.append(Reference(syntax.name, key, text[start:end], i in fixed, text))
    return found


@dataclass(frozen=True)
class PackageLog:
    package: str
    version: str
    text: str


def collect(logs: Sequence[PackageLog], syntaxes: Sequence[Syntax], entries: int | None = None
            ) -> tuple[dict[tuple[str, int], Referenced], list[str]]:
    """The bugs referenced by the newest ``entries`` entries (None: all) of
    each package, one ``Referenced`` per (tracker, bug), in order of first
    appearance; and messages about references that are not bug numbers."""
    bugs: dict[tuple[str, int], Referenced] = {}
    messages: list[str] = []
    for log in logs:
        chosen = parse(log.text)
        if entries is not None:
            chosen = chosen[:entries]
        for entry in chosen:
            version = log.version or entry.version
            for ref in references(entry.items, syntaxes):
                if not (ref.key.isascii() and ref.key.isdigit()) or int(ref.key) == 0:
                    messages.append(f"{ref.text} in {log.package}: {ref.key!r} is not a bug number; ignored")
                    continue
                bug = int(ref.key)
                seen = bugs.setdefault((ref.tracker, bug), Referenced(ref.tracker, bug, ref.text))
                seen.fixed = seen.fixed or ref.fixed
                _version, items = seen.packages.setdefault(log.package, (version, []))
                if ref.item not in items:
                    items.append(ref.item)
    return bugs, messages


def syntax(name: str, pattern: str, triggers: Iterable[str]) -> Syntax:
    return Syntax(name, re.compile(pattern), frozenset(t.lower() for t in triggers))


def by_tracker(bugs: Mapping[tuple[str, int], Referenced]) -> dict[str, list[Referenced]]:
    grouped: dict[str, list[Referenced]] = {}
    for (tracker, _bug), ref in bugs.items():
        grouped.setdefault(tracker, []).append(ref)
    return grouped
