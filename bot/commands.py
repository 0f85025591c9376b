"""One command dispatcher for every front-end, and the commands it knows.

A command is a coroutine tagged with ``@command``; ``Registry.collect``
gathers tagged functions, and help text comes from their tags.  Handlers
get a ``Context`` and return the reply lines.  Any ``Refusal`` (a
``CommandError`` for usage, ``NotAuthorised`` from ``bot.access``, an
``EngineError`` such as an unknown id) is answered with its one line and
changes nothing; anything else is a bug: logged, and answered with
"internal error".  Who may do what is decided in ``bot.access``.
"""
from __future__ import annotations

import calendar
import logging
import re
import shlex
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, TypeVar

from bot.access import (ADMINS, Caller, Directory, NotAuthorised, User, WrongProject, authorise_launch,
                        authorise_manage, authorise_read)
from bot.chat import VERIFIED_CONSOLE, VERIFIED_MAIL_TOKEN, Identity, Message
from bot.logsafety import sanitise
from bot.pacing import Cooldown
from bot.rendering import detail_lines, history_line, schedule_line, summary_line
from engine.errors import Refusal
from notifiers.destinations import Address
from notifiers.routes import DIGESTS, pattern_problem

log = logging.getLogger(__name__)

Handler = Callable[["Context"], Awaitable[list[str]]]
R = TypeVar("R")


class CommandError(Refusal):
    """The user's mistake (usage, a bad value): one line, nothing changed."""


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
    outbox: Any = None                 # notifiers.outbox.Outbox, if the bot has one
    routing: Any = None                # notifiers.routing.Routing, if the bot has one
    acting_for: str = ""               # console `as <user>`: the admin who typed it
    durable: bool = False
    consumed: bool = False             # the mail's handled mark was written with the effect (not the reply)              # the reply was written to the outbox with the change it reports

    async def acknowledged(self, change: Callable[[Any], Awaitable[R]], text: Callable[[R], str]) -> list[str]:
        """Make a change whose reply is durable: ``change(ack)`` calls the engine
        with ``ack``, which writes the reply (``text(result)``) to the outbox
        in the change's own commit.  If the bot dies before sending it, it is
        delivered after the restart.  On the console (nobody to deliver to
        after a restart: the history is enough) the reply is just returned."""
        to = self._reply_address()
        if self.outbox is None or to is None:
            return [text(await change(None))]
        cause = f"reply {uuid.uuid4().hex}"
        message = self.message
        asked = sanitise(message.text.strip(), 60)
        nick = message.sender.nick if message.room is not None else ""
        thread = (message.thread,) if message.thread else ()

        def ack(result: Any) -> Any:
            line = f"{text(result)} (re: {asked})"
            return [*self.outbox.rows(cause, [to], f"{nick}: {line}" if nick else line, subject=f"Re: {asked}",
                                      in_reply_to=message.thread, references=thread,
                                      origin=f"reply to {self.actor}", hint=message.sender.handle),
                    *message.commit_with, *message.spend]      # a mail's effect and its handled mark: one commit
        result = await change(ack)
        self.durable = True
        self.outbox.wake()
        return [text(result)]

    def _reply_address(self) -> Address | None:
        message = self.message
        if message.sender.protocol == "console":
            return None
        if message.sender.protocol == "email":      # to the user's configured address, in the mail's thread
            return Address("user", message.sender.network, self.caller.user.name) if self.caller.user else None
        if message.room is not None:
            return Address("room", message.room.network, message.room.name)
        if self.caller.user is None:
            return None
        return Address("user", message.sender.network, self.caller.user.name)

    @property
    def actor(self) -> str:
        """Who did it, for the history: user name, network and how verified."""
        ident = self.caller.identity
        who = self.caller.user.name if self.caller.user else ident.handle
        acting = f" (as, by {self.acting_for})" if self.acting_for else ""
        return f"{who} via {ident.protocol}:{ident.network}{acting}"

    @property
    def user(self) -> User:
        """The verified, known caller (privileged commands never run without one)."""
        user = self.caller.user
        if user is None:
            raise NotAuthorised(f"not authorised: {self.spec.name} needs a verified, known user")
        return user

    def usage_error(self, why: str) -> CommandError:
        return CommandError(f"{why}. Usage: {self.spec.usage}")


@dataclass
class Response:
    lines: list[str]
    ok: bool = True
    durable: bool = False     # already in the outbox (written with the change): the router does not send it
    consumed: bool = False    # a mail's handled mark went with the effect; the reply still has to be sent


@dataclass
class Dispatcher:
    engine: Any
    directory: Directory
    registry: Registry
    cooldown: Cooldown | None = None
    clock: Callable[[], float] = time.monotonic
    outbox: Any = None
    routing: Any = None

    async def handle(self, message: Message) -> Response:
        caller = self.directory.resolve(message.sender)
        acting_for = ""
        if message.text.strip().lower().startswith("as ") or message.text.strip().lower() == "as":
            if message.sender.protocol != "console":
                return Response(["`as` works on the console only"], ok=False)
            parts = message.text.split(None, 2)
            admin = caller.user
            if admin is None or not admin.has_role(ADMINS):
                return Response(["not authorised: only the console's admin may act as another user"], ok=False)
            if len(parts) < 3 or self.directory.user(parts[1]) is None:
                return Response(["usage: as <user> <command> (a user from users.yaml)"], ok=False)
            acting_for = admin.name
            message = Message(Identity("console", "console", parts[1], account=parts[1],
                                       verified_by=VERIFIED_CONSOLE), parts[2], message.room)
            caller = self.directory.resolve(message.sender)
        # the console is one trusted person; mail is paced by the email front-end itself
        # (a mail over the limit waits its turn: it is never dropped)
        if self.cooldown and message.sender.protocol not in ("console", "email"):
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
        ctx = Context(caller, message, args[1:], spec, self.engine, self.registry, self.outbox, self.routing,
                      acting_for)
        try:
            lines = await spec.handler(ctx)
        except NotAuthorised as exc:
            log.warning("refused %r from %s: %s", sanitise(words), ctx.actor, exc)
            return Response([str(exc)], ok=False)
        except Refusal as exc:
            return Response([str(exc)], ok=False)
        log.info("%s ran %r", ctx.actor, sanitise(words))
        return Response(lines, durable=ctx.durable, consumed=ctx.consumed)


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
_ID = re.compile(r"[0-9]{1,18}", re.ASCII)


def parse_fields(ctx: Context, pairs: list[str]) -> dict[str, str]:
    """key=value words into fields.  Values are text, as typed: the engine
    converts those the definition declares a type for (``inputs``), by that
    type's rules; nothing is guessed (no YAML: ``no`` and ``010`` stay text)."""
    fields: dict[str, str] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not _KEY.match(key):
            raise ctx.usage_error(f"bad key=value {sanitise(pair, 60)!r}")
        if key in fields:
            raise ctx.usage_error(f"field {sanitise(key, 40)!r} given twice")
        fields[key] = raw
    return fields


def parse_id(ctx: Context, more: bool = False) -> int:
    """The instance id, the first argument (and the only one unless ``more``)."""
    if not ctx.args or (len(ctx.args) != 1 and not more):
        raise ctx.usage_error("expected one instance id")
    text = ctx.args[0].lstrip("#")
    if not _ID.fullmatch(text):      # ASCII only: str.isdigit() also accepts "²", which int() refuses
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


ONCE = "--once"     # launch --once TOKEN: a word no field (key=value) or process name can be


@command("launch [--once TOKEN] <process> [key=value ...]",
         "start a process with the given fields; with --once, at most once per TOKEN (kept 8 days)")
async def cmd_launch(ctx: Context) -> list[str]:
    args = list(ctx.args)
    token = None
    if args and args[0] == ONCE:
        if len(args) < 3:
            raise ctx.usage_error("--once needs a token and a process")
        token = args[1]
        args = args[2:]
    if not args:
        raise ctx.usage_error("missing process name")
    name = args[0]
    spec = ctx.engine.specs.get(name)
    if spec is None:
        known = ", ".join(sorted(ctx.engine.specs)) or "none"
        raise ctx.usage_error(f"unknown process {sanitise(name, 40)!r} (known: {known})")
    fields = parse_fields(ctx, args[1:])
    project = fields.get("project", spec.project)
    if project == "":
        raise ctx.usage_error("project= names a project, like Project:Devel")
    try:
        authorise_launch(ctx.user, name, spec.project, tuple(spec.launch_roles), project)
    except WrongProject as exc:
        raise ctx.usage_error(str(exc)) from None
    return await ctx.acknowledged(lambda ack: ctx.engine.launch(name, fields, actor=ctx.actor, token=token, ack=ack),
                                  lambda iid: f"launched {name} as #{iid}")


@command("ps [all]", "list running, waiting and failed instances (all: include finished)")
async def cmd_ps(ctx: Context) -> list[str]:
    if ctx.args not in ([], ["all"]):
        raise ctx.usage_error("unexpected arguments")
    everything = bool(ctx.args)
    rows = await ctx.engine.instances(include_finished=everything, limit=PS_LIMIT,
                                      projects=ctx.user.readable_projects())
    if not rows:
        return ["no instances" if everything else "no running, waiting or failed instances"]
    lines = [summary_line(r) for r in rows]
    total = await ctx.engine.instance_count(include_finished=everything, projects=ctx.user.readable_projects())
    if total > len(rows):      # the list is capped: say so rather than cut it silently
        lines.append(f"... and {total - len(rows)} older (show <id> for any of them)")
    return lines


async def _readable(ctx: Context, iid: int) -> None:
    summary = await ctx.engine.summary(iid)
    authorise_read(ctx.user, iid, summary.project)


@command("show <id>", "an instance's state, fields, pending steps and timers")
async def cmd_show(ctx: Context) -> list[str]:
    iid = parse_id(ctx)
    await _readable(ctx, iid)
    lines = detail_lines(await ctx.engine.describe(iid))
    # what a long step is doing now (rsync's progress, a wait for a lock): kept by its participant,
    # never written to the history
    for row in await ctx.engine.store.workitems(instance_id=iid):
        participant = ctx.engine.participants.get(row.participant)
        progress = getattr(participant, "progress", None)
        now = progress(row.key) if callable(progress) else None
        if now:
            lines.append(f"progress of {row.step}: {sanitise(str(now), 200)}")
    return lines


@command("history <id>", "every transition of an instance: time, step, event, actor")
async def cmd_history(ctx: Context) -> list[str]:
    iid = parse_id(ctx)
    await _readable(ctx, iid)
    return [history_line(e) for e in await ctx.engine.history(iid)]


async def _owned(ctx: Context, iid: int) -> None:
    """cancel/retry need a launch role of the instance's process on its project."""
    summary = await ctx.engine.summary(iid)
    authorise_read(ctx.user, iid, summary.project)
    spec = ctx.engine.specs.get(summary.process)
    authorise_manage(ctx.user, ctx.spec.name, iid, tuple(spec.launch_roles) if spec else (), summary.project)


@command("cancel <id>", "cancel an instance; pending steps are told")
async def cmd_cancel(ctx: Context) -> list[str]:
    iid = parse_id(ctx)
    await _owned(ctx, iid)
    return await ctx.acknowledged(lambda ack: ctx.engine.cancel(iid, actor=ctx.actor, ack=ack),
                                  lambda _: f"cancelled #{iid}")


@command("retry <id> [handler] [key=value ...]",
         "retry the failed steps of an instance (resuming where they stopped), after setting these fields; "
         "handler: run its failed error handler again instead")
async def cmd_retry(ctx: Context) -> list[str]:
    iid = parse_id(ctx, more=True)
    rest = ctx.args[1:]
    handler = bool(rest) and rest[0] == "handler"
    fields = parse_fields(ctx, rest[1:] if handler else rest)
    if "project" in fields:
        raise ctx.usage_error("the project of an instance cannot change")
    await _owned(ctx, iid)
    what = "the error handler " if handler else ""
    return await ctx.acknowledged(
        lambda ack: ctx.engine.retry(iid, actor=ctx.actor, fields=fields, handler=handler, ack=ack),
        lambda paths: f"retrying #{iid}: {what}{', '.join(paths)}"
                      + (f" with {', '.join(sorted(fields))} set" if fields else ""))


@command("schedules", "configured schedules with their next and last run")
async def cmd_schedules(ctx: Context) -> list[str]:
    if ctx.args:
        raise ctx.usage_error("unexpected arguments")
    rows = await ctx.engine.schedules()
    if not rows:
        return ["no schedules configured"]
    mine = [s for s in rows if _may_launch_scheduled(ctx.user, ctx.engine.specs.get(s.process))]
    if not mine:
        return [f"none of the {len(rows)} schedule(s) runs a process you may launch"]
    return [schedule_line(s) for s in mine]


@command("outbox [failed | retry <id>]",
         "messages the bot sends itself: counts per network and the oldest waiting; failed: each failure "
         "and why; retry: queue a failed message again (admins)")
async def cmd_outbox(ctx: Context) -> list[str]:
    if not ctx.user.has_role(ADMINS):
        raise NotAuthorised("not authorised: outbox is for admins (the messages are every project's)")
    if ctx.outbox is None:
        return ["this bot has no outbox"]
    args = ctx.args
    if args == ["failed"]:
        rows = await ctx.outbox.failures()
        return [outbox_line(r, r.error) for r in rows] or ["no failed messages"]
    if len(args) == 2 and args[0] == "retry":
        text = args[1].lstrip("#")
        if not _ID.fullmatch(text):
            raise ctx.usage_error(f"bad message id {sanitise(args[1], 30)!r}")
        row = await ctx.outbox.retry(int(text))
        if row is None:
            raise CommandError(f"no undelivered message {text} in the outbox")
        return [f"message {row.id} to {row.dest} queued again"]
    if args:
        raise ctx.usage_error("unexpected arguments")
    stats = await ctx.outbox.stats()
    if not stats.counts:
        return ["the outbox is empty"]
    networks = sorted({n for n, _s in stats.counts})
    lines = [f"{n}: " + ", ".join(f"{stats.counts.get((n, s), 0)} {s}" for s in ("queued", "failed", "delivered"))
             + (f", {stats.counts[(n, 'rerouted')]} sent by mail instead" if (n, "rerouted") in stats.counts else "")
             for n in networks]
    lines += [outbox_line(r, f"waiting: {r.error}" if r.error else "waiting") for r in stats.oldest]
    return lines


# --- questions (the ask participant) -------------------------------------------

_QID = re.compile(r"q?([0-9]{1,12})", re.ASCII | re.IGNORECASE)


def _ask(ctx: Context) -> Any:
    ask = ctx.engine.participants.get("ask") if ctx.engine is not None else None
    if ask is None or not hasattr(ask, "answer"):
        raise CommandError("this bot asks no questions (no ask participant)")
    return ask


def _qid(ctx: Context, text: str) -> int:
    match = _QID.fullmatch(text)
    if match is None:
        raise ctx.usage_error(f"bad question id {sanitise(text, 20)!r} (like q7)")
    return int(match.group(1))


async def _answer(ctx: Context, qid_text: str, choice: str, comment: list[str]) -> list[str]:
    ask = _ask(ctx)
    ident = ctx.message.sender
    if ident.protocol == "email" and ident.verified_by != VERIFIED_MAIL_TOKEN:
        raise NotAuthorised("not authorised: a mail vouched for only by its domain cannot answer a question; "
                            "reply to the question's own mail")
    how = ctx.caller.how if not ctx.acting_for else f"console, as {ctx.caller.user.name if ctx.caller.user else '?'} " \
                                                      f"by {ctx.acting_for}"
    line = await ask.answer(_qid(ctx, qid_text), ctx.user, choice, " ".join(comment), network=f"{ident.protocol}:"
                            f"{ident.network}", how=how, actor=ctx.actor,
                            extra=[*ctx.message.commit_with, *ctx.message.spend])
    ctx.consumed = bool(ctx.message.commit_with)
    return [line]


@command("as <user> <command>", "console only: the console's admin runs a command as another configured user "
         "(demos and local tests; recorded as such in the history)")
async def cmd_as(ctx: Context) -> list[str]:
    raise CommandError("`as` works on the console only, for its admin: as <user> <command>")


@command("pending", "questions waiting for your answer")
async def cmd_pending(ctx: Context) -> list[str]:
    if ctx.args:
        raise ctx.usage_error("unexpected arguments")
    lines = await _ask(ctx).pending_for(ctx.user.name)
    return lines or ["nothing waits for your answer"]


@command("approve <qid> [comment]", "approve a question asked of you")
async def cmd_approve(ctx: Context) -> list[str]:
    if not ctx.args:
        raise ctx.usage_error("expected a question id")
    return await _answer(ctx, ctx.args[0], "approve", ctx.args[1:])


@command("reject <qid> [reason]", "reject a question asked of you")
async def cmd_reject(ctx: Context) -> list[str]:
    if not ctx.args:
        raise ctx.usage_error("expected a question id")
    return await _answer(ctx, ctx.args[0], "reject", ctx.args[1:])


@command("answer <qid> <choice> [comment]", "answer a question asked of you with one of its choices")
async def cmd_answer(ctx: Context) -> list[str]:
    if len(ctx.args) < 2:
        raise ctx.usage_error("expected a question id and a choice")
    return await _answer(ctx, ctx.args[0], ctx.args[1].lower(), ctx.args[2:])


@command("question <qid>", "a question: what was asked, of whom, and who answered what")
async def cmd_question(ctx: Context) -> list[str]:
    if len(ctx.args) != 1:
        raise ctx.usage_error("expected one question id")
    found = await _ask(ctx).describe(_qid(ctx, ctx.args[0]))
    if found is None:
        raise CommandError(f"no question {sanitise(ctx.args[0], 20)}")
    q, lines = found
    authorise_read(ctx.user, q.instance_id, q.project)
    return list(lines)


@command("decisions <project> [since]", "decisions of a project's questions since a date (YYYY-MM-DD; default "
         "the last 30 days), for release audits")
async def cmd_decisions(ctx: Context) -> list[str]:
    if len(ctx.args) not in (1, 2):
        raise ctx.usage_error("expected a project and maybe a date")
    project = ctx.args[0]
    if not ctx.user.may_read(project):
        raise NotAuthorised(f"not authorised: you have no role on {project}")
    if len(ctx.args) == 2:
        try:
            since = float(calendar.timegm(time.strptime(ctx.args[1], "%Y-%m-%d")))     # UTC midnight
        except ValueError:
            raise ctx.usage_error(f"bad date {sanitise(ctx.args[1], 20)!r} (YYYY-MM-DD)") from None
    else:
        since = ctx.engine.clock.now() - 30 * 86400
    found = await _ask(ctx).decisions(since)
    mine = [(q, answers) for q, answers in found
            if q.project == project or (q.project or "").startswith(project + ":")]
    if not mine:
        return [f"no decisions in {project} since {time.strftime('%Y-%m-%d', time.gmtime(since))}"]
    lines = []
    for q, answers in mine:
        who = "; ".join(a.describe() for a in answers) or "nobody answered"
        lines.append(f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(q.ended or q.asked))} {q.label} "
                     f"{q.process} #{q.instance_id} {q.project}: {q.question} -> {q.outcome} ({q.state}): {who}")
    return lines


def _repos(ctx: Context) -> Any:
    repo = ctx.engine.participants.get("repo_publish") if ctx.engine is not None else None
    if repo is None or not hasattr(repo, "publish_request"):
        raise CommandError("this bot publishes no repositories")
    return repo


async def _launch_for(ctx: Context, process: str, fields: dict[str, Any]) -> list[str]:
    spec = ctx.engine.specs.get(process)
    if spec is None:
        raise CommandError(f"the process {process} is not installed (conf/processes/{process}.yaml)")
    authorise_launch(ctx.user, process, spec.project, tuple(spec.launch_roles), fields.get("project"))
    return await ctx.acknowledged(lambda ack: ctx.engine.launch(process, fields, actor=ctx.actor, ack=ack),
                                  lambda iid: f"launched {process} for {fields['repo']} as #{iid}")


@command("publish <repo> [force]", "publish a repository now (force: even during a freeze, with the "
         "publishers-override role)")
async def cmd_publish(ctx: Context) -> list[str]:
    if not ctx.args or len(ctx.args) > 2 or (len(ctx.args) == 2 and ctx.args[1] != "force"):
        raise ctx.usage_error("expected a repository name, and maybe force")
    try:
        process, fields = _repos(ctx).publish_request(ctx.args[0], len(ctx.args) == 2)
    except ValueError as exc:
        raise ctx.usage_error(sanitise(str(exc), 200)) from None
    if fields.get("force") and not ctx.user.has_role("publishers-override", fields.get("project")):
        raise NotAuthorised(f"not authorised: force needs publishers-override on {fields.get('project')}")
    return await _launch_for(ctx, process, fields)


@command("rollback <repo>", "publish the snapshot before the current one again (taking the lock)")
async def cmd_rollback(ctx: Context) -> list[str]:
    if len(ctx.args) != 1:
        raise ctx.usage_error("expected a repository name")
    try:
        process, fields = _repos(ctx).rollback_request(ctx.args[0])
    except ValueError as exc:
        raise ctx.usage_error(sanitise(str(exc), 200)) from None
    return await _launch_for(ctx, process, fields)


@command("repos", "each repository: last publish, state, lock holder and queue")
async def cmd_repos(ctx: Context) -> list[str]:
    if ctx.args:
        raise ctx.usage_error("unexpected arguments")
    lines = []
    for r in await _repos(ctx).repos_status():
        if not ctx.user.may_read(r.project):
            continue
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.published)) if r.published else "never"
        holder = f"; lock: #{r.holder}" if r.holder else ""
        queue = f"; queued: {', '.join(f'#{i}' for i in r.queue)}" if r.queue else ""
        by = f" by #{r.published_by}" if r.published_by else ""
        published = f"published {r.current} {when}{by}" if r.current else "never published"
        lines.append(f"{r.name} ({r.project}): {r.state}; {published}{holder}{queue}")
    return lines or ["no repositories you may see"]


@command("bug <tracker> <id>", "a Bugzilla bug's status, resolution and summary (read-only)")
async def cmd_bug(ctx: Context) -> list[str]:
    if len(ctx.args) != 2 or not _ID.fullmatch(ctx.args[1].lstrip("#")):
        raise ctx.usage_error("expected a tracker name and a bug number")
    bz = ctx.engine.participants.get("bugzilla") if ctx.engine is not None else None
    if bz is None or not hasattr(bz, "bug_summary"):
        raise CommandError("this bot has no Bugzilla trackers")
    projects = bz.trackers_for(ctx.args[0])
    user = ctx.user
    # a tracker serving Foo serves Foo:Bar too: a role on either project or below it reads it
    mine = [q for q, roles in user.roles.items() if roles]
    if not (user.reads_everything if "*" in projects else
            any(user.may_read(p) or any(q.startswith(p + ":") for q in mine) for p in projects)):
        raise NotAuthorised(f"not authorised: tracker {sanitise(ctx.args[0], 30)} serves "
                            f"{', '.join(projects)}, where you have no role")
    return [await bz.bug_summary(ctx.args[0], int(ctx.args[1].lstrip("#")))]


def _routing(ctx: Context) -> Any:
    if ctx.routing is None:
        raise CommandError("this bot has no notifications")
    return ctx.routing


def known_projects(ctx: Context) -> set[str]:
    """Projects the bot knows: those of the process definitions and of the routes, with their parents."""
    names = {spec.project for spec in ctx.engine.specs.values() if spec.project}
    names |= {p for p in (ctx.routing.config.projects if ctx.routing else ()) if p != "*"}
    return {":".join(n.split(":")[:i]) for n in names for i in range(1, len(n.split(":")) + 1)}


@command("subscribe <project> <event-pattern> [via <network>] [digest hourly|daily]",
         "be told of a project's events (failed, completed, \"publish *\", ...), on the network you ask from "
         "or via another; digest: one message per hour or day")
async def cmd_subscribe(ctx: Context) -> list[str]:
    routing = _routing(ctx)
    args = list(ctx.args)
    if len(args) < 2:
        raise ctx.usage_error("expected a project and an event pattern")
    project, pattern, rest = args[0], args[1], args[2:]
    network, digest = ctx.message.sender.network, ""
    while rest:
        if rest[0] == "via" and len(rest) >= 2:
            network, rest = rest[1], rest[2:]
        elif rest[0] == "digest" and len(rest) >= 2 and rest[1] in DIGESTS:
            digest, rest = rest[1], rest[2:]
        else:
            raise ctx.usage_error(f"unexpected {sanitise(rest[0], 30)!r}")
    known = known_projects(ctx)
    if project != "*" and project not in known:
        raise ctx.usage_error(f"unknown project {sanitise(project, 40)!r} (known: {', '.join(sorted(known)) or 'none'})")
    problem = pattern_problem(pattern, ())
    if problem:
        raise ctx.usage_error(problem)
    user = ctx.user
    if not (user.reads_everything if project == "*" else user.may_read(project)):
        raise NotAuthorised(f"not authorised: you have no role on {project}, so you may not follow it")
    if ctx.message.sender.protocol == "console" and "via" not in args:
        raise ctx.usage_error("the console cannot be told later: say via <network>")
    book = ctx.outbox.book if ctx.outbox is not None else None
    if book is not None and network not in book.users.get(user.name, frozenset()):
        on = ", ".join(sorted(book.users.get(user.name, frozenset()))) or "none"
        raise ctx.usage_error(f"you have no identity on network {sanitise(network, 30)!r} in users.yaml "
                              f"(yours: {on})")
    sub = await routing.subscribe(user.name, project, pattern, network, digest)
    return [f"subscribed: {sub.describe()}"]


@command("unsubscribe <n>", "drop one of your subscriptions (see: subscriptions)")
async def cmd_unsubscribe(ctx: Context) -> list[str]:
    routing = _routing(ctx)
    if len(ctx.args) != 1 or not _ID.fullmatch(ctx.args[0].lstrip("[").rstrip("]")):
        raise ctx.usage_error("expected the number of one of your subscriptions")
    sub = await routing.unsubscribe(ctx.user.name, int(ctx.args[0].lstrip("[").rstrip("]")))
    if sub is None:
        raise CommandError(f"you have no subscription {sanitise(ctx.args[0], 20)}; see: subscriptions")
    return [f"unsubscribed: {sub.describe()}"]


@command("subscriptions", "your subscriptions, and whether chat falls back to mail")
async def cmd_subscriptions(ctx: Context) -> list[str]:
    routing = _routing(ctx)
    if ctx.args:
        raise ctx.usage_error("unexpected arguments")
    subs = routing.subscriptions(ctx.user.name)
    fallback = "on" if ctx.user.name in routing.fallback else "off"
    return [s.describe() for s in subs] + [f"{len(subs)} subscription(s); fallback email {fallback}"]


@command("fallback email on|off", "while you are offline on a chat network, get its notifications by mail")
async def cmd_fallback(ctx: Context) -> list[str]:
    routing = _routing(ctx)
    if len(ctx.args) != 2 or ctx.args[0] != "email" or ctx.args[1] not in ("on", "off"):
        raise ctx.usage_error("expected: fallback email on, or fallback email off")
    on = ctx.args[1] == "on"
    if on and not ctx.user.emails:
        raise CommandError("you have no mail address in users.yaml")
    await routing.set_fallback(ctx.user.name, on)
    return [f"fallback email {'on: chat notifications come by mail while you are offline' if on else 'off'}"]


@command("notify test <project>", "send a test message along a project's routes and say where it went")
async def cmd_notify(ctx: Context) -> list[str]:
    routing = _routing(ctx)
    if len(ctx.args) != 2 or ctx.args[0] != "test":
        raise ctx.usage_error("expected: notify test <project>")
    project = ctx.args[1]
    known = known_projects(ctx)
    if project not in known:
        raise ctx.usage_error(f"unknown project {sanitise(project, 40)!r} (known: {', '.join(sorted(known)) or 'none'})")
    if not ctx.user.roles_on(project):
        raise NotAuthorised(f"not authorised: you have no role on {project}")
    ops, where = routing.test_rows(project, ctx.user.name, f"test {uuid.uuid4().hex}")
    if not where:
        return [f"{project} has no routes (bot.yaml notifications: projects:)"]
    await ctx.outbox.storage.write(*ops)
    ctx.outbox.wake()
    return [f"test message queued for {len(where)} destination(s): {', '.join(where)} (see: outbox)"]


def outbox_line(row: Any, state: str) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(row.created))
    return f"[{row.id}] {when} to {row.dest} ({row.origin or 'no origin'}): {sanitise(row.text, 60)!r} - {state}"


def _may_launch_scheduled(user: User, spec: Any) -> bool:
    if spec is None:
        return False
    try:
        authorise_launch(user, spec.name, spec.project, tuple(spec.launch_roles), spec.project)
    except Refusal:
        return False
    return True


def default_registry() -> Registry:
    return Registry().collect(globals().values())
