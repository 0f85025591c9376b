"""Checking a snapshot's metadata before it is published: the expected files
are there, and every file ``repomd.xml`` lists has the checksum it states.

Works on a local directory: the snapshot itself for a local destination, or
the metadata fetched back from a remote one (what was written there, not
what was meant to be).
"""
from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

_PLAIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]*(/[A-Za-z0-9_][A-Za-z0-9._+-]*)*$")
ALGORITHMS = {"sha": "sha1", "sha1": "sha1", "sha224": "sha224", "sha256": "sha256", "sha384": "sha384",
              "sha512": "sha512", "md5": "md5"}


@dataclass(frozen=True)
class Listed:
    href: str
    algorithm: str
    digest: str


def listed(repomd: bytes) -> list[Listed]:
    """The files a ``repomd.xml`` lists with their checksums.  Raises ValueError."""
    try:
        root = ET.fromstring(repomd)
    except ET.ParseError as exc:
        raise ValueError(f"repomd.xml does not parse: {exc}") from None
    found = []
    for data in root:
        if _local(data.tag) != "data":
            continue
        checksum = next((c for c in data if _local(c.tag) == "checksum"), None)
        location = next((c for c in data if _local(c.tag) == "location"), None)
        if checksum is None or location is None or not location.get("href"):
            raise ValueError(f"repomd.xml: data {data.get('type', '?')!r} lacks a checksum or a location")
        href = str(location.get("href"))
        parts = href.split("/")
        if not _PLAIN.match(href) or any(p in (".", "..") for p in parts):
            raise ValueError(f"repomd.xml: location {href!r} is not a plain path inside the repository")
        algorithm = ALGORITHMS.get((checksum.get("type") or "").lower())
        if algorithm is None:
            raise ValueError(f"repomd.xml: unknown checksum type {checksum.get('type')!r} for {href}")
        found.append(Listed(href, algorithm, (checksum.text or "").strip().lower()))
    return found


def check(root: Path, expected: Sequence[str], entries: Sequence[Listed]) -> list[str]:
    """Problems: expected files missing, listed files missing or with another checksum."""
    problems = [f"{name} is missing" for name in expected if not (root / name).is_file()]
    for entry in entries:
        path = root / entry.href
        if not path.is_file():
            problems.append(f"{entry.href} (listed in repomd.xml) is missing")
            continue
        digest = hashlib.new(entry.algorithm)
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != entry.digest:
            problems.append(f"{entry.href}: {entry.algorithm} is {digest.hexdigest()[:16]}..., "
                            f"repomd.xml says {entry.digest[:16]}...")
    return problems


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]
