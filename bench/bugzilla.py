#!/usr/bin/env python3
"""Bugzilla participant benchmark against the fake Bugzilla (tests/fakebugzilla,
two of them: one per tracker, real HTTP on 127.0.0.1).  Prints ``name=value``.

One step updates the bugs of a changelog with 200 references across 50
packages and two trackers (each package: a fixed and a mentioned bug on each
tracker; one fixed bug in ten is already RESOLVED and is skipped).

  bugzilla_requests            HTTP requests the fakes counted for the step
  bugzilla_requests_expected   one batched read per tracker plus one update per
                               bug that changes, computed from the data built here
  bugzilla_connect_requests    the GET /rest/version each tracker's client makes
                               once per bot process, when it connects (before the
                               step measured: the clients are connected by a warm-up step)
  bugzilla_connections         TCP connections the fakes accepted during the step
                               (one session per tracker, kept alive: 0 new ones)
  bugs_updated_per_s           bugs updated per second of the step (median of runs),
                               synchronous=FULL, for information
"""
from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
# run as a script, bench/ is first on the path, and this file would shadow python-bugzilla's "bugzilla"
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE / "bench"]
sys.path.insert(0, str(HERE))

from engine.configkit import Findings, Section  # noqa: E402
from engine.definitions import parse_definition  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.participant_runtime import ParticipantEnv  # noqa: E402
from engine.participants import ParticipantRegistry  # noqa: E402
from engine.store import Store  # noqa: E402
from engine.yamlconfig import loads_yaml  # noqa: E402
from participants.bugzilla import Bugzilla  # noqa: E402
from tests.fakebugzilla import FakeBugzilla  # noqa: E402

PACKAGES = 50
RUNS = 3
KEYS = {"bmc": "bench-bmc-" + "ab" * 16, "rhbz": "bench-rhbz-" + "cd" * 16}
PATTERNS = {"bmc": r"BMC#(?P<key>\d+)", "rhbz": r"rhbz#(?P<key>\d+)"}
PROCESS = json.dumps({"name": "bugs", "fields": {"packages": []}, "steps": [
    {"id": "update", "participant": "bugzilla", "params": {"changelog": "{{ packages }}"}}]})


def config(fakes: dict[str, FakeBugzilla]) -> object:
    trackers = {}
    for name, fake in fakes.items():
        os.environ[f"BENCH_{name.upper()}_KEY"] = KEYS[name]
        trackers[name] = {"url": fake.url, "api_key_env": f"BENCH_{name.upper()}_KEY", "reference": PATTERNS[name],
                          "status": "RESOLVED", "resolution": "FIXED", "projects": ["*"]}
    findings = Findings()
    checked = Bugzilla().check_config(Section(loads_yaml(json.dumps({"trackers": trackers}), "bench.yaml"),
                                              "bench.yaml", findings))
    assert not findings.problems, findings.problems
    return checked


def changelog(fakes: dict[str, FakeBugzilla]) -> tuple[list[dict[str, str]], int]:
    """50 packages x (fixed + mentioned) x 2 trackers = 200 references, and
    how many bugs must change (every one but the fixed ones already RESOLVED)."""
    logs, changing = [], 0
    for n in range(PACKAGES):
        items = []
        for name, fake in fakes.items():
            closed = n % 10 == 0
            fixed = fake.add_bug(status="RESOLVED" if closed else "CONFIRMED",
                                 resolution="FIXED" if closed else "")
            mentioned = fake.add_bug()
            prefix = PATTERNS[name].split("(")[0]
            items += [f"- Fixes {prefix}{fixed}: package {n} crashed", f"- Related: {prefix}{mentioned}"]
            changing += (0 if closed else 1) + 1
        logs.append({"package": f"pkg{n}", "version": "1.0-1",
                     "changelog": f"* Mon Nov 20 2026 Bench <bench@example.org> - 1.0-1\n" + "\n".join(items)})
    return logs, changing


async def run(workdir: Path) -> dict[str, float]:
    with FakeBugzilla() as bmc, FakeBugzilla() as rhbz:
        fakes = {"bmc": bmc, "rhbz": rhbz}
        for name, fake in fakes.items():
            fake.add_account("releasebot@example.org", KEYS[name])
        spec, problems = parse_definition(loads_yaml(PROCESS, "bugs.yaml"), "bugs.yaml", "bugs",
                                          frozenset({"bugzilla"}))
        assert spec is not None, problems
        store = Store(workdir / f"bugzilla-{time.monotonic_ns()}.sqlite3", synchronous="FULL")
        store.open()
        participant = Bugzilla()
        engine = Engine(store, {"bugs": spec}, ParticipantRegistry([participant]), use_scheduler=False,
                        participant_env=ParticipantEnv(config={"bugzilla": config(fakes)}))
        await engine.start()
        try:
            # warm-up: each tracker's client connects (GET /rest/version) once per bot process
            warm = "\n".join(f"- Related: {PATTERNS[n].split('(')[0]}{f.add_bug()}" for n, f in fakes.items())
            iid = await engine.launch("bugs", {"packages": [{"package": "warm", "changelog": warm}]})
            await engine.idle(timeout=60)
            assert (await engine.summary(iid)).status == "completed"
            connects = sum(f.count("GET", "/rest/version") for f in fakes.values())
            logs, changing = changelog(fakes)
            for fake in fakes.values():
                fake.reset_counts()
            t0 = time.perf_counter()
            iid = await engine.launch("bugs", {"packages": logs})
            await engine.idle(timeout=300)
            elapsed = time.perf_counter() - t0
            summary = await engine.summary(iid)
            assert summary.status == "completed", summary.error
            updated = sum(f.count("PUT") for f in fakes.values())
            assert updated == changing, (updated, changing)
            return {"requests": sum(len(f.requests) for f in fakes.values()),
                    "expected": len(fakes) + changing, "connects": connects,
                    "connections": sum(f.connections for f in fakes.values()), "per_s": updated / elapsed}
        finally:
            await engine.stop()
            store.close()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        results = [asyncio.run(run(Path(tmp))) for _ in range(RUNS)]
    last = results[-1]
    assert all(r["requests"] == last["requests"] for r in results)
    print(f"bugzilla_requests={last['requests']:.0f}", flush=True)
    print(f"bugzilla_requests_expected={last['expected']:.0f}", flush=True)
    print(f"bugzilla_connect_requests={last['connects']:.0f}", flush=True)
    print(f"bugzilla_connections={last['connections']:.0f}", flush=True)
    print(f"bugs_updated_per_s={statistics.median(r['per_s'] for r in results):.0f}", flush=True)


if __name__ == "__main__":
    main()
