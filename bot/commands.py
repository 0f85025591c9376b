"""One command dispatcher for every front-end, and the commands it knows.

A command is a coroutine tagged with ``@command``; ``Registry.collect``
gathers tagged functions, and help text comes from their tags.  Handlers
get a ``Context`` and return the reply lines; a ``CommandError`` is the
user's mistake (usage, not allowed, unknown id) and changes nothing.
"""
from __future__ import annotations

import logging
import re
import shlex
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable

import yaml

from bot.access import ADMINS, Caller, Directory
from bot.chat import Message
from bot.pacing import Cooldown
from bot.rendering import detail_lines, history_line, schedule_line, summary_line
from engine.errors import EngineError

log = logging.getLogger(__name__)

Handler = Callable[["Context"], Awaitable[list[str]]]


class CommandError(Exception):
    """A user-facing refusal: one line, nothing changed."""


@dataclass(frozen=True)
class CommandSpec:
    name: str
    usage: str            # "launch <process> [key=value ...]"
    summary: str
    privileged: bool      # needs a verified, known user
    handler: Handler


def command(usage: str, summary: str, *, privileged: bool = True) -> Callable[[Handler], Handler]:
    """Tag a handler; the command's name is the first word of ``usage``."""
    def tag(fn: Handler) -> Handler:
        fn._command = CommandSpec(usage.split()[0], usage, summary, privileged, fn)  # type: ignore[attr-defined]
        return fn
    return tag


class Registry:
    def __init__(self) -> None:
        self.commands: dict[str, CommandSpec] = {}

    def collect(self, namespace: Iterable[Any]) -> "Registry":
        for obj in namespace:
            spec = getattr(obj, "_command", None)
            if isinstance(spec, CommandSpec):
                if spec.name in self.commands:
                    raise ValueError(f"command {spec.name!r} defined twice")
                self.commands[spec.name] = spec
        return self


@dataclass
class Context:
    caller: Caller
    message: Message
    args: list[str]
    spec: CommandSpec
    engine: Any
    registry: Registry

    @property
    def actor(self) -> str:
        """Who did it, for the history: user name, network and how verified."""
        ident = self.caller.identity
        who = self.caller.user.name if self.caller.user else ident.handle
        return f"{who} via {ident.protocol}:{ident.network}"

    def require(self, role: str, project: str | None = None) -> None:
        user = self.caller.user
        if user is None or not user.has_role(role, project):
            where = f" on {project}" if project else ""
            raise CommandError(f"not authorised: {self.spec.name} needs role {role!r}{where}")

    def usage_error(self, why: str) -> CommandError:
        return CommandError(f"{why}. Usage: {self.spec.usage}")


@dataclass
class Response:
    lines: list[str]
    ok: bool = True


def sanitise(text: str, limit: int = 200) -> str:
    """User text made safe for a log line: no control characters, bounded."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in text)
    return clean if len(clean) <= limit else clean[:limit] + "..."


@dataclass
class Dispatcher:
    engine: Any
    directory: Directory
    registry: Registry
    cooldown: Cooldown | None = None
    clock: Callable[[], float] = time.monotonic

    async def handle(self, message: Message) -> Response:
        caller = self.directory.resolve(message.sender)
        if self.cooldown and message.sender.protocol != "console":
            # every addressed message counts, even a malformed one: each would cost an answer
            verdict = self.cooldown.admit(rate_key(caller))
            if verdict == "refuse":
                log.info("rate limit: %s (%s) is sending too many commands", message.sender, rate_key(caller))
                return Response(["slow down, please: too many commands; try again in a few seconds"], ok=False)
            if verdict == "quiet":
                return Response([], ok=False)
        words = message.text.strip()
        try:
            args = shlex.split(words)
        except ValueError as exc:
            return Response([f"cannot parse the command ({exc}); try: help"], ok=False)
        if not args:
            return Response(["say 'help' for the list of commands"], ok=False)
        name = args[0].lower()
        spec = self.registry.commands.get(name)
        if spec is None:
            return Response([f"unknown command {sanitise(name, 40)!r}; try: help"], ok=False)
        if spec.privileged and caller.user is None:
            log.warning("refused %r from %s (%s): not a verified known user",
                        sanitise(words), message.sender, caller.how)
            if message.room is not None and not message.room.exposes_identities:
                return Response([f"not authorised: {message.room.name} does not show me real JIDs, "
                                 "so I cannot tell who you are; send me a direct message instead"], ok=False)
            return Response([f"not authorised: {spec.name} needs a verified, known user "
                             f"({caller.describe()}); try: whoami"], ok=False)
        ctx = Context(caller, message, args[1:], spec, self.engine, self.registry)
        try:
            lines = await spec.handler(ctx)
        except CommandError as exc:
            if str(exc).startswith("not authorised"):
                log.warning("refused %r from %s: %s", sanitise(words), ctx.actor, exc)
            return Response([str(exc)], ok=False)
        except EngineError as exc:
            return Response([str(exc)], ok=False)
        log.info("%s ran %r", ctx.actor, sanitise(words))
        return Response(lines)


def rate_key(caller: Caller) -> str:
    """Whose command budget a message spends: a known user's, whichever network
    it came from; otherwise the sender's host on IRC (a new nick is free, a new
    host is not) or the sender's handle elsewhere."""
    if caller.user is not None:
        return f"user:{caller.user.name}"
    ident = caller.identity
    if ident.origin:
        return f"{ident.protocol}:{ident.network}:from:{ident.origin.lower()}"
    return f"{ident.protocol}:{ident.network}:{ident.handle}"


# --- argument helpers -------------------------------------------------------

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_fields(ctx: Context, pairs: list[str]) -> dict[str, Any]:
    """key=value words into fields; values are YAML scalars (3, true, 'text')."""
    fields: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not _KEY.match(key):
            raise ctx.usage_error(f"bad key=value {sanitise(pair, 60)!r}")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        if not isinstance(value, (str, int, float, bool)) and value is not None:
            value = raw
        fields[key] = value
    return fields


def parse_id(ctx: Context, more: bool = False) -> int:
    """The instance id, the first argument (and the only one unless ``more``)."""
    if not ctx.args or (len(ctx.args) != 1 and not more):
        raise ctx.usage_error("expected one instance id")
    text = ctx.args[0].lstrip("#")
    if not text.isdigit() or len(text) > 18:
        raise ctx.usage_error(f"bad instance id {sanitise(ctx.args[0], 30)!r}")
    return int(text)


# --- the commands -----------------------------------------------------------

PS_LIMIT = 50      # newest first; a chat line costs up to a second on a paced network

@command("help [command]", "list commands, or show how to use one", privileged=False)
async def cmd_help(ctx: Context) -> list[str]:
    if ctx.args:
        spec = ctx.registry.commands.get(ctx.args[0].lower())
        if spec is None:
            raise CommandError(f"unknown command {sanitise(ctx.args[0], 40)!r}; try: help")
        return [f"{spec.usage} - {spec.summary}"]
    return ["commands: " + ", ".join(sorted(ctx.registry.commands)) + " (help <command> for details)"]


@command("whoami", "who the bot thinks you are, and how that was verified", privileged=False)
async def cmd_whoami(ctx: Context) -> list[str]:
    return [ctx.caller.describe()]


@command("launch <process> [key=value ...]", "start a process with the given fields")
async def cmd_launch(ctx: Context) -> list[str]:
    if not ctx.args:
        raise ctx.usage_error("missing process name")
    name = ctx.args[0]
    spec = ctx.engine.specs.get(name)
    if spec is None:
        known = ", ".join(sorted(ctx.engine.specs)) or "none"
        raise ctx.usage_error(f"unknown process {sanitise(name, 40)!r} (known: {known})")
    fields = parse_fields(ctx, ctx.args[1:])
    project = fields.get("project", spec.project)
    project = project if isinstance(project, str) else None
    if spec.project and project != spec.project and not (project or "").startswith(spec.project + ":"):
        # roles are checked on the project named: moving a process to another one would let
        # a release manager of any project launch it
        raise ctx.usage_error(f"{name} belongs to project {spec.project}; project= may name only it "
                              "or one of its sub-projects")
    for role in spec.launch_roles or (ADMINS,):
        try:
            ctx.require(role, project)
            break
        except CommandError:
            continue
    else:
        raise CommandError(f"not authorised: launching {name} needs role "
                           f"{' or '.join(map(repr, spec.launch_roles))}" + (f" on {project}" if project else ""))
    iid = await ctx.engine.launch(name, fields, actor=ctx.actor)
    return [f"launched {name} as #{iid}"]


@command("ps [all]", "list running, waiting and failed instances (all: include finished)")
async def cmd_ps(ctx: Context) -> list[str]:
    if ctx.args not in ([], ["all"]):
        raise ctx.usage_error("unexpected arguments")
    rows = await ctx.engine.instances(include_finished=bool(ctx.args), limit=PS_LIMIT)
    if not rows:
        return ["no instances" if ctx.args else "no running, waiting or failed instances"]
    lines = [summary_line(r) for r in rows]
    total = await ctx.engine.instance_count(include_finished=bool(ctx.args))
    if total > len(rows):      # the list is capped: say so rather than cut it silently
        lines.append(f"... and {total - len(rows)} older (show <id> for any of them)")
    return lines


@command("show <id>", "an instance's state, fields, pending steps and timers")
async def cmd_show(ctx: Context) -> list[str]:
    detail = await ctx.engine.describe(parse_id(ctx))
    return detail_lines(detail)


@command("history <id>", "every transition of an instance: time, step, event, actor")
async def cmd_history(ctx: Context) -> list[str]:
    iid = parse_id(ctx)
    entries = await ctx.engine.history(iid)
    return [history_line(e) for e in entries]


async def _owned(ctx: Context, iid: int) -> None:
    """cancel/retry need a launch role of the instance's process on its project."""
    summary = await ctx.engine.summary(iid)
    spec = ctx.engine.specs.get(summary.process)
    roles = (spec.launch_roles if spec else ()) or (ADMINS,)
    for role in roles:
        try:
            ctx.require(role, summary.project)
            return
        except CommandError:
            continue
    raise CommandError(f"not authorised: {ctx.spec.name} #{iid} needs role "
                       f"{' or '.join(map(repr, roles))}" + (f" on {summary.project}" if summary.project else ""))


@command("cancel <id>", "cancel an instance; pending steps are told")
async def cmd_cancel(ctx: Context) -> list[str]:
    iid = parse_id(ctx)
    await _owned(ctx, iid)
    await ctx.engine.cancel(iid, actor=ctx.actor)
    return [f"cancelled #{iid}"]


@command("retry <id> [key=value ...]", "retry the failed steps of an instance, after setting these fields")
async def cmd_retry(ctx: Context) -> list[str]:
    iid = parse_id(ctx, more=True)
    fields = parse_fields(ctx, ctx.args[1:])
    if "project" in fields:
        raise ctx.usage_error("the project of an instance cannot change")
    await _owned(ctx, iid)
    paths = await ctx.engine.retry(iid, actor=ctx.actor, fields=fields)
    return [f"retrying #{iid}: {', '.join(paths)}" + (f" with {', '.join(sorted(fields))} set" if fields else "")]


@command("schedules", "configured schedules with their next and last run")
async def cmd_schedules(ctx: Context) -> list[str]:
    if ctx.args:
        raise ctx.usage_error("unexpected arguments")
    rows = await ctx.engine.schedules()
    if not rows:
        return ["no schedules configured"]
    return [schedule_line(s) for s in rows]


def default_registry() -> Registry:
    return Registry().collect(globals().values())
