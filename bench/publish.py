#!/usr/bin/env python3
"""Publishing benchmarks (the real rsync, a local destination, synchronous=FULL).
Prints one ``name=value`` line per figure.

  publish_overhead_ratio   a whole publish process (lock, sync, verify, swap, release) of a
                           10,000-file tree with 1% changed, divided by a bare
                           ``rsync -a --delete --link-dest=<previous> <src>/ <new>/`` of the same
                           change to the same destination, in the same run (median of rounds;
                           goal: at most 1.3)
  publish_unchanged_s      a whole publish with nothing changed (goal: at most 1 s)
  reader_inconsistencies   walks of the consistency reader (``current`` resolved once per walk,
                           every file's marker read) that saw more than one snapshot, while the
                           publishes ran (goal: 0)
  reader_walks             how many walks it made
"""
from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE / "bench"]   # bench/bugzilla.py is not
sys.path.insert(0, str(HERE))                                                          # python-bugzilla

from bot.app import tune_gc  # noqa: E402
from engine.configkit import Findings, Section  # noqa: E402
from engine.definitions import parse_definition  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.participant_runtime import ParticipantEnv  # noqa: E402
from engine.participants import ParticipantRegistry  # noqa: E402
from engine.store import Store  # noqa: E402
from engine.yamlconfig import loads_yaml  # noqa: E402
from participants.repo import RepoLock, RepoPublish, RepoRollback, RepoSign, RepoSync, RepoVerify  # noqa: E402
from participants.repo.config import check_section  # noqa: E402
from tests.serverkit.repotree import Reader, write_tree  # noqa: E402

FILES = 10_000
CHANGED = FILES // 100
ROUNDS = 5
PUBLISH = """\
name: publish
inputs: {repo: str}
fields: {repo: devel}
steps:
  - {id: lock, participant: repo_lock, params: {repo: "{{ repo }}"}}
  - {id: sync, participant: repo_sync, params: {repo: "{{ repo }}"}}
  - {id: verify, participant: repo_verify, params: {repo: "{{ repo }}"}}
  - {id: publish, participant: repo_publish, params: {repo: "{{ repo }}"}}
"""


async def engine_for(tmp: Path) -> Engine:
    findings = Findings()
    text = (f'{{"repositories": {{"devel": {{"project": "P", "source": "{tmp / "src"}", '
            f'"destination": "{tmp / "www"}", "retention": 3, "grace": "1h"}}}}}}')
    config = check_section(Section(loads_yaml(text, "bench"), "bench", findings))
    assert not findings.problems, findings.problems
    spec, problems = parse_definition(loads_yaml(PUBLISH, "publish.yaml"), "publish.yaml", "publish", None, PUBLISH)
    assert spec is not None and not problems, problems
    store = Store(tmp / "bench.sqlite3", synchronous="FULL")
    store.open()
    registry = ParticipantRegistry([RepoLock(), RepoSync(), RepoVerify(), RepoSign(), RepoPublish(), RepoRollback()])
    engine = Engine(store, {"publish": spec}, registry, use_scheduler=False,
                    participant_env=ParticipantEnv(config={"repo_publish": config}))
    await engine.start()
    return engine


async def publish(engine: Engine) -> float:
    started = time.perf_counter()
    iid = await engine.launch("publish", {"repo": "devel"})
    family = engine.participants.get("repo_publish").family  # type: ignore[union-attr]
    while True:
        await engine.idle(timeout=120)
        if not await family.idle():
            summary = await engine.summary(iid)
            if summary.status in ("completed", "failed"):
                break
    elapsed = time.perf_counter() - started
    if summary.status != "completed":
        raise SystemExit(f"publish failed: {summary.error}")
    return elapsed


def bare_rsync(src: Path, www: Path, n: int) -> float:
    previous = (www / "current").resolve()
    target = www / "bare" / str(n)
    target.parent.mkdir(exist_ok=True)
    started = time.perf_counter()
    subprocess.run(["rsync", "-a", "--delete", f"--link-dest={previous}", f"{src}/", f"{target}/"], check=True)
    elapsed = time.perf_counter() - started
    shutil.rmtree(target)
    return elapsed


async def main() -> None:
    tune_gc()
    with tempfile.TemporaryDirectory(prefix="bench-publish-") as tmpdir:
        tmp = Path(tmpdir)
        write_tree(tmp / "src", "m0", packages=FILES - 2, size=256)
        engine = await engine_for(tmp)
        try:
            await publish(engine)
            ratios = []
            for n in range(1, ROUNDS + 1):
                write_tree(tmp / "src", f"m{n}", packages=FILES - 2, changed=CHANGED - 2, size=256)
                bare = bare_rsync(tmp / "src", tmp / "www", n)
                whole = await publish(engine)
                print(f"# round {n}: bare rsync {bare:.3f}s, publish {whole:.3f}s", file=sys.stderr)
                ratios.append(whole / bare)
            unchanged = statistics.median([await publish(engine) for _ in range(3)])
        finally:
            await engine.stop()
            await asyncio.to_thread(engine.store.close)
    # the consistency reader, apart from the timed runs: a small tree, every file rewritten each time
    with tempfile.TemporaryDirectory(prefix="bench-reader-") as tmpdir:
        tmp = Path(tmpdir)
        write_tree(tmp / "src", "r0", packages=200)
        engine = await engine_for(tmp)
        reader = Reader(tmp / "www")
        try:
            await publish(engine)
            reader.start()
            for n in range(1, 31):
                write_tree(tmp / "src", f"r{n}", packages=200)
                await publish(engine)
        finally:
            reader.stop()
            await engine.stop()
            await asyncio.to_thread(engine.store.close)
    print(f"publish_overhead_ratio={statistics.median(ratios):.2f}")
    print(f"publish_unchanged_s={unchanged:.3f}")
    print(f"reader_inconsistencies={reader.inconsistencies}")
    print(f"reader_walks={reader.walks}")


if __name__ == "__main__":
    asyncio.run(main())
