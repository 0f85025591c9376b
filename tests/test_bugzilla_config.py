"""The bugzilla participant's section of bot.yaml and its step params, as
``check`` sees them: every mistake a real run would trip over, at its line."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from engine.configkit import Findings, Section
from engine.yamlconfig import loads_yaml
from participants.bugzilla import Bugzilla
from participants.bugzilla.config import BugzillaConfig
from tests.botproc import ROOT

GOOD = """\
trackers:
  bmc:
    url: https://bugs.example.com/rest/
    api_key_env: TEST_BMC_KEY
    reference: 'BMC#(?P<key>\\d+)'
    status: RESOLVED
    resolution: FIXED
    projects: ["Project:Devel"]
"""


def check(text: str, need_secrets: bool = True) -> tuple[BugzillaConfig, list[str], list[str]]:
    node = loads_yaml(textwrap.dedent(text), "bot.yaml")
    findings = Findings(need_secrets=need_secrets)
    config = Bugzilla().check_config(Section(node, "bot.yaml", findings, label="participants bugzilla"))
    return (config, [f"{p.line}: {p.message}" for p in findings.problems],
            [f"{p.line}: {p.message}" for p in findings.warnings])


def test_a_good_tracker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_BMC_KEY", "secret-value")
    config, problems, warnings = check(GOOD)
    assert problems == [] and warnings == []
    bmc = config.trackers["bmc"]
    assert bmc.api_key == "secret-value" and "secret-value" not in repr(config)
    assert bmc.uses("Project:Devel:Tools") and not bmc.uses("Project:Other") and not bmc.uses(None)
    assert bmc.may_move("CONFIRMED", "RESOLVED") and not bmc.may_move("CONFIRMED", "VERIFIED")
    assert bmc.mentioned == "comment" and bmc.timeout == 60.0


def test_a_missing_key_variable_is_a_warning_for_check_and_a_problem_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_BMC_KEY", raising=False)
    assert check(GOOD, need_secrets=False)[1:] == (
        [], ["4: participants bugzilla: tracker bmc: api_key_env: environment variable TEST_BMC_KEY is not set "
             "(or empty); the bot will refuse to start without it"])
    assert check(GOOD)[1] == ["4: participants bugzilla: tracker bmc: api_key_env: environment variable "
                              "TEST_BMC_KEY is not set (or empty)"]


@pytest.mark.parametrize("change, problem", [
    ({"reference": "'BMC#(\\d+'"}, "5: participants bugzilla: tracker bmc: reference: 'BMC#(\\\\d+' does not "
                                   "compile: missing ), unterminated subpattern at position 4"),
    ({"reference": "'BMC#(\\d+)'"}, "5: participants bugzilla: tracker bmc: reference: 'BMC#(\\\\d+)' has no named "
                                    "group 'key' (as in BMC#(?P<key>\\d+))"),
    ({"url": "https://bugs.example.com/"}, "3: participants bugzilla: tracker bmc: url: 'https://bugs.example.com/' "
                                           "is not an explicit REST URL (http(s)://host/.../rest/)"),
    ({"resolution": "''"}, "6: participants bugzilla: tracker bmc: status: RESOLVED is a closed status and needs a "
                           "resolution (Bugzilla 121)"),
    ({"status": "IN_PROGRESS"}, "7: participants bugzilla: tracker bmc: resolution: IN_PROGRESS is an open status, "
                                "and Bugzilla refuses a resolution for open bugs (122)"),
    ({"status": "MODIFIED"}, "6: participants bugzilla: tracker bmc: status: 'MODIFIED' is not a status of the "
                             "workflow (CONFIRMED, IN_PROGRESS, RESOLVED, UNCONFIRMED, VERIFIED)"),
    ({"api_key": "abc"}, "9: participants bugzilla: tracker bmc: api_key: secrets are not written in config files; "
                         "put it in an environment variable and name it with api_key_env"),
    ({"comment": "'{{ pakage }}'"}, "9: participants bugzilla: tracker bmc: comment: unknown variable(s) pakage "
                                    "(known: approved_by, bug, fixed, instance, lines, package, packages, process, "
                                    "project, ref, resolution, status, step, tracker, version)"),
    ({"comment": "'{{ bug '"}, "9: participants bugzilla: tracker bmc: comment: bad template syntax '{{ bug ': "
                               "unexpected end of template, expected 'end of print statement'."),
    ({"mentioned": "close"}, "9: participants bugzilla: tracker bmc: mentioned: comment or nothing"),
    ({"projects": "[]"}, "8: participants bugzilla: tracker bmc: projects: name at least one project (or \"*\")"),
])
def test_problems_at_their_line(monkeypatch: pytest.MonkeyPatch, change: dict[str, str], problem: str) -> None:
    monkeypatch.setenv("TEST_BMC_KEY", "x")
    lines = GOOD.splitlines()
    for key, value in change.items():
        found = [n for n, line in enumerate(lines) if line.strip().startswith(f"{key}:")]
        if found:
            lines[found[0]] = f"    {key}: {value}"
        else:
            lines.append(f"    {key}: {value}")
    _config, problems, _ = check("\n".join(lines) + "\n")
    assert problems == [problem]


def test_a_workflow_of_its_own_decides_statuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_BMC_KEY", "x")
    config, problems, _ = check(GOOD.replace("status: RESOLVED\n    resolution: FIXED", "status: MODIFIED") + """\
    workflow: {NEW: [ASSIGNED, MODIFIED], ASSIGNED: [MODIFIED], MODIFIED: [ON_QA], ON_QA: [CLOSED]}
    open_statuses: [NEW, ASSIGNED, MODIFIED, ON_QA]
""")
    assert problems == []
    tracker = config.trackers["bmc"]
    assert tracker.may_move("NEW", "MODIFIED") and not tracker.may_move("CLOSED", "MODIFIED")


def test_step_params_are_checked() -> None:
    config = BugzillaConfig()
    participant = Bugzilla()
    assert participant.check_params({"changelog": "{{ changelog }}", "dry_run": True, "entries": 1}, config) == []
    assert participant.check_params({"changelog": "x", "changelog_file": "/x", "dry_run": "yes", "entries": 0,
                                     "trackers": ["nope"], "colour": 1}, config) == [
        "unknown param 'colour' (expected changelog, changelog_file, package, version, entries, approved_by, "
        "trackers, dry_run)",
        "give one of 'changelog' (text, or a list of {package, version, changelog}) and 'changelog_file'",
        "dry_run: expected true or false, got 'yes'",
        "entries: expected a whole number of at least 1, got 0",
        "trackers: unknown tracker(s) nope (configured: none)"]
    assert participant.check_params({"changelog_file": "relative/x.changes"}, config) == [
        "changelog_file: expected an absolute path, got 'relative/x.changes'"]


def test_the_shipped_configuration_checks() -> None:
    """``run_bot.py check`` on conf/ (with the sample bugzilla process) passes."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(ROOT / "run_bot.py"), "check", str(ROOT / "conf")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (Path(ROOT) / "conf" / "processes" / "bugzilla-publish.yaml").exists()
