"""Validation of configuration and process definitions: every problem is
reported as ``file:line: message``, all of them together, sorted by file and
line; ``run_bot.py check`` prints them and exits 1; the bot refuses to start
on them.
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bot.access import IrcIds
from bot.config import load_config
from engine.definitions import load_definitions
from engine.participants import ParticipantRegistry
from engine.yamlconfig import ConfigError, Problem, loads_yaml
from engine.durations import parse_duration
from participants import discover

ROOT = Path(__file__).resolve().parent.parent
PARTICIPANTS = ParticipantRegistry(discover()).names()
KNOWN = ", ".join(sorted(PARTICIPANTS))
EXPRESSIONS = "participant, sequence, concurrence, if, wait, repeat, for_each, subprocess, set, terminate, error"
BOT_KEYS = "database, durability, timezone, misfire, log_level, console, commands, schedules, networks, participants, outbox, notifications"
BAD_DURATION = "expected e.g. 90s, 4h, 2d, 1h30m"
P = "conf/processes/p.yaml"   # how a definition written by proc_problems() is named in problems

DEFAULTS = {
    "bot.yaml": """
        console:
          user: admin
        """,
    "users.yaml": """
        users:
          admin:
            roles:
              "*": [admins]
        """,
    "processes/hello.yaml": """
        name: hello
        steps:
          - participant: echo
            params: {text: "hello {{ who }}"}
        """,
}


def y(text: str) -> str:
    """Dedent; the first line of the result is line 1 of the file."""
    return textwrap.dedent(text).lstrip("\n")


def write(conf: Path, files: dict[str, str | None]) -> None:
    for rel, text in files.items():
        path = conf / rel
        if text is None:
            path.unlink(missing_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(y(text), encoding="utf-8")


def make_home(tmp_path: Path, files: dict[str, str | None]) -> Path:
    """A bot home with a minimal valid conf/, then ``files`` written over it."""
    write(tmp_path / "conf", {**DEFAULTS, **files})
    return tmp_path


def problems(tmp_path: Path, files: dict[str, str | None]) -> list[str]:
    home = make_home(tmp_path, files)
    with pytest.raises(ConfigError) as info:
        load_config(home / "conf", PARTICIPANTS)
    return [str(p) for p in info.value.problems]


def proc_problems(tmp_path: Path, text: str) -> list[str]:
    return problems(tmp_path, {"processes/p.yaml": text})


# -- parse_duration -------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("4h", 4 * 3600), ("2d", 2 * 86400), ("1h30m", 5400), ("500ms", 0.5),
    ("1w", 604800), ("1.5h", 5400), ("2m30s", 150), ("1d 2h", 93600), (" 10s ", 10), ("0s", 0),
    (90, 90.0), (2.5, 2.5), (0, 0.0),
])
def test_parse_duration_accepts(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize("text", [
    "", "   ", "10", "soon", "s", "4x", "-5s", "4H", "1h30", "h1", "5 minutes", "1.5.5s", "1h,30m",
    -1, -0.5, True, False, None, [], {"s": 1},
])
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration(text)


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_parse_duration_rejects_non_finite(value: float) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


# -- process definitions ----------------------------------------------------------

def test_unknown_participant(tmp_path: Path) -> None:
    assert proc_problems(tmp_path, """
        name: p
        steps:
          - id: first
            participant: ecko
        """) == [f"{P}:4: unknown participant 'ecko' (known: {KNOWN})"]


def test_unknown_expression(tmp_path: Path) -> None:
    assert proc_problems(tmp_path, """
        name: p
        steps:
          - participant: echo
          - id: second
            frobnicate: 1
        """) == [f"{P}:4: unknown expression 'frobnicate' (expected one of {EXPRESSIONS})"]


def test_two_expressions_in_one_step(tmp_path: Path) -> None:
    assert proc_problems(tmp_path, """
        name: p
        steps:
          - set: {a: 1}
            wait: 5s
        """) == [f"{P}:3: a step takes exactly one of {EXPRESSIONS}; found set, wait"]


@pytest.mark.parametrize("step, line, message", [
    ("- wait: soon", 3, f"wait: bad duration 'soon': {BAD_DURATION}"),
    ("- participant: hold\n  timeout: 3 days", 4, f"timeout: bad duration '3 days': {BAD_DURATION}"),
    ("- participant: hold\n  timeout: -5", 4, "timeout: bad duration -5: negative"),
    ("- participant: hold\n  timers: '4h: remind, xx: escalate'", 4,
     f"timers escalate: bad duration 'xx': {BAD_DURATION}"),
    ("- participant: hold\n  timers: '4h remind'", 4, "timers: bad entry '4h remind': expected 'DURATION: name'"),
    ("- participant: echo\n  on_error: {retry: 2, backoff: later}", 4,
     f"on_error backoff: bad duration 'later': {BAD_DURATION}"),
    ("- participant: echo\n  on_error:\n    retry: 2\n    backoff: 10 sec", 6,
     f"on_error backoff: bad duration '10 sec': {BAD_DURATION}"),
], ids=["wait", "timeout", "timeout-negative", "timers", "timers-entry", "backoff", "backoff-block"])
def test_bad_duration(tmp_path: Path, step: str, line: int, message: str) -> None:
    text = "name: p\nsteps:\n" + textwrap.indent(step, "  ") + "\n"
    assert problems(tmp_path, {"processes/p.yaml": text}) == [f"{P}:{line}: {message}"]


def test_bad_condition_in_if(tmp_path: Path) -> None:
    assert proc_problems(tmp_path, """
        name: p
        steps:
          - set: {x: 1}
          - if: "x =="
            then:
              - set: {y: 1}
        """) == [f"{P}:4: bad condition syntax 'x ==': unexpected 'end of template'"]


def test_bad_condition_in_break_if(tmp_path: Path) -> None:
    assert proc_problems(tmp_path, """
        name: p
        steps:
          - repeat:
              - set: {a: 1}
            max: 3
            break_if: "a >< 2"
        """) == [f"{P}:6: bad condition syntax 'a >< 2': unexpected '<'"]


def test_bad_template_in_params(tmp_path: Path) -> None:
    assert proc_problems(tmp_path, """
        name: p
        steps:
          - participant: echo
            params: {text: "hello {{ who }"}
        """) == [f"{P}:4: bad template syntax 'hello {{{{ who }}': unexpected '}}'"]


def test_every_bad_template_in_params_at_its_own_line(tmp_path: Path) -> None:
    assert proc_problems(tmp_path, """
        name: p
        steps:
          - participant: echo
            params:
              text: "{{ who }"
              other: "{% if %}"
        """) == [f"{P}:5: bad template syntax '{{{{ who }}': unexpected '}}'",
                 f"{P}:6: bad template syntax '{{% if %}}': Expected an expression, got 'end of statement block'"]


def test_missing_subprocess_step(tmp_path: Path) -> None:
    assert proc_problems(tmp_path, """
        name: p
        steps:
          - participant: echo
          - subprocess: missing
        """) == [f"{P}:4: subprocess 'missing' is not a known process"]


def test_existing_subprocess_is_fine(tmp_path: Path) -> None:
    home = make_home(tmp_path, {"processes/p.yaml": """
        name: p
        on_error: {subprocess: hello}
        steps:
          - subprocess: hello
          - participant: echo
            on_error: {retry: 1, then: {subprocess: hello}}
        """})
    assert set(load_config(home / "conf", PARTICIPANTS).specs) == {"hello", "p"}


def test_missing_subprocess_on_error_handler(tmp_path: Path) -> None:
    assert proc_problems(tmp_path, """
        name: p
        steps:
          - participant: echo
          - {participant: echo, on_error: {subprocess: gone}}
          - {participant: hold, timeout: 1h, on_timeout: {subprocess: gone2}}
          - {participant: echo, on_error: {retry: 2, then: {subprocess: gone3}}}
        """) == [f"{P}:4: subprocess 'gone' is not a known process",
                 f"{P}:5: subprocess 'gone2' is not a known process",
                 f"{P}:6: subprocess 'gone3' is not a known process"]


@pytest.mark.parametrize("text, line", [
    ("name: p\nsteps:\n  - id: call\n    subprocess: missing\n", 4),
    ("name: p\nsteps:\n  - participant: echo\n    on_error: {subprocess: missing}\n", 4),
    ("name: p\ndescription: d\non_error: {subprocess: missing}\nsteps:\n  - participant: echo\n", 3),
], ids=["subprocess-after-id", "step-on_error", "process-on_error"])
def test_missing_subprocess_line_is_the_key(tmp_path: Path, text: str, line: int) -> None:
    assert problems(tmp_path, {"processes/p.yaml": text}) == [
        f"{P}:{line}: subprocess 'missing' is not a known process"]


def test_unknown_key_in_step(tmp_path: Path) -> None:
    assert proc_problems(tmp_path, """
        name: p
        steps:
          - participant: echo
            colour: red
            params: {text: hi}
          - set: {a: 1}
            params: {b: 2}
        """) == [f"{P}:4: unknown key 'colour' in a participant step",
                 f"{P}:7: unknown key 'params' in a set step"]


def test_unknown_top_level_key_in_definition(tmp_path: Path) -> None:
    expected = ("name, description, project, launch_roles, inputs, fields, extra_fields, steps, timeout, "
                "on_timeout, on_error, on_cancel")
    assert proc_problems(tmp_path, """
        name: p
        description: d
        colour: red
        steps:
          - participant: echo
        """) == [f"{P}:3: unknown key 'colour' (expected {expected})"]


def test_duplicate_yaml_key_in_definition(tmp_path: Path) -> None:
    assert proc_problems(tmp_path, """
        name: p
        steps:
          - set: {a: 1}
            id: one
            set: {b: 2}
        """) == [f"{P}:5: YAML syntax: duplicate key 'set'"]


def test_yaml_syntax_error_in_definition(tmp_path: Path) -> None:
    assert proc_problems(tmp_path, """
        name: p
        description: a: b
        steps:
          - participant: echo
        """) == [f"{P}:2: YAML syntax: mapping values are not allowed here"]


@pytest.mark.parametrize("extra, line, where", [("", 4, "step"), ("    max: 0\n", 6, "max"),
                                                 ("    max: many\n", 6, "max")])
def test_repeat_needs_max(tmp_path: Path, extra: str, line: int, where: str) -> None:
    text = "name: p\nsteps:\n  - set: {a: 1}\n  - repeat:\n      - set: {a: 2}\n" + extra
    assert problems(tmp_path, {"processes/p.yaml": text}) == [
        f"{P}:{line}: repeat: needs 'max', a whole number of at least 1 (a loop must end)"]


@pytest.mark.parametrize("wait_for", ["0", "3", "some", "true"])
def test_concurrence_wait_for_out_of_range(tmp_path: Path, wait_for: str) -> None:
    text = y(f"""
        name: p
        steps:
          - concurrence:
              - participant: echo
              - - set: {{a: 1}}
                - set: {{b: 1}}
            wait_for: {wait_for}
        """)
    shown = {"some": "'some'", "true": "True"}.get(wait_for, wait_for)
    assert problems(tmp_path, {"processes/p.yaml": text}) == [
        f"{P}:7: wait_for: expected all, any or a number from 1 to 2, got {shown}"]


@pytest.mark.parametrize("wait_for", ["all", "any", "1", "2"])
def test_concurrence_wait_for_in_range(tmp_path: Path, wait_for: str) -> None:
    home = make_home(tmp_path, {"processes/p.yaml": y(f"""
        name: p
        steps:
          - concurrence: [{{participant: echo}}, {{set: {{a: 1}}}}]
            wait_for: {wait_for}
        """)})
    assert "p" in load_config(home / "conf", PARTICIPANTS).specs


def test_on_timeout_without_timeout(tmp_path: Path) -> None:
    assert proc_problems(tmp_path, """
        name: p
        on_timeout: skip
        steps:
          - participant: hold
            timers: "4h: remind"
            on_timeout: skip
          - participant: hold
            timeout: 1h
            on_timeout: skip
        """) == [f"{P}:2: on_timeout without a timeout",
                 f"{P}:6: on_timeout without a timeout"]


def test_timers_with_a_named_timer_on_a_non_participant_step(tmp_path: Path) -> None:
    assert proc_problems(tmp_path, """
        name: p
        steps:
          - wait: 5s
            timers: "4h: remind"
          - subprocess: hello
            timers: "1h: nag, 2h: timeout"
          - participant: hold
            timers: "4h: remind, 1d: timeout"
          - wait: 5s
            timers: "2h: timeout"
        """) == [f"{P}:4: timers other than 'timeout' only make sense on a participant step",
                 f"{P}:6: timers other than 'timeout' only make sense on a participant step"]


def test_duplicate_process_names_across_files(tmp_path: Path) -> None:
    assert problems(tmp_path, {
        "processes/a.yaml": "description: first\nname: hello\nsteps:\n  - participant: echo\n",
        "processes/b.yml": "steps:\n  - participant: echo\n",
        "processes/b.yaml": "steps:\n  - participant: echo\n",
    }) == ["conf/processes/b.yml:1: process 'b' is already defined in conf/processes/b.yaml",
           "conf/processes/hello.yaml:1: process 'hello' is already defined in conf/processes/a.yaml"]


def test_all_problems_of_one_definition_together(tmp_path: Path) -> None:
    assert proc_problems(tmp_path, """
        name: p
        colour: red
        steps:
          - participant: nope
          - frobnicate: 1
          - wait: soon
          - if: "x =="
            then: [{set: {a: 1}}]
          - repeat: [{set: {a: 1}}]
          - participant: echo
            on_timeout: skip
            size: 3
        """) == [
        f"{P}:2: unknown key 'colour' (expected name, description, project, launch_roles, inputs, fields, "
        "extra_fields, steps, timeout, on_timeout, on_error, on_cancel)",
        f"{P}:4: unknown participant 'nope' (known: {KNOWN})",
        f"{P}:5: unknown expression 'frobnicate' (expected one of {EXPRESSIONS})",
        f"{P}:6: wait: bad duration 'soon': {BAD_DURATION}",
        f"{P}:7: bad condition syntax 'x ==': unexpected 'end of template'",
        f"{P}:9: repeat: needs 'max', a whole number of at least 1 (a loop must end)",
        f"{P}:11: on_timeout without a timeout",
        f"{P}:12: unknown key 'size' in a participant step",
    ]


def test_missing_subprocess_reported_with_other_problems(tmp_path: Path) -> None:
    assert proc_problems(tmp_path, """
        name: p
        steps:
          - participant: nope
          - subprocess: missing
        """) == [f"{P}:3: unknown participant 'nope' (known: {KNOWN})",
                 f"{P}:4: subprocess 'missing' is not a known process"]


def test_duplicate_name_reported_with_other_problems(tmp_path: Path) -> None:
    assert problems(tmp_path, {"processes/a.yaml": "name: hello\nsteps:\n  - participant: nope\n"}) == [
        f"conf/processes/a.yaml:3: unknown participant 'nope' (known: {KNOWN})",
        "conf/processes/hello.yaml:1: process 'hello' is already defined in conf/processes/a.yaml"]


def test_load_definitions_directly(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text("steps:\n  - participant: ecko\n")
    with pytest.raises(ConfigError) as info:
        load_definitions(tmp_path, PARTICIPANTS, base=tmp_path)
    assert info.value.problems == [Problem("x.yaml", 2, f"unknown participant 'ecko' (known: {KNOWN})")]


def test_loads_yaml_line_numbers() -> None:
    data = loads_yaml("a: 1\nb:\n  c: [1, 2]\n  d:\n    - x\n    - y\n", "f.yaml")
    assert (data.line, data.line_of("a"), data.line_of("b"), data["b"].line_of("d")) == (1, 1, 2, 4)
    assert data["b"]["d"].item_lines == [5, 6]
    with pytest.raises(ConfigError, match=r"^f\.yaml:2: YAML syntax: duplicate key 'a'$"):
        loads_yaml("a: 1\na: 2\n", "f.yaml")


# -- bot.yaml ----------------------------------------------------------------------

def test_bot_unknown_keys_top_level_and_nested(tmp_path: Path) -> None:
    assert problems(tmp_path, {"bot.yaml": """
        database: var/bot.sqlite3
        colour: blue
        console:
          user: admin
          shell: zsh
        commands:
          prefix: "!"
          rate_limit:
            commands: 5
            burst: 10
            per: 10s
        """}) == [
        f"conf/bot.yaml:2: unknown key 'colour' in bot.yaml (expected {BOT_KEYS})",
        "conf/bot.yaml:5: unknown key 'shell' in console (expected user)",
        "conf/bot.yaml:10: unknown key 'burst' in commands rate_limit (expected commands, per)",
    ]


def test_bot_bad_values(tmp_path: Path) -> None:
    assert problems(tmp_path, {"bot.yaml": """
        durability: always
        timezone: Mars/Olympus
        misfire: sometimes
        log_level: LOUD
        console: {user: admin}
        commands:
          prefix: "! "
          max_room_lines: 0
          rate_limit: {commands: 5, per: soon}
        """}) == [
        "conf/bot.yaml:1: durability: expected full or normal",
        "conf/bot.yaml:2: timezone: unknown time zone 'Mars/Olympus'",
        "conf/bot.yaml:3: misfire: expected one of run_once, skip",
        "conf/bot.yaml:4: log_level: expected DEBUG, INFO, WARNING or ERROR",
        "conf/bot.yaml:7: prefix: a non-blank word",
        "conf/bot.yaml:8: max_room_lines: at least 1",
        f"conf/bot.yaml:9: per: bad duration 'soon': {BAD_DURATION}",
    ]


def test_a_rate_limit_window_too_short_to_limit_anything_is_refused(tmp_path: Path) -> None:
    assert problems(tmp_path, {"bot.yaml": """
        console: {user: admin}
        commands:
          rate_limit: {commands: 5, per: 0s}
        """}) == ["conf/bot.yaml:3: per: at least 1s (a shorter window turns the limit off)"]


def test_bot_yaml_duplicate_key_and_syntax_error(tmp_path: Path) -> None:
    assert problems(tmp_path, {"bot.yaml": "console:\n  user: admin\nconsole:\n  user: admin\n"}) == [
        "conf/bot.yaml:3: YAML syntax: duplicate key 'console'"]
    assert problems(tmp_path, {"bot.yaml": "console:\n  user: admin\ndatabase: [a\n"}) == [
        "conf/bot.yaml:4: YAML syntax: expected ',' or ']', but got '<stream end>'"]


def test_bot_yaml_missing(tmp_path: Path) -> None:
    assert problems(tmp_path, {"bot.yaml": None}) == [
        "conf/bot.yaml:0: missing: the bot's main configuration file"]


def test_schedule_problems(tmp_path: Path) -> None:
    found = problems(tmp_path, {"bot.yaml": """
        console: {user: admin}
        schedules:
          - name: bad-cron
            cron: "61 2 * * *"
            process: hello
          - name: unknown-process
            cron: "0 2 * * *"
            process: nosuch
          - name: bad-misfire
            cron: "0 2 * * *"
            process: hello
            misfire: never
          - name: no-process
            cron: "0 2 * * *"
          - name: extra
            cron: "0 2 * * *"
            process: hello
            colour: red
          - name: extra
            cron: "0 3 * * *"
            process: hello
        """})
    assert found[0].startswith("conf/bot.yaml:4: cron: bad cron expression '61 2 * * *': ")
    assert found[1:] == [
        "conf/bot.yaml:8: schedule 'unknown-process': unknown process 'nosuch'",
        "conf/bot.yaml:12: misfire: expected one of run_once, skip",
        "conf/bot.yaml:13: schedule: missing 'process'",
        "conf/bot.yaml:18: unknown key 'colour' in schedule (expected name, cron, process, fields, misfire)",
        "conf/bot.yaml:19: schedule 'extra' defined twice",
    ]


@pytest.mark.parametrize("cron", ["0 2 * *", "0 25 * * *", "every night"])
def test_bad_cron(tmp_path: Path, cron: str) -> None:
    [found] = problems(tmp_path, {"bot.yaml": f"""
        console: {{user: admin}}
        schedules:
          - {{name: s, process: hello, cron: "{cron}"}}
        """})
    assert found.startswith(f"conf/bot.yaml:3: cron: bad cron expression '{cron}': ")


@pytest.mark.parametrize("broken", [
    {"processes/a.yaml": "name: a\nsteps:\n  - participant: nope\n"},
    {"processes/hello.yaml": None, "processes/README.txt": "no definitions here"},
], ids=["a-definition-is-broken", "no-definitions"])
def test_schedule_unknown_process_reported_together(tmp_path: Path, broken: dict[str, str | None]) -> None:
    found = problems(tmp_path, {"bot.yaml": """
        console: {user: admin}
        schedules:
          - {name: s, cron: "0 2 * * *", process: nosuch}
        """, **broken})
    assert "conf/bot.yaml:3: schedule 's': unknown process 'nosuch'" in found


def test_console_user_not_in_users(tmp_path: Path) -> None:
    assert problems(tmp_path, {"bot.yaml": "database: var/x.sqlite3\nconsole:\n  user: mallory\n"}) == [
        "conf/bot.yaml:3: console user 'mallory' is not defined in users.yaml"]
    # no console section: the default user 'admin' must exist
    assert problems(tmp_path, {"bot.yaml": "database: var/x.sqlite3\n",
                               "users.yaml": "users:\n  alice: {roles: {'*': [admins]}}\n"}) == [
        "conf/bot.yaml:1: console user 'admin' is not defined in users.yaml"]


def test_network_with_bad_protocol(tmp_path: Path) -> None:
    assert problems(tmp_path, {"bot.yaml": """
        console: {user: admin}
        networks:
          - protocol: slack
            name: work
          - name: no-protocol
          - just-a-string
        """}) == [
        # a non-mapping entry is reported at the 'networks' key
        "conf/bot.yaml:2: network: 'protocol' must be one of irc, xmpp, email",
        "conf/bot.yaml:3: network: 'protocol' must be one of irc, xmpp, email",
        "conf/bot.yaml:5: network: 'protocol' must be one of irc, xmpp, email",
    ]


@pytest.mark.parametrize("protocol", ["irc", "xmpp"])
def test_a_network_entry_is_checked_by_its_adapter_with_file_and_line(tmp_path: Path, protocol: str) -> None:
    found = problems(tmp_path, {"bot.yaml": f"""
        console: {{user: admin}}
        networks:
          - protocol: {protocol}
            name: net
            colour: red
        """})
    assert any(p.startswith(f"conf/bot.yaml:5: {protocol} network 'net': unknown key 'colour'") for p in found), found
    assert all(p.startswith("conf/bot.yaml:") for p in found), found


@pytest.mark.parametrize("protocol, extra", [
    ("irc", "host: 127.0.0.1\n            nick: rb\n            tls: false"),
    ("xmpp", "jid: rb@localhost\n            password_env: RB_TEST_XMPP_PW"),
])
def test_commands_prefix_is_every_networks_default_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          protocol: str, extra: str) -> None:
    monkeypatch.setenv("RB_TEST_XMPP_PW", "pw")
    home = make_home(tmp_path, {"bot.yaml": f"""
        console: {{user: admin}}
        commands: {{prefix: "."}}
        networks:
          - protocol: {protocol}
            name: a
            {extra}
          - protocol: {protocol}
            name: b
            command_prefix: "?"
            {extra}
        """})
    config = load_config(home / "conf", PARTICIPANTS)
    assert [n.command_prefix for n in config.networks] == [".", "?"]


# -- users.yaml --------------------------------------------------------------------

ONE_IRC_NETWORK = """
    console: {user: admin}
    networks:
      - protocol: irc
        name: libera
        host: 127.0.0.1
        nick: rb
        tls: false
    """


def test_users_problems(tmp_path: Path) -> None:
    assert problems(tmp_path, {"bot.yaml": ONE_IRC_NETWORK, "users.yaml": """
        users:
          admin:
            roles:
              "*": [admins]
          alice:
            xmpp: [alice]
            irc:
              libera: {hostmasks: ["alice!~alice@"]}
          bob:
            xmpp: ["bob@example.org/laptop"]
            irc:
              libera: {hostmasks: ["bob!bob@*"]}
            roles:
              "Project": {publisher: yes}
          carol:
            irc: {libera: {hostmasks: ["carol@example.org", "*!*@*.*", "c!c@?*"]}}
            email: [carol]
            roles: [admins]
          dave:
            phone: 123
            roles:
              "*": 5
          erin:
            irc:
              accounts: [erin]
              oftc: {accounts: [erin]}
              libera: [erin]
          mallory:
            irc: {libera: {accounts: [ALICE, mallory]}}
            xmpp: [Erin@example.org]
          frank:
            irc: {libera: {accounts: [alice]}}
            xmpp: [erin@example.org]
        """}) == [
        "conf/users.yaml:6: user 'alice' xmpp: expected bare JIDs like alice@example.org",
        "conf/users.yaml:8: user 'alice': hostmask 'alice!~alice@' must be nick!user@host whose host "
        "part names a host or network, like *.example.org (it is the weaker, explicit fallback)",
        "conf/users.yaml:10: user 'bob' xmpp: expected bare JIDs like alice@example.org",
        "conf/users.yaml:12: user 'bob': hostmask 'bob!bob@*' must be nick!user@host whose host "
        "part names a host or network, like *.example.org (it is the weaker, explicit fallback)",
        "conf/users.yaml:14: user 'bob' roles on 'Project': expected a list of role names",
        "conf/users.yaml:16: user 'carol': hostmask '*!*@*.*' must be nick!user@host whose "
        "host part names a host or network, like *.example.org (it is the weaker, explicit fallback)",
        "conf/users.yaml:16: user 'carol': hostmask 'c!c@?*' must be nick!user@host whose "
        "host part names a host or network, like *.example.org (it is the weaker, explicit fallback)",
        "conf/users.yaml:16: user 'carol': hostmask 'carol@example.org' must be nick!user@host whose "
        "host part names a host or network, like *.example.org (it is the weaker, explicit fallback)",
        "conf/users.yaml:17: user 'carol' email: expected addresses",
        "conf/users.yaml:18: user 'carol' roles: expected project -> [roles] (use '*' for every project)",
        "conf/users.yaml:20: unknown key 'phone' in user 'dave' (expected irc, xmpp, email, roles)",
        "conf/users.yaml:22: user 'dave' roles on '*': expected a list of role names",
        "conf/users.yaml:25: user 'erin' irc: 'accounts' is not an IRC network in bot.yaml (libera); "
        "accounts belong to one network: irc: {<network>: {accounts: [...]}}",
        "conf/users.yaml:26: user 'erin' irc: 'oftc' is not an IRC network in bot.yaml (libera); "
        "accounts belong to one network: irc: {<network>: {accounts: [...]}}",
        "conf/users.yaml:27: user 'erin' irc 'libera': expected a mapping",
        "conf/users.yaml:32: user 'frank': IRC account 'alice' on libera is already user 'mallory''s "
        "(an identity belongs to one user)",
        "conf/users.yaml:33: user 'frank': XMPP address 'erin@example.org' is already user 'mallory''s "
        "(an identity belongs to one user)",
    ]


def test_users_valid_forms(tmp_path: Path) -> None:
    home = make_home(tmp_path, {"bot.yaml": ONE_IRC_NETWORK, "users.yaml": """
        users:
          admin:
            roles: {"*": admins}
          bob:
            irc: {libera: {accounts: bob, hostmasks: ["bob!~bob@*.example.org"]}}
            xmpp: bob@example.org
            email: [bob@example.org]
            roles: {"Project:Devel": [publishers, testers]}
        """})
    users = {u.name: u for u in load_config(home / "conf", PARTICIPANTS).users}
    assert users["admin"].roles == {"*": frozenset({"admins"})}
    assert users["bob"].xmpp_jids == ("bob@example.org",)
    assert users["bob"].irc == {"libera": IrcIds(("bob",), ("bob!~bob@*.example.org",))}


USERS_YAML_ERRORS = [
    ('users:\n  admin:\n    roles: {"*": [admins]\n',
     "conf/users.yaml:4: YAML syntax: expected ',' or '}', but got '<stream end>'"),
    ('users:\n  admin:\n    roles: {"*": [admins]}\n  admin:\n    roles: {"*": [admins]}\n',
     "conf/users.yaml:4: YAML syntax: duplicate key 'admin'"),
]


@pytest.mark.parametrize("text, problem", USERS_YAML_ERRORS, ids=["syntax", "duplicate-key"])
def test_users_yaml_syntax_error_is_reported(tmp_path: Path, text: str, problem: str) -> None:
    assert problem in problems(tmp_path, {"users.yaml": text})


@pytest.mark.parametrize("text, problem", USERS_YAML_ERRORS, ids=["syntax", "duplicate-key"])
def test_users_yaml_syntax_error_alone(tmp_path: Path, text: str, problem: str) -> None:
    assert problems(tmp_path, {"users.yaml": text}) == [problem]


# -- every problem of a configuration at once -----------------------------------------

BROKEN: dict[str, str | None] = {
    "bot.yaml": """
        database: var/bot.sqlite3
        timezone: Mars/Olympus
        console:
          user: mallory
        commands:
          rate_limit: {commands: 5, burst: 1}
        schedules:
          - name: nightly
            cron: "0 2 * * * *"
            process: hello
        networks:
          - protocol: slack
        """,
    "users.yaml": """
        users:
          admin:
            xmpp: [admin]
            roles: {"*": [admins]}
        """,
    "processes/hello.yaml": """
        name: hello
        steps:
          - participant: ecko
          - wait: soon
        """,
    "processes/loop.yaml": """
        name: loop
        steps:
          - repeat:
              - set: {a: 1}
            break_if: "a =="
        """,
    "processes/zz-syntax.yaml": """
        name: zz
        steps:
          - set: {a: 1}
            set: {b: 2}
        """,
}


def broken_expected() -> list[str]:
    return [
        "conf/bot.yaml:2: timezone: unknown time zone 'Mars/Olympus'",
        "conf/bot.yaml:4: console user 'mallory' is not defined in users.yaml",
        "conf/bot.yaml:6: unknown key 'burst' in commands rate_limit (expected commands, per)",
        "conf/bot.yaml:9: cron: bad cron expression '0 2 * * * *': ",   # + APScheduler's explanation
        "conf/bot.yaml:12: network: 'protocol' must be one of irc, xmpp, email",
        "conf/processes/hello.yaml:3: unknown participant 'ecko' (known: " + KNOWN + ")",
        "conf/processes/hello.yaml:4: wait: bad duration 'soon': " + BAD_DURATION,
        "conf/processes/loop.yaml:3: repeat: needs 'max', a whole number of at least 1 (a loop must end)",
        "conf/processes/loop.yaml:5: bad condition syntax 'a ==': unexpected 'end of template'",
        "conf/processes/zz-syntax.yaml:4: YAML syntax: duplicate key 'set'",
        "conf/users.yaml:3: user 'admin' xmpp: expected bare JIDs like alice@example.org",
    ]


def assert_lines(actual: list[str], expected: list[str]) -> None:
    """Equal, except that an expected line ending in ': ' only fixes the start of its line."""
    assert len(actual) == len(expected), "\n".join(actual)
    for got, want in zip(actual, expected):
        assert got.startswith(want) if want.endswith(": ") else got == want


def test_all_problems_of_several_files_together_sorted(tmp_path: Path) -> None:
    home = make_home(tmp_path, BROKEN)
    with pytest.raises(ConfigError) as info:
        load_config(home / "conf", PARTICIPANTS)
    found = info.value.problems
    assert found == sorted(found, key=lambda p: (p.file, p.line))
    assert_lines([str(p) for p in found], broken_expected())
    assert str(info.value) == "\n".join(str(p) for p in found)


# -- the command line ---------------------------------------------------------------

def run_bot(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "run_bot.py"), *args], cwd=cwd, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=30)


@pytest.fixture
def broken_home(tmp_path: Path) -> Path:
    """A copy of the shipped conf/, broken in several files."""
    home = tmp_path / "home"
    shutil.copytree(ROOT / "conf", home / "conf")
    write(home / "conf", BROKEN)
    return home


def test_check_shipped_conf_passes(tmp_path: Path) -> None:
    result = run_bot("check", str(ROOT / "conf"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.fullmatch(re.escape(str(ROOT / "conf")) + r": OK: \d+ process\(es\), \d+ schedule\(s\), "
                        r"\d+ user\(s\), \d+ network\(s\)\n", result.stdout)
    assert "Traceback" not in result.stderr


def test_check_copy_of_shipped_conf_passes(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    result = run_bot("check", "conf", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"{(tmp_path / 'conf').resolve()}: OK: ")
    assert result.stdout.count("\n") == 1


def test_check_broken_conf_prints_every_problem(broken_home: Path) -> None:
    result = run_bot("check", str(broken_home / "conf"), cwd=broken_home)
    assert result.returncode == 1
    assert_lines(result.stdout.splitlines(), broken_expected())
    assert result.stderr.strip().splitlines()[-1] == f"{len(broken_expected())} problem(s) found"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("mode", [["--console"], ["run"]])
def test_bot_refuses_to_start_on_broken_conf(broken_home: Path, mode: list[str]) -> None:
    result = run_bot(*mode, "--conf", str(broken_home / "conf"), cwd=broken_home)
    assert result.returncode == 1
    err = result.stderr.splitlines()
    assert_lines([line for line in err if line.startswith("conf/")], broken_expected())
    assert err[-1] == "refusing to start: fix the configuration (python run_bot.py check)"
    assert "release bot ready" not in result.stdout
    assert not (broken_home / "var" / "bot.sqlite3").exists()
    assert not list(broken_home.rglob("*.sqlite3*"))


@pytest.mark.parametrize("mask, broad", [
    ("bob!~bob@build.example.org", False), ("*!*@*.example.org", False), ("*!~bob@192.168.1.*", False),
    ("bob!*@user/bob", False), ("*!*@2001:db8:*", False),
    ("*!*@*.*", True), ("*!*@*-*", True), ("*!*@*:*", True), ("*!*@*/*", True), ("*!*@user/*", True),
    ("*!*@[a-z]*", True), ("*!*@*e*", True), ("*!*@*.org", True), ("*!*@10.*", True), ("*!*@", True),
])
def test_a_hostmask_must_pin_a_host_or_network(mask: str, broad: bool) -> None:
    from bot.config import _too_broad
    assert _too_broad(mask) is broad


def test_a_broken_network_entry_is_reported_once_not_again_for_every_user_on_it(tmp_path: Path) -> None:
    found = problems(tmp_path, {"bot.yaml": """
        console: {user: admin}
        networks:
          - protocol: irc
            name: libera
            nick: rb
        """, "users.yaml": """
        users:
          admin:
            irc: {libera: {accounts: [admin]}}
            roles: {"*": [admins]}
        """})
    assert found and all(p.startswith("conf/bot.yaml:") for p in found), found


# -- warnings: reported by check, never stopping it ------------------------------------------

SECRET_NETWORKS = """
    console: {user: admin}
    networks:
      - protocol: irc
        name: libera
        host: 127.0.0.1
        tls: false
        nick: rb
        sasl_password_env: RB_TEST_UNSET_IRC_PASSWORD
      - protocol: xmpp
        name: jabber
        jid: rb@localhost
        tls: plaintext
        password_env: RB_TEST_UNSET_XMPP_PASSWORD
    """


def test_check_needs_no_secrets_but_the_bot_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RB_TEST_UNSET_IRC_PASSWORD", raising=False)
    monkeypatch.delenv("RB_TEST_UNSET_XMPP_PASSWORD", raising=False)
    home = make_home(tmp_path, {"bot.yaml": SECRET_NETWORKS})
    result = run_bot("check", str(home / "conf"), cwd=home)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(": warning: ")[0] for line in lines[:2]] == ["conf/bot.yaml:8", "conf/bot.yaml:13"]
    assert "RB_TEST_UNSET_IRC_PASSWORD is not set" in lines[0] and "refuse to start" in lines[0]
    assert "RB_TEST_UNSET_XMPP_PASSWORD is not set" in lines[1]
    assert lines[2].endswith(", 2 warning(s)")
    started = run_bot("run", "--conf", str(home / "conf"), cwd=home)
    assert started.returncode == 1
    assert any(line.startswith("conf/bot.yaml:8: ") and "RB_TEST_UNSET_IRC_PASSWORD" in line
               for line in started.stderr.splitlines()), started.stderr


def test_hostmasks_on_a_network_that_does_not_allow_them_get_a_warning(tmp_path: Path) -> None:
    home = make_home(tmp_path, {"bot.yaml": """
        console: {user: admin}
        networks:
          - protocol: irc
            name: libera
            host: 127.0.0.1
            tls: false
            nick: rb
            allow_hostmask: false
        """, "users.yaml": """
        users:
          admin:
            roles: {"*": [admins]}
          bob:
            irc: {libera: {accounts: [bob], hostmasks: ["bob!~bob@build.example.org"]}}
        """})
    config = load_config(home / "conf", PARTICIPANTS)
    assert [str(w) for w in config.warnings] == [
        "conf/users.yaml:5: user 'bob': hostmasks on libera are never used: that network has allow_hostmask: false"]
    result = run_bot("check", str(home / "conf"), cwd=home)
    assert result.returncode == 0 and result.stdout.splitlines()[0].startswith("conf/users.yaml:5: warning: ")


def test_a_schedule_with_a_field_its_process_does_not_declare_is_refused_at_check(tmp_path: Path) -> None:
    assert problems(tmp_path, {"bot.yaml": """
        console: {user: admin}
        schedules:
          - name: nightly
            cron: "0 2 * * *"
            process: counted
            fields: {rpeo: devel, count: many}
        """, "processes/counted.yaml": """
        inputs: {repo: str, count: int}
        steps:
          - participant: echo
            params: {text: "{{ repo }} {{ count }}"}
        """}) == ["conf/bot.yaml:6: schedule 'nightly': count: expected a whole number, got 'many'",
                  "conf/bot.yaml:6: schedule 'nightly': unknown field 'rpeo' (did you mean 'repo'?)"]
