"""The per-repository FIFO lock (BOSS's ``obsticket``), held by an instance.

SQLite holds the truth (``repo_publish_locks``: the holder;
``repo_publish_queue``: who waits, in order), so a restart keeps both.  This
module keeps the same in memory, loaded at start, because the release runs
inside the engine's transitions: when an instance ends (completed, failed,
cancelled, terminated), ``release`` returns the statements that free its lock
and hand it to the next in the queue, and the engine writes them in the
commit that ends the instance.  So a lock is never held by an instance that
has ended, and never free while someone waits for it, whatever crashes when.

Taking a free lock is decided in memory before any await (two publishes
arriving together cannot both take it), then written before the step answers.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from engine.participant_runtime import Storage
from engine.store import Op

LOCKS = "repo_publish_locks"
QUEUE = "repo_publish_queue"


@dataclass(frozen=True)
class Claim:
    repo: str
    instance_id: int
    key: str                # the dispatch key of the step that asked (its lock step)
    since: float


@dataclass
class _Repo:
    holder: Claim | None = None
    queue: deque[Claim] = field(default_factory=deque)


class Locks:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._repos: dict[str, _Repo] = {}

    def _repo(self, repo: str) -> _Repo:
        return self._repos.setdefault(repo, _Repo())

    async def load(self) -> None:
        self._repos.clear()
        for repo, iid, key, since in await self.storage.query(f"SELECT repo, instance_id, key, since FROM {LOCKS}"):
            self._repo(repo).holder = Claim(repo, int(iid), key, float(since))
        for repo, iid, key, since in await self.storage.query(
                f"SELECT repo, instance_id, key, since FROM {QUEUE} ORDER BY seq"):
            self._repo(repo).queue.append(Claim(repo, int(iid), key, float(since)))

    # -- looking ---------------------------------------------------------------------

    def holder(self, repo: str) -> Claim | None:
        state = self._repos.get(repo)
        return state.holder if state else None

    def queue(self, repo: str) -> list[Claim]:
        state = self._repos.get(repo)
        return list(state.queue) if state else []

    def holds(self, repo: str, instance_id: int) -> bool:
        holder = self.holder(repo)
        return holder is not None and holder.instance_id == instance_id

    def queued(self, key: str) -> Claim | None:
        return next((c for s in self._repos.values() for c in s.queue if c.key == key), None)

    def queue_claims(self) -> list[Claim]:
        return [c for s in self._repos.values() for c in s.queue]

    def holders(self) -> list[Claim]:
        return [s.holder for s in self._repos.values() if s.holder is not None]

    # -- changing (in memory at once; the caller writes the ops) -------------------------

    def take(self, claim: Claim) -> list[Op] | None:
        """Take the lock if it is free and nobody waits: the ops to write; else None."""
        state = self._repo(claim.repo)
        if state.holder is not None or state.queue:
            return None
        state.holder = claim
        return [self.storage.op(f"INSERT OR REPLACE INTO {LOCKS} (repo, instance_id, key, since) VALUES (?, ?, ?, ?)",
                                claim.repo, claim.instance_id, claim.key, claim.since)]

    def enqueue(self, claim: Claim) -> tuple[int, list[Op]]:
        """Wait in line: the position (1 = next) and the ops to write."""
        state = self._repo(claim.repo)
        if not any(c.key == claim.key for c in state.queue):
            state.queue.append(claim)
        position = next(i for i, c in enumerate(state.queue, 1) if c.key == claim.key)
        return position, [self.storage.op(f"INSERT OR IGNORE INTO {QUEUE} (repo, instance_id, key, since) "
                                          "VALUES (?, ?, ?, ?)", claim.repo, claim.instance_id, claim.key,
                                          claim.since)]

    def leave(self, key: str) -> list[Op]:
        """A queued step was cancelled: out of the line."""
        for state in self._repos.values():
            for claim in list(state.queue):
                if claim.key == key:
                    state.queue.remove(claim)
                    return [self.storage.op(f"DELETE FROM {QUEUE} WHERE key = ?", key)]
        return []

    def release(self, instance_ids: Iterable[int]) -> tuple[list[Op], list[Claim]]:
        """These instances ended: their locks go to the next in line, and their
        places in lines are given up.  The ops, and the claims newly granted
        (their steps are told after the commit)."""
        ended = set(instance_ids)
        ops: list[Op] = []
        granted: list[Claim] = []
        for repo, state in self._repos.items():
            for claim in [c for c in state.queue if c.instance_id in ended]:
                state.queue.remove(claim)
                ops.append(self.storage.op(f"DELETE FROM {QUEUE} WHERE key = ?", claim.key))
            if state.holder is not None and state.holder.instance_id in ended:
                state.holder = None
                ops.append(self.storage.op(f"DELETE FROM {LOCKS} WHERE repo = ?", repo))
                if state.queue:
                    nxt = state.queue.popleft()
                    state.holder = nxt
                    granted.append(nxt)
                    ops.append(self.storage.op(f"DELETE FROM {QUEUE} WHERE key = ?", nxt.key))
                    ops.append(self.storage.op(f"INSERT OR REPLACE INTO {LOCKS} (repo, instance_id, key, since) "
                                               "VALUES (?, ?, ?, ?)", repo, nxt.instance_id, nxt.key, nxt.since))
        return ops, granted
