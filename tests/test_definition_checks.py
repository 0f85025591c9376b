"""Validation of the constructs of definition language 2: inputs,
extra_fields, on_exhausted, for_each, on_cancel and if guards.  Every misuse
is a ``file:line: message`` from ``check`` (and the bot refuses to start on
it); a schedule's fields are checked against its process by
``field_problems``."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.definitions import collect_definitions, field_problems, parse_definition
from engine.participants import ParticipantRegistry
from engine.yamlconfig import loads_yaml
from participants import discover
from tests.botproc import ROOT, make_home
from tests.engine_fixtures import spec_from_yaml

PARTICIPANTS = ParticipantRegistry(discover()).names()


def problems(tmp_path: Path, text: str, **others: str) -> list[str]:
    for name, body in {"p": text, "notify": "steps: [{participant: echo}]", **others}.items():
        (tmp_path / f"{name}.yaml").write_text(textwrap.dedent(text if name == "p" else body).lstrip("\n"))
    _specs, found, _names = collect_definitions(tmp_path, PARTICIPANTS, base=tmp_path)
    return [str(p) for p in sorted(found)]


@pytest.mark.parametrize("text, expected", [
    ("""
     inputs: {count: integer}
     steps: [{participant: echo}]
     """, "p.yaml:1: inputs count: expected str, int, float, bool or a list of choices, got 'integer'"),
    ("""
     inputs:
       answer: [yes, no]
     steps: [{participant: echo}]
     """, "p.yaml:2: inputs answer: choices must be text; quote them ('yes', '1'), got [True, False]"),
    ("""
     inputs: [count]
     steps: [{participant: echo}]
     """, "p.yaml:1: inputs: expected a mapping of field: type (str, int, float, bool, or a list of choices)"),
    ("""
     inputs:
       project: str
     steps: [{participant: echo}]
     """, "p.yaml:2: inputs: project is always a launch field, and always text: it needs no declaration"),
    ("""
     inputs: {count: int}
     fields:
       count: many
     steps: [{participant: echo}]
     """, "p.yaml:3: fields count: expected a whole number, got 'many'"),
    ("""
     extra_fields: yes
     steps: [{participant: echo}]
     """, "p.yaml:1: extra_fields: expected allow or refuse, got True"),
], ids=["type", "choices", "not-a-mapping", "project", "default", "extra_fields"])
def test_inputs_and_extra_fields(tmp_path: Path, text: str, expected: str) -> None:
    assert problems(tmp_path, text) == [expected]


def test_on_exhausted(tmp_path: Path) -> None:
    assert problems(tmp_path, """
        steps:
          - repeat: [{set: {a: 1}}]
            max: 3
            break_if: "a"
            on_exhausted: retry
          - repeat: [{set: {a: 1}}]
            max: 3
            on_exhausted: continue
        """) == ["p.yaml:5: on_exhausted: expected error or continue, got 'retry'",
                 "p.yaml:8: on_exhausted without break_if: a repeat without break_if runs max times and ends"]


def test_for_each(tmp_path: Path) -> None:
    assert problems(tmp_path, """
        steps:
          - for_each: arches
            do: [{set: {a: 1}}]
          - for_each: "{{ xs }"
            as: 9lives
            do: [{set: {a: 1}}]
          - for_each: [a, b]
            wait_for: any
            max_parallel: 2
            do: [{set: {a: 1}}]
          - for_each: [a, b]
            concurrent: yes please
            collect: "my results"
            do: [{set: {a: 1}}]
          - for_each: [a, b]
            concurrent: true
            max_parallel: 0
            merge: all
            wait_for: none
            do: [{set: {a: 1}}]
          - for_each: [a, b]
            concurrent: true
        """) == [
        "p.yaml:2: for_each: expected a list or a template like '{{ items }}', got 'arches'",
        "p.yaml:4: bad template syntax '{{ xs }': unexpected '}'",
        "p.yaml:5: as: expected a field name, got '9lives'",
        "p.yaml:8: wait_for: only for a concurrent for_each (concurrent: true)",
        "p.yaml:9: max_parallel: only for a concurrent for_each (concurrent: true)",
        "p.yaml:12: concurrent: expected true or false, got 'yes please'",
        "p.yaml:13: collect: expected a field name, got 'my results'",
        "p.yaml:17: max_parallel: expected a whole number of at least 1, got 0",
        "p.yaml:18: merge: expected one of union, first, last, none, got 'all'",
        "p.yaml:19: wait_for: expected all, any or a number of at least 1, got 'none'",
        "p.yaml:21: for_each: missing 'do' (the steps to run for each item)",
    ]


def test_on_cancel(tmp_path: Path) -> None:
    assert problems(tmp_path, """
        on_cancel: notify
        steps:
          - participant: echo
            on_cancel: {subprocess: gone}
          - participant: echo
            on_cancel: {retry: 2}
        """) == ["p.yaml:1: on_cancel: expected {subprocess: NAME}, got 'notify'",
                 "p.yaml:4: subprocess 'gone' is not a known process",
                 "p.yaml:6: on_cancel: expected {subprocess: NAME}, got {'retry': 2}"]


def test_on_cancel_handlers_count_for_subprocess_cycles(tmp_path: Path) -> None:
    assert problems(tmp_path, """
        name: p
        on_cancel: {subprocess: q}
        steps: [{participant: echo}]
        """, q="on_cancel: {subprocess: p}\nsteps: [{participant: echo}]\n") == [
        "p.yaml:2: subprocess cycle: p -> q -> p", "q.yaml:1: subprocess cycle: q -> p -> q"]


def test_if_guards(tmp_path: Path) -> None:
    assert problems(tmp_path, """
        steps:
          - participant: echo
            if: "not dry_run and"
          - participant: echo
            if: "dry_run"
            else: [{set: {a: 1}}]
          - participant: echo
            if: "x"
            then: [{set: {a: 1}}]
          - if: "x"
            else: [{set: {a: 1}}]
          - set: {a: 1}
            if: [1]
        """) == [
        "p.yaml:3: bad condition syntax 'not dry_run and': unexpected 'end of template'",
        "p.yaml:6: else: only an if with then has one; an 'if' on a participant step only decides whether it runs",
        "p.yaml:7: an if with then is a conditional and takes no other expression; found participant "
        "(to guard a step, give it 'if' without 'then')",
        "p.yaml:10: expected a non-empty list of steps",
        "p.yaml:10: if: missing 'then'",
        "p.yaml:13: if: expected a condition, got [1]",
    ]


def test_the_shipped_definitions_still_pass(tmp_path: Path) -> None:
    _specs, found, _names = collect_definitions(ROOT / "conf" / "processes", PARTICIPANTS)
    assert found == []


def test_check_reports_a_misused_construct_at_its_line(tmp_path: Path) -> None:
    home = make_home(tmp_path, {"p": """
        name: p
        steps:
          - for_each: [a]
            do: [{participant: echo}]
            max_parallel: 3
        """})
    result = subprocess.run([sys.executable, str(ROOT / "run_bot.py"), "check", str(home / "conf")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert result.returncode == 1
    assert result.stdout == "conf/processes/p.yaml:6: max_parallel: only for a concurrent for_each (concurrent: true)\n"


def test_field_problems_for_a_schedule() -> None:
    spec = spec_from_yaml("p", """
        inputs: {count: int}
        fields: {repo: devel, count: 1}
        steps: [{participant: echo, params: {text: "{{ repo }}"}}]
        """)
    assert field_problems(spec, {"repo": "x", "count": 3}) == []
    assert field_problems(spec, {"rpeo": "x", "count": "many", "project": "A"}) == [
        "unknown field 'rpeo' (did you mean 'repo'?)", "count: expected a whole number, got 'many'"]


def test_a_language_1_definition_reads_with_the_old_defaults() -> None:
    text = "steps:\n  - repeat: [{set: {a: 1}}]\n    max: 2\n    break_if: 'a > 5'\n"
    old, found = parse_definition(loads_yaml(text, "p.yaml"), "p.yaml", "p", None, text, language=1)
    new, _ = parse_definition(loads_yaml(text, "p.yaml"), "p.yaml", "p", None, text)
    assert old is not None and new is not None and found == []
    assert (old.steps["0"].on_exhausted, old.extra_fields, old.language) == ("continue", True, 1)
    assert (new.steps["0"].on_exhausted, new.extra_fields, new.language) == ("error", False, 2)
    assert old.digest != new.digest
