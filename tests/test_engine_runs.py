"""Step runs keep their stored form: what a database already holds loads into
``StepRun`` and is written back unchanged, so no database needs migrating;
and every field of ``StepRun`` survives the round trip (a field added
without its JSON key fails here)."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from engine.runs import RunState, StepRun, runs_from_json, runs_to_json
from engine.store import dumps

# ``runs`` columns as the engine wrote them before StepRun existed (captured from that version)
STORED = {
    "concurrence, one branch done": '{"":{"s":"active","g":1,"i":1},"1":{"s":"active","g":3,"bf":{"0":{"x":1},'
                                    '"1":{"x":1,"echo":""}},"done":[1]},"1.0":{"s":"active","g":4,"i":0},'
                                    '"1.0.0":{"s":"pending","g":5,"t":1,"k":"1:1.0.0:5"}}',
    "retry backoff": '{"":{"s":"active","g":1,"i":0},"0":{"s":"backoff","g":3,"a":1,"t":1}}',
    "failed": '{"":{"s":"active","g":1,"i":0},"0":{"s":"failed","g":2,"e":"nope"}}',
    "subprocess": '{"":{"s":"active","g":1,"i":0},"0":{"s":"waiting","g":2,"c":5}}',
    "repeat": '{"":{"s":"active","g":1,"i":0},"0":{"s":"active","g":2,"i":0},"0.body":{"s":"active","g":3,"i":0},'
              '"0.body.0":{"s":"pending","g":4,"k":"6:0.body.0:4"}}',
}

# a value other than the default for every field: a new field needs one here
SAMPLES: dict[str, Any] = {
    "state": RunState.HANDLING,
    "generation": 7,
    "attempt": 2,
    "position": 3,
    "key": "1:0:7",
    "child": 12,
    "branch_fields": {0: {"a": 1}, 1: {}},
    "branches_done": [1],
    "error": "disk full",
    "has_timers": True,
    "items": ["x86_64", {"arch": "aarch64"}],
    "results": {0: {"built": True}, 2: {}},
    "handling": {"process": "notify", "message": "disk full", "step": "build", "path": "1", "kind": "error"},
}


@pytest.mark.parametrize("text", STORED.values(), ids=STORED.keys())
def test_stored_runs_load_and_are_written_back_unchanged(text: str) -> None:
    stored = json.loads(text)
    again = json.loads(dumps(runs_to_json(runs_from_json(stored))))
    assert again == stored


def test_stored_runs_read_by_name() -> None:
    runs = runs_from_json(json.loads(STORED["concurrence, one branch done"]))
    fan, ask = runs["1"], runs["1.0.0"]
    assert (fan.state, fan.branch_fields, fan.branches_done) == (RunState.ACTIVE, {0: {"x": 1}, 1: {"x": 1, "echo": ""}},
                                                                 [1])
    assert (ask.state, ask.generation, ask.key, ask.has_timers) == (RunState.PENDING, 5, "1:1.0.0:5", True)
    assert (ask.attempt, ask.position, ask.child, ask.error) == (0, None, None, "")


def test_every_field_survives_the_round_trip() -> None:
    assert set(SAMPLES) == {f.name for f in dataclasses.fields(StepRun)}, "a StepRun field without a sample"
    run = StepRun(**SAMPLES)
    assert StepRun.from_json(json.loads(dumps(run.to_json()))) == run


def test_defaults_are_left_out_of_the_stored_form() -> None:
    assert StepRun(RunState.DISPATCHED, 4).to_json() == {"s": "dispatched", "g": 4}
