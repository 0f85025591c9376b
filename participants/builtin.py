"""Small general-purpose participants: enough to write and test processes
before the real ones (ask, notify, bugzilla, repo) arrive."""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from engine.participants import Participant, Reply, Workitem

log = logging.getLogger(__name__)


class Echo(Participant):
    """Logs ``text`` and puts it in the ``echo`` field; any ``fields`` param is merged too."""

    name = "echo"

    async def consume(self, workitem: Workitem) -> Reply:
        text = workitem.params.get("text", "")
        log.info("#%d %s: echo %s", workitem.instance_id, workitem.step, str(text)[:200])
        fields = dict(workitem.params.get("fields") or {})
        fields["echo"] = text
        return Reply.done(fields)


class Sleep(Participant):
    """Takes ``seconds`` (default 1) to answer: a stand-in for slow work."""

    name = "sleep"

    async def consume(self, workitem: Workitem) -> Reply:
        await asyncio.sleep(float(workitem.params.get("seconds", 1)))
        return Reply.done()


class Fail(Participant):
    """Fails with ``message``; with ``until_attempt: N`` only the first N-1
    dispatches of a step fail (for trying retry policies)."""

    name = "fail"

    def __init__(self) -> None:
        self._seen: dict[tuple[int, str], int] = {}

    async def consume(self, workitem: Workitem) -> Reply:
        key = (workitem.instance_id, workitem.path)
        self._seen[key] = self._seen.get(key, 0) + 1
        until = workitem.params.get("until_attempt")
        if until is not None and self._seen[key] >= int(until):
            return Reply.done({"attempts": self._seen[key]})
        return Reply.failed(str(workitem.params.get("message", "failed on purpose")))


class Hold(Participant):
    """Keeps the workitem (pending) until someone answers it through the
    engine; the approval participant will build on this."""

    name = "hold"

    async def consume(self, workitem: Workitem) -> Reply:
        log.info("#%d %s: holding workitem %s until answered", workitem.instance_id, workitem.step, workitem.key)
        return Reply.pending()


class Record(Participant):
    """Appends ``text`` to ``file`` once per dispatch key, even when dispatched
    again after a crash: the model of an idempotent side effect."""

    name = "record"

    async def consume(self, workitem: Workitem) -> Reply:
        path = Path(str(workitem.params["file"]))
        line = f"{workitem.key} {workitem.params.get('text', '')}\n"
        delay = float(workitem.params.get("seconds", 0))
        if delay:
            await asyncio.sleep(delay)
        await asyncio.to_thread(_append_once, path, workitem.key, line)
        return Reply.done({"recorded": True})


def _append_once(path: Path, key: str, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and any(existing.split(" ", 1)[0] == key
                             for existing in path.read_text(encoding="utf-8").splitlines()):
        return
    with path.open("a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
