"""Conditions and templated params: Jinja2's sandboxed environment over the
workitem fields.  No ``eval``, no Python from YAML; undefined fields are
errors (a typo must not silently read as false)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, Undefined, meta
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

_env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


class TemplateProblem(Exception):
    """A condition or template failed to compile or to evaluate."""


def check_expression(source: str) -> str | None:
    """None if ``source`` compiles as a condition, else the syntax error."""
    try:
        _expression(source)
    except TemplateSyntaxError as exc:
        return f"bad condition syntax {source!r}: {exc.message}"
    return None


def check_template(value: Any) -> str | None:
    """None if every string inside ``value`` compiles as a template."""
    if isinstance(value, str):
        if _is_template(value):
            try:
                _compile(value)
            except TemplateSyntaxError as exc:
                return f"bad template syntax {value!r}: {exc.message}"
        return None
    if isinstance(value, dict):
        for item in value.values():
            problem = check_template(item)
            if problem:
                return problem
    if isinstance(value, list):
        for item in value:
            problem = check_template(item)
            if problem:
                return problem
    return None


def fields_read(value: Any, *, condition: bool = False) -> set[str]:
    """The field names a template (every string inside ``value``) or, with
    ``condition``, an expression reads; empty for what does not compile."""
    if isinstance(value, dict):
        return set().union(*(fields_read(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(fields_read(v) for v in value)) if value else set()
    if not isinstance(value, str) or not (condition or _is_template(value)):
        return set()
    try:
        return set(_names(f"{{{{ ({value}) }}}}" if condition else value))
    except TemplateSyntaxError:
        return set()


def evaluate(source: str, fields: dict[str, Any]) -> Any:
    try:
        return _defined(_expression(source)(**fields))
    except TemplateError as exc:
        raise TemplateProblem(f"condition {source!r}: {exc.message or exc}") from None
    except Exception as exc:  # arithmetic on wrong types, etc.
        raise TemplateProblem(f"condition {source!r}: {type(exc).__name__}: {exc}") from None


def render(value: Any, fields: dict[str, Any]) -> Any:
    """Render every template string inside ``value``.  A string that is one
    ``{{ expression }}`` keeps the expression's type (a number stays a number)."""
    if isinstance(value, str):
        if not _is_template(value):
            return value
        stripped = value.strip()
        try:
            if (stripped.startswith("{{") and stripped.endswith("}}")
                    and stripped.count("{{") == 1 and "{%" not in stripped):
                return _defined(_expression(stripped[2:-2].strip())(**fields))
            return _compile(value).render(**fields)
        except TemplateError as exc:
            raise TemplateProblem(f"template {value!r}: {exc.message or exc}") from None
        except Exception as exc:
            raise TemplateProblem(f"template {value!r}: {type(exc).__name__}: {exc}") from None
    if isinstance(value, dict):
        return {k: render(v, fields) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, fields) for v in value]
    return value


def _defined(value: Any) -> Any:
    if isinstance(value, Undefined):
        value._fail_with_undefined_error()
    return value


def _is_template(text: str) -> bool:
    return "{{" in text or "{%" in text


@lru_cache(maxsize=1024)
def _expression(source: str) -> Any:
    return _env.compile_expression(source, undefined_to_none=False)


@lru_cache(maxsize=1024)
def _compile(source: str) -> Any:
    return _env.from_string(source)


@lru_cache(maxsize=1024)
def _names(source: str) -> frozenset[str]:
    return frozenset(meta.find_undeclared_variables(_env.parse(source))) - frozenset(_env.globals)


@dataclass(frozen=True)
class MessageTemplate:
    """A message for chat and mail: the chat line, and the mail's subject and
    body (by default the chat line's first line, and the chat line).  Named in
    bot.yaml by the notify step and by the notification routes."""

    chat: str
    subject: str = ""
    body: str = ""

    def render(self, scope: dict[str, Any]) -> tuple[str, str, str]:
        """(chat, subject, body) over ``scope``; TemplateProblem if one fails."""
        chat = str(render(self.chat, scope))
        subject = str(render(self.subject, scope)) if self.subject else chat.split("\n", 1)[0]
        body = str(render(self.body, scope)) if self.body else chat
        return chat, subject, body
