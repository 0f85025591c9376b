"""Test repository trees whose every file carries its snapshot's marker, and
the consistency reader: it resolves ``current`` once per walk, reads every
file of that tree, and counts walks that saw more than one marker (or a file
without one).  Plain Python, so ``bench/publish.py`` uses the same reader."""
from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from pathlib import Path

MARKER = re.compile(rb"marker:(\S+)")
_TICK = int(time.time()) - 100_000


def write_tree(src: Path, marker: str, packages: int = 20, changed: int | None = None, size: int = 64) -> None:
    """``Packages/p<N>.rpm`` and ``repodata/`` (a primary file and ``repomd.xml``
    with its sha256), every file starting with ``marker:<marker>``.  ``changed``:
    rewrite only the first ``changed`` packages (and the metadata).  Each call
    stamps what it writes with a new whole second (rsync's quick check)."""
    global _TICK
    _TICK += 2
    (src / "Packages").mkdir(parents=True, exist_ok=True)
    (src / "repodata").mkdir(parents=True, exist_ok=True)
    written = []
    for n in range(packages if changed is None else changed):
        body = f"marker:{marker}\npackage {n}\n".encode()
        path = src / "Packages" / f"p{n:05d}.rpm"
        path.write_bytes(body + b"x" * max(0, size - len(body)))
        written.append(path)
    primary = f"marker:{marker}\n" + "".join(f"p{n:05d}.rpm\n" for n in range(packages))
    for old in (src / "repodata").glob("*-primary.xml"):
        old.unlink()
    digest = hashlib.sha256(primary.encode()).hexdigest()
    (src / "repodata" / f"{digest[:12]}-primary.xml").write_text(primary)
    (src / "repodata" / "repomd.xml").write_text(
        f"<!-- marker:{marker} -->\n"
        '<repomd xmlns="http://linux.duke.edu/metadata/repo">\n'
        f'  <data type="primary"><checksum type="sha256">{digest}</checksum>'
        f'<location href="repodata/{digest[:12]}-primary.xml"/></data>\n'
        "</repomd>\n")
    written += [src / "repodata" / "repomd.xml", src / "repodata" / f"{digest[:12]}-primary.xml"]
    for path in written:
        os.utime(path, (_TICK, _TICK))


def markers(tree: Path) -> set[str]:
    """The markers of every regular file under ``tree`` (signatures skipped)."""
    found: set[str] = set()
    for path in tree.rglob("*"):
        if path.is_file() and not path.name.endswith(".asc"):
            match = MARKER.search(path.read_bytes()[:200])
            found.add(match.group(1).decode() if match else "<none>")
    return found


def published(dest: Path) -> Path:
    """The snapshot ``current`` resolves to, resolved once (as a reader does)."""
    return Path(os.path.realpath(dest / "current"))


class Reader(threading.Thread):
    """Walks the published tree again and again while publishes run."""

    def __init__(self, dest: Path) -> None:
        super().__init__(daemon=True)
        self.dest = dest
        self.walks = 0
        self.inconsistencies = 0
        self.problems: list[str] = []
        self.seen: set[str] = set()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            if not os.path.islink(self.dest / "current"):
                time.sleep(0.001)
                continue
            tree = published(self.dest)
            try:
                found = markers(tree)
            except OSError as exc:          # a file vanished mid-walk: pruned under a reader
                found = {f"<error {exc.__class__.__name__}>"}
            self.walks += 1
            if len(found) != 1 or "<none>" in found:
                self.inconsistencies += 1
                self.problems.append(f"{tree.name}: {sorted(found)}")
            self.seen |= found

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
