"""Arguments for programs run without a shell: the one place that decides
what may become an argument.  Every participant that runs a program (the
``command`` participant, the repository publishers) builds its argv here.

No shell ever sees an argument, so ``repo=x; id`` is one harmless argument.
What is left is *option injection*: a value from the fields (and so from a
chat line) that starts with ``-`` is read by most programs as an option
(``repo=--delete``, ``-e sh``).  The rules:

* An argument written literally in the definition may be anything
  (``--update``, ``-v``): the definition's author wrote it.
* An argument rendered from a template (``"{{ path }}"``) is an *operand*:
  it may not start with ``-``, unless a literal ``--`` comes before it in
  argv (the end of options, for programs that honour it).
* A rendered option must be marked as one: ``{option: "--level={{ n }}"}``.
  Its name is literal: the template starts with ``-`` and a letter or digit
  (``-o``, ``--level=``) before any ``{{``, and the rendered value must still
  start with that literal text, so a field can give the value, never choose
  the option.
* The program (``argv[0]``) is literal.
* No argument may hold NUL, a newline or a carriage return; only strings and
  numbers become arguments (not lists, mappings, booleans or nothing).

The engine renders params before a participant sees them, so telling
literal from rendered needs the definition as written: ``build_argv`` takes
both the rendered argv and its source (``services.step_params(workitem)``)
and compares them element by element.  ``argv_problems`` checks the source
when definitions are checked, so most mistakes are found by
``run_bot.py check``; ``build_argv`` checks again at run time, always.

For participants that build argv in code from values: ``operand(value)``
for a value in an operand position, ``option(value)`` for a value that must
be an option, ``text(value)`` for anything else.
"""
from __future__ import annotations

import os
import re
from typing import Any, Sequence

OPTION_KEY = "option"
_OPTION_NAME = re.compile(r"^--?[A-Za-z0-9]")


class UnsafeArgument(ValueError):
    """An argument that must not reach a program; the message says which and why."""


def is_template(value: Any) -> bool:
    """What the engine renders: a string holding ``{{`` or ``{%``."""
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def text(value: Any, what: str = "argument") -> str:
    """Any argument: a string or a number, without NUL, newline or carriage return."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UnsafeArgument(f"{what}: expected text or a number, got {type(value).__name__} {_show(value)}")
    result = str(value)
    for bad, name in (("\0", "NUL"), ("\n", "a newline"), ("\r", "a carriage return")):
        if bad in result:
            raise UnsafeArgument(f"{what}: {_show(result)} holds {name}")
    return result


def operand(value: Any, what: str = "argument") -> str:
    """A value in an operand position: it may not start with ``-``."""
    result = text(value, what)
    if result.startswith("-"):
        raise UnsafeArgument(f"{what}: {_show(result)} starts with '-' and would be read as an option; "
                             "put a literal '--' before it, or mark the position {option: ...} in the definition")
    return result


def option(value: Any, what: str = "option") -> str:
    """A value that must be an option (``-o``, ``--level=3``)."""
    result = text(value, what)
    if not _OPTION_NAME.match(result):
        raise UnsafeArgument(f"{what}: {_show(result)} is not an option (-x or --name)")
    return result


def literal_prefix(template: str) -> str:
    """The text of a template before its first ``{{`` or ``{%``."""
    cut = [i for i in (template.find("{{"), template.find("{%")) if i >= 0]
    return template[:min(cut)] if cut else template


def path_problem(source: Any, what: str = "path") -> str | None:
    """What is wrong with a path as written in a definition: it must be absolute, and a
    template must start with a literal absolute directory (``/srv/repos/{{ repo }}``), the
    one that ``confined_path`` keeps the rendered path in."""
    if not isinstance(source, str):
        return f"{what}: expected a path, got {_show(source)}"
    literal = literal_prefix(source) if is_template(source) else source
    if not os.path.isabs(literal):
        return (f"{what}: expected an absolute path" + (" whose literal start names a directory "
                "(like /srv/repos/{{ repo }})" if is_template(source) else "") + f", got {source!r}")
    return None


def confined_path(rendered: Any, source: Any, what: str = "path") -> str:
    """A path param, rendered: absolute, and when the definition made it from a template, inside
    the directory its literal start names, with no ``..`` (a field gives a name inside that
    directory, never another place).  Raises UnsafeArgument."""
    path = text(rendered, what)
    problem = path_problem(source, what)
    if problem:
        raise UnsafeArgument(problem)
    if not os.path.isabs(path):
        raise UnsafeArgument(f"{what}: expected an absolute path, got {_show(path)}")
    if is_template(source):
        if ".." in path.split("/"):
            raise UnsafeArgument(f"{what}: {_show(path)} may not contain '..'")
        base = os.path.realpath(os.path.dirname(literal_prefix(str(source))) or "/")
        if os.path.commonpath([base, os.path.realpath(path)]) != base:
            raise UnsafeArgument(f"{what}: {_show(path)} is outside {base}")
    return path


def argv_problems(source: Any, allow: Sequence[str] | None = None) -> list[str]:
    """Problems with an argv as written in a definition (nothing rendered);
    ``allow``: the programs it may run (None: any)."""
    if not isinstance(source, list) or not source:
        return ["argv: expected a list: the program, then its arguments (never a shell string)"]
    problems: list[str] = []
    program = source[0]
    if not isinstance(program, str) or is_template(program) or not program:
        problems.append("argv[0]: the program must be written literally (not rendered from fields)")
    elif program.startswith("-"):
        problems.append(f"argv[0]: {program!r} is not a program")
    elif allow is not None and program not in allow:
        problems.append(f"argv[0]: {program!r} is not allowed (participants: command: allow: "
                        f"{', '.join(allow) or 'nothing'})")
    for index, element in enumerate(source[1:], 1):
        what = f"argv[{index}]"
        if isinstance(element, dict):
            if set(element) != {OPTION_KEY} or not isinstance(element[OPTION_KEY], str):
                problems.append(f"{what}: a mapping in argv must be {{{OPTION_KEY}: \"--name={{{{ value }}}}\"}}")
            elif not _OPTION_NAME.match(literal_prefix(element[OPTION_KEY])):
                problems.append(f"{what}: an option's name must be written literally: it starts with '-' and a "
                                f"letter or digit before any template ({element[OPTION_KEY]!r})")
            continue
        try:
            text(element, what)
        except UnsafeArgument as exc:
            if not is_template(element):
                problems.append(str(exc))
    return problems


def build_argv(rendered: Any, source: Any) -> list[str]:
    """The argv to run: ``rendered`` (as the engine rendered it) checked
    against ``source`` (as the definition wrote it), element by element.
    Raises UnsafeArgument."""
    problems = argv_problems(source)
    if problems:
        raise UnsafeArgument(problems[0])
    if not isinstance(rendered, list) or len(rendered) != len(source):
        raise UnsafeArgument("argv: does not match the step's definition")
    argv: list[str] = []
    options_end = False
    for index, (value, written) in enumerate(zip(rendered, source)):
        what = f"argv[{index}]"
        if isinstance(written, dict):
            if not isinstance(value, dict) or set(value) != {OPTION_KEY}:
                raise UnsafeArgument(f"{what}: does not match the step's definition")
            result = option(value[OPTION_KEY], what)
            if not result.startswith(literal_prefix(written[OPTION_KEY])):
                raise UnsafeArgument(f"{what}: {_show(result)} does not keep the option "
                                     f"{literal_prefix(written[OPTION_KEY])!r} written in the definition")
        elif is_template(written):
            result = text(value, what) if options_end else operand(value, what)
        else:
            result = text(value, what)
            if result != text(written, what):
                raise UnsafeArgument(f"{what}: does not match the step's definition")
            if result == "--" and index > 0:
                options_end = True
        argv.append(result)
    return argv


def _show(value: Any, limit: int = 60) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else shown[:limit - 3] + "..."
