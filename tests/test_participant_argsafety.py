"""participants/argsafety.py: which values may become a program's arguments."""
from __future__ import annotations

import pytest

from participants.argsafety import UnsafeArgument, argv_problems, build_argv, operand, option, text


def test_literal_arguments_may_be_options_rendered_ones_may_not() -> None:
    source = ["createrepo_c", "--update", "{{ path }}"]
    assert build_argv(["createrepo_c", "--update", "/srv/repo"], source) == ["createrepo_c", "--update", "/srv/repo"]
    with pytest.raises(UnsafeArgument, match=r"argv\[2\]: '--delete' starts with '-'"):
        build_argv(["createrepo_c", "--update", "--delete"], source)
    with pytest.raises(UnsafeArgument, match=r"argv\[2\]: '-e sh' starts with '-'"):
        build_argv(["createrepo_c", "--update", "-e sh"], source)


def test_a_shell_line_in_a_field_is_one_harmless_argument() -> None:
    assert build_argv(["ls", "x; id"], ["ls", "{{ repo }}"]) == ["ls", "x; id"]


def test_after_a_literal_double_dash_rendered_values_may_start_with_a_dash() -> None:
    source = ["rm", "--", "{{ name }}"]
    assert build_argv(["rm", "--", "-rf"], source) == ["rm", "--", "-rf"]
    # a rendered '--' is an operand like any other value: it ends nothing
    with pytest.raises(UnsafeArgument):
        build_argv(["rm", "--", "-x"], ["rm", "{{ end }}", "{{ name }}"])


def test_marked_options_keep_their_literal_name() -> None:
    source = ["tool", {"option": "--level={{ n }}"}]
    assert build_argv(["tool", {"option": "--level=3"}], source) == ["tool", "--level=3"]
    assert build_argv(["tool", {"option": "--level=--x"}], source) == ["tool", "--level=--x"]
    with pytest.raises(UnsafeArgument, match="does not keep the option '--level='"):
        build_argv(["tool", {"option": "--delete"}], source)
    assert argv_problems(["tool", {"option": "{{ flag }}"}]) == [
        "argv[1]: an option's name must be written literally: it starts with '-' and a letter or digit "
        "before any template ('{{ flag }}')"]
    assert argv_problems(["tool", {"option": "-{{ flags }}"}])
    assert argv_problems(["tool", {"option": "--x", "other": 1}])


def test_nul_newline_and_non_text_are_refused() -> None:
    for bad in ("a\0b", "a\nb", "a\rb"):
        with pytest.raises(UnsafeArgument):
            build_argv(["echo", bad], ["echo", "{{ x }}"])
    for bad in ([1, 2], {"a": 1}, None, True):
        with pytest.raises(UnsafeArgument, match="expected text or a number"):
            build_argv(["echo", bad], ["echo", "{{ x }}"])
    assert build_argv(["echo", 3, 1.5], ["echo", "{{ n }}", 1.5]) == ["echo", "3", "1.5"]
    assert argv_problems(["echo", "line\nbreak"]) == ["argv[1]: 'line\\nbreak' holds a newline"]


def test_the_program_is_literal_and_argv_a_list() -> None:
    assert argv_problems("rm -rf {{ x }}") == [
        "argv: expected a list: the program, then its arguments (never a shell string)"]
    assert argv_problems([]) and argv_problems(["{{ tool }}", "x"]) and argv_problems(["-rf"])
    assert argv_problems(["rsync", "-a"], allow=["createrepo_c"]) == [
        "argv[0]: 'rsync' is not allowed (participants: command: allow: createrepo_c)"]
    assert argv_problems(["rsync", "-a", "{{ src }}"], allow=["rsync"]) == []


def test_rendered_params_must_match_the_definition() -> None:
    with pytest.raises(UnsafeArgument, match="does not match"):
        build_argv(["ls", "-la"], ["ls", "-l"])
    with pytest.raises(UnsafeArgument, match="does not match"):
        build_argv(["ls", "a", "b"], ["ls", "{{ a }}"])
    with pytest.raises(UnsafeArgument, match="does not match"):
        build_argv(["tool", "--level=3"], ["tool", {"option": "--level={{ n }}"}])


def test_helpers_for_participants_that_build_argv_in_code() -> None:
    assert operand("repo") == "repo" and option("-v") == "-v" and text("-x") == "-x"
    with pytest.raises(UnsafeArgument):
        operand("--delete", "repository")
    with pytest.raises(UnsafeArgument):
        option("delete")
    with pytest.raises(UnsafeArgument):
        text("a\nb")
