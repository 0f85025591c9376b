"""What happens at a destination: rsync into a snapshot, fetch files back,
swap the ``current`` link, remove snapshots.  The same layout everywhere:

    <destination>/snapshots/<snapshot>/...     one complete tree per publish
    <destination>/current -> snapshots/<id>    what readers (and mirrors) use

For a local destination the swap is ``symlink`` + ``rename`` (one
``renameat``); for an rsync daemon or an ssh target it is a small transfer
of the ``current`` link alone, which rsync's receiver writes under a
temporary name and renames into place: the same single ``renameat`` on the
remote side.  The snapshot goes first, in a transfer of its own, so the link
never points at a directory that is not complete.

Every argument list is built here from configured values and checked names
(``participants/argsafety.py``: operands never start with ``-``).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from participants.argsafety import operand, option
from participants.repo.config import Destination, Repository, name_problem

RSYNC = "rsync"
_STAT = re.compile(r"^(Number of files|Number of created files|Number of deleted files|"
                   r"Number of regular files transferred|Total transferred file size):\s*([\d,]+)(.*)$")
_PLAIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]*(/[A-Za-z0-9_][A-Za-z0-9._+-]*)*$")
_REG = re.compile(r"reg:\s*([\d,]+)")


@dataclass
class SyncStats:
    files: int = 0          # regular files in the snapshot
    created: int = 0        # regular files not in the previous snapshot
    transferred: int = 0    # regular files sent (new or changed)
    bytes: int = 0

    def add(self, other: "SyncStats") -> None:
        self.files += other.files
        self.created += other.created
        self.transferred += other.transferred
        self.bytes += other.bytes


def parse_stats(lines: Iterable[str]) -> SyncStats:
    """The numbers of ``rsync --stats`` (``LC_ALL=C``)."""
    stats = SyncStats()
    for line in lines:
        match = _STAT.match(line.strip())
        if not match:
            continue
        what, number, rest = match.group(1), int(match.group(2).replace(",", "")), match.group(3)
        reg = _REG.search(rest)
        regular = int(reg.group(1).replace(",", "")) if reg else (0 if "dir:" in rest or "link:" in rest else number)
        if what == "Number of files":
            stats.files = regular
        elif what == "Number of created files":
            stats.created = regular
        elif what == "Number of regular files transferred":
            stats.transferred = number
        elif what == "Total transferred file size":
            stats.bytes = number
    return stats


def _check_name(name: str) -> str:
    problem = name_problem(name, "snapshot")
    if problem:
        raise ValueError(problem)
    return name


class Transfer:
    """The operations on one repository's destination."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.dest: Destination = repo.destination

    @property
    def local(self) -> bool:
        return self.dest.kind == "local"

    # -- argv pieces -----------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The environment rsync needs: a daemon's password (never an argument, never logged)."""
        if self.dest.kind == "rsync" and self.dest.password_env and os.environ.get(self.dest.password_env):
            return {"RSYNC_PASSWORD": os.environ[self.dest.password_env]}
        return {}

    def remote_shell(self) -> list[str]:
        """``-e`` for an ssh destination: the configured key, strict host keys, no prompts."""
        if self.dest.kind != "ssh":
            return []
        port = f" -p {self.dest.port}" if self.dest.port else ""
        return ["-e", f"ssh{port} -i {self.dest.ssh_key} -o BatchMode=yes -o IdentitiesOnly=yes "
                      f"-o StrictHostKeyChecking=yes -o UserKnownHostsFile={self.dest.known_hosts} "
                      "-o LogLevel=ERROR"]

    def url(self, *parts: str) -> str:
        """A path at the destination, as rsync names it (a directory when it ends in '/')."""
        return operand("/".join([self.dest.base.rstrip("/"), *parts]), "destination")

    def snapshot_path(self, name: str) -> Path:
        """A local destination's snapshot directory."""
        return Path(self.dest.path) / "snapshots" / _check_name(name)

    def _metadata_filters(self, names: Sequence[str]) -> list[str]:
        rules: list[str] = []
        for name in names:
            if not _PLAIN.match(name):
                raise ValueError(f"{name!r} is not a plain relative path")
            parts = name.split("/")
            for depth in range(1, len(parts)):
                rule = option("--include=/" + "/".join(parts[:depth]) + "/")
                if rule not in rules:
                    rules.append(rule)
            rules += [option(f"--include=/{name}"), option(f"--include=/{name}/***")]
        return rules + ["--exclude=*"]

    # -- the operations ------------------------------------------------------------

    def sync_argvs(self, name: str, previous: str | None) -> list[list[str]]:
        """Two rsync runs into ``snapshots/<name>/``: everything but the metadata
        first, then the metadata, so the metadata never names packages the
        snapshot lacks.  Unchanged files are hard links into ``previous``."""
        target = self.url("snapshots", _check_name(name)) + "/"
        source = operand(self.repo.source.rstrip("/") + "/", "source")
        common = [RSYNC, "-a", "--delete", "--mkpath", "--stats", "--info=progress2", *self.remote_shell()]
        if previous:
            common.append(option(f"--link-dest=../{_check_name(previous)}"))
        if self.repo.bwlimit:
            common.append(option(f"--bwlimit={int(self.repo.bwlimit)}"))
        packages = [*common, *(option(f"--exclude=/{m}") for m in self.repo.metadata), source, target]
        # the metadata is small: compared by content, not by size and time
        metadata = [*common, "--checksum", *self._metadata_filters(self.repo.metadata), source, target]
        return [packages, metadata]

    def fetch_argv(self, name: str, paths: Sequence[str], into: Path) -> list[str]:
        """Copy ``paths`` (plain relative paths in the snapshot) back into ``into``."""
        return [RSYNC, "-a", *self.remote_shell(), *self._metadata_filters(paths),
                self.url("snapshots", _check_name(name)) + "/", operand(str(into) + "/", "directory")]

    def push_argv(self, name: str, local_file: Path, relative_dir: str) -> list[str]:
        """Put one local file into a directory of the snapshot (the signature)."""
        where = self.url("snapshots", _check_name(name), *[p for p in relative_dir.split("/") if p]) + "/"
        return [RSYNC, "-a", *self.remote_shell(), operand(str(local_file), "file"), where]

    def swap_argv(self, staging: Path) -> list[str]:
        """Send the ``current`` link alone (written under a temporary name, then renamed)."""
        return [RSYNC, "-a", *self.remote_shell(), operand(str(staging / "current"), "link"), self.url() + "/"]

    def remove_argv(self, names: Sequence[str], empty: Path) -> list[str]:
        """Delete ``snapshots/<name>`` for each name, and nothing else."""
        rules = [option(f"--include=/{_check_name(n)}/***") for n in names]
        return [RSYNC, "-r", "--delete", *self.remote_shell(), *rules, "--exclude=*",
                operand(str(empty) + "/", "directory"), self.url("snapshots") + "/"]

    # -- local destinations: done in-process -------------------------------------------

    def swap_local(self, name: str) -> None:
        base = Path(self.dest.path)
        target = f"snapshots/{_check_name(name)}"
        if not (base / target).is_dir():
            raise FileNotFoundError(f"snapshot {name} is not at {base / target}")
        temporary = base / f".current.{os.getpid()}.tmp"
        try:
            temporary.unlink()
        except FileNotFoundError:
            pass
        os.symlink(target, temporary)
        os.replace(temporary, base / "current")
        _fsync_dir(base)

    def current_local(self) -> str | None:
        try:
            target = os.readlink(Path(self.dest.path) / "current")
        except OSError:
            return None
        return target.rpartition("/")[2] or None

    def remove_local(self, names: Sequence[str]) -> None:
        for name in names:
            path = self.snapshot_path(name)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
        _fsync_dir(Path(self.dest.path) / "snapshots")


def staging_link(name: str) -> tempfile.TemporaryDirectory[str]:
    """A temporary directory holding ``current -> snapshots/<name>``, for a remote swap."""
    tmp = tempfile.TemporaryDirectory(prefix="repo-swap-")
    os.symlink(f"snapshots/{_check_name(name)}", Path(tmp.name) / "current")
    return tmp


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
