"""Changelogs and the fixed-vs-mentioned rule (participants/bugzilla/changelog.py):
RPM and .changes entries, a reference directly after a trigger word (or
continuing its list) is fixed, everything else is mentioned."""
from __future__ import annotations

import pytest

from participants.bugzilla.changelog import PackageLog, collect, parse, references, syntax

BMC = syntax("bmc", r"BMC#(?P<key>\d+)", ["Fixes", "Resolves", "Closes"])
RHBZ = syntax("rhbz", r"rhbz#(?P<key>\d+)", ["Resolves"])

RPM = """\
* Mon Nov 20 2026 Jane Doe <jane@example.org> - 1.2-3
- Fixes: BMC#1, BMC#2
  and BMC#3
- Related: BMC#4

* Sun Nov 19 2026 Jane Doe <jane@example.org> - 1.2-2
- Fixes BMC#5
"""

CHANGES = """\
-------------------------------------------------------------------
Mon Nov 20 12:00:00 UTC 2026 - jane@example.org

- Update to 1.2:
  * Resolves rhbz#123456
  * see BMC#7

-------------------------------------------------------------------
Sun Nov 19 12:00:00 UTC 2026 - jane@example.org

- Closes BMC#8
"""


def fixed_and_mentioned(item: str) -> tuple[list[str], list[str]]:
    refs = references([item], [BMC, RHBZ])
    return [r.text for r in refs if r.fixed], [r.text for r in refs if not r.fixed]


def test_rpm_entries_with_versions_and_wrapped_items() -> None:
    entries = parse(RPM)
    assert [(e.version, e.items) for e in entries] == [
        ("1.2-3", ("Fixes: BMC#1, BMC#2 and BMC#3", "Related: BMC#4")),
        ("1.2-2", ("Fixes BMC#5",)),
    ]
    assert entries[0].header == "Mon Nov 20 2026 Jane Doe <jane@example.org>"


def test_changes_entries_and_sub_items() -> None:
    entries = parse(CHANGES)
    assert [e.header for e in entries] == ["Mon Nov 20 12:00:00 UTC 2026 - jane@example.org",
                                           "Sun Nov 19 12:00:00 UTC 2026 - jane@example.org"]
    assert entries[0].items == ("Update to 1.2:", "Resolves rhbz#123456", "see BMC#7")
    assert entries[1].items == ("Closes BMC#8",)


def test_text_without_a_header_is_one_entry() -> None:
    assert [e.items for e in parse("Fixes BMC#1\n- Related BMC#2")] == [("Fixes BMC#1", "Related BMC#2")]
    assert parse("") == []


@pytest.mark.parametrize("item, fixed, mentioned", [
    ("Fixes BMC#1", ["BMC#1"], []),
    ("Resolves: rhbz#123456", ["rhbz#123456"], []),
    ("fixes: BMC#1", ["BMC#1"], []),                                   # trigger words in any case
    ("Fixes BMC#1, BMC#2", ["BMC#1", "BMC#2"], []),                    # the list rule
    ("Fixes BMC#1, BMC#2 and BMC#3 & BMC#4 BMC#5", ["BMC#1", "BMC#2", "BMC#3", "BMC#4", "BMC#5"], []),
    ("Fixes BMC#1; see BMC#2", ["BMC#1"], ["BMC#2"]),                  # any other word ends the list
    ("Fixes BMC#1 and the crash in BMC#2", ["BMC#1"], ["BMC#2"]),
    ("Related: BMC#4", [], ["BMC#4"]),
    ("Fixes a crash (BMC#4)", [], ["BMC#4"]),                           # not directly after the trigger
    ("Prefixes BMC#4", [], ["BMC#4"]),                                  # whole words only
    ("Fixes rhbz#9", [], ["rhbz#9"]),                                   # not one of rhbz's triggers
    ("Resolves BMC#1, rhbz#9", ["BMC#1", "rhbz#9"], []),               # each tracker's own triggers
    ("Fixes BMC#1, rhbz#9", ["BMC#1"], ["rhbz#9"]),
    ("Revert \"Fixes BMC#3\"", [], ["BMC#3"]),                       # a revert fixes nothing
])
def test_fixed_versus_mentioned(item: str, fixed: list[str], mentioned: list[str]) -> None:
    assert fixed_and_mentioned(item) == (fixed, mentioned)


def test_collect_one_bug_per_tracker_fixed_wins_and_packages_are_kept() -> None:
    logs = [PackageLog("alpha", "", RPM), PackageLog("beta", "2.0", "- Related BMC#1\n- Fixes BMC#4"),
            PackageLog("gamma", "3", CHANGES)]
    bugs, messages = collect(logs, [BMC, RHBZ])
    assert messages == []
    assert {(t, b): r.fixed for (t, b), r in bugs.items()} == {
        ("bmc", 1): True, ("bmc", 2): True, ("bmc", 3): True, ("bmc", 4): True, ("bmc", 5): True,
        ("rhbz", 123456): True, ("bmc", 7): False, ("bmc", 8): True}
    one = bugs[("bmc", 1)]
    assert one.packages == {"alpha": ("1.2-3", ["Fixes: BMC#1, BMC#2 and BMC#3"]), "beta": ("2.0", ["Related BMC#1"])}
    assert bugs[("bmc", 4)].packages["alpha"] == ("1.2-3", ["Related: BMC#4"])


def test_entries_limits_each_changelog_to_its_newest() -> None:
    bugs, _ = collect([PackageLog("alpha", "", RPM), PackageLog("gamma", "", CHANGES)], [BMC, RHBZ], entries=1)
    assert sorted(bugs) == [("bmc", 1), ("bmc", 2), ("bmc", 3), ("bmc", 4), ("bmc", 7), ("rhbz", 123456)]


def test_a_reference_that_is_not_a_bug_number_is_reported() -> None:
    loose = syntax("loose", r"BUG-(?P<key>\w+)", ["Fixes"])
    bugs, messages = collect([PackageLog("p", "1", "- Fixes BUG-abc, BUG-0, BUG-12")], [loose])
    assert list(bugs) == [("loose", 12)] and bugs[("loose", 12)].fixed
    assert messages == ["BUG-abc in p: 'abc' is not a bug number; ignored", "BUG-0 in p: '0' is not a bug number; "
                                                                           "ignored"]
