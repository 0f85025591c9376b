"""``ask``: a step that asks people a question and waits, durably, for their
verified answers.

    - id: approve
      participant: ask
      timers: "4h: remind, 1d: escalate, 2d: expire"
      params:
        question: "Release {{ version }} of {{ package }}?"
        choices: [approve, reject]          # default
        to: ["role:release-managers"]      # users and/or role:<role> of the instance's project
        quorum: 2                           # any (default) | N | all
        reject_quorum: 1                    # rejections that end it (default 1)
        allow_self: false                   # may whoever launched it answer? (default no)
        escalate_to: ["role:admins"]
        on_expiry: reject                   # a choice, or error (the step fails)

The addressees are fixed when the question is asked (the launcher left out
unless ``allow_self``); a role is checked again when they answer.  Each
question gets a short id people can type (``q7``, from a counter in SQLite,
never reused).  Everything the step says goes through the outbox (on every
network the addressee has; a mail carries a single-use reply address bound to
this question and addressee), written in the commit that records it: the
question with the step's "pending", a reminder with its timer's end, the
outcome with the step's answer.

Timers (the step's named timers, delivered to ``on_timer``): ``remind`` asks
again those who have not answered; ``escalate`` adds ``escalate_to`` and
tells them why; ``expire`` ends the step with ``on_expiry``.

The outcome: a choice reaches its quorum (``reject`` has its own,
``reject_quorum``); or no choice can reach it any more, and the step ends with
``on_expiry``.  Answers are taken one at a time per question, so answers
arriving at once from several networks make exactly one outcome; everyone who
answered is told it.  The fields get ``answer`` (the deciding choice) and
``answers`` (who, choice, comment, network, verified how, when); the
history gets every ask, reminder, escalation and answer.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from engine.errors import NoSuchWorkitem, Refusal
from engine.participants import DirectoryUser, Participant, Reply, Services, Workitem
from engine.store import Op

log = logging.getLogger(__name__)

PARAMS = ("question", "choices", "to", "quorum", "reject_quorum", "allow_self", "escalate_to", "on_expiry")
DEFAULT_CHOICES = ("approve", "reject")
_CHOICE = re.compile(r"[a-z][a-z0-9_-]{0,30}")
_NAME = re.compile(r"(?:role:)?[A-Za-z0-9_.-]{1,64}")
TIMERS = ("remind", "escalate", "expire")

MIGRATIONS = (
    """
    CREATE TABLE ask_questions (
        qid INTEGER PRIMARY KEY AUTOINCREMENT,    -- q7: never reused
        key TEXT NOT NULL UNIQUE,                 -- the step's dispatch key
        instance_id INTEGER NOT NULL,
        process TEXT NOT NULL,
        project TEXT,
        step TEXT NOT NULL,
        question TEXT NOT NULL,
        choices TEXT NOT NULL,                    -- JSON list
        quorum TEXT NOT NULL,                     -- any | all | N
        reject_quorum INTEGER NOT NULL,
        allow_self INTEGER NOT NULL,
        launcher TEXT NOT NULL DEFAULT '',
        on_expiry TEXT NOT NULL,
        escalate_to TEXT NOT NULL,                -- JSON list
        state TEXT NOT NULL DEFAULT 'open',       -- open | decided | expired | withdrawn
        outcome TEXT NOT NULL DEFAULT '',
        asked REAL NOT NULL,
        deadline REAL,
        ended REAL
    );
    CREATE INDEX ask_questions_project ON ask_questions (project, ended);
    CREATE TABLE ask_addressees (
        qid INTEGER NOT NULL,
        user TEXT NOT NULL,
        via_role TEXT NOT NULL DEFAULT '',        -- the role they were asked for ('' if named)
        added TEXT NOT NULL,                      -- asked | escalated
        PRIMARY KEY (qid, user)
    );
    CREATE TABLE ask_answers (
        qid INTEGER NOT NULL,
        user TEXT NOT NULL,
        choice TEXT NOT NULL,
        comment TEXT NOT NULL,
        network TEXT NOT NULL,
        how TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (qid, user)
    );
    """,
)


class AskRefused(Refusal):
    """An answer that changes nothing (one line for the person who gave it)."""


@dataclass(frozen=True)
class Question:
    qid: int
    key: str
    instance_id: int
    process: str
    project: str | None
    step: str
    question: str
    choices: tuple[str, ...]
    quorum: str
    reject_quorum: int
    allow_self: bool
    launcher: str
    on_expiry: str
    escalate_to: tuple[str, ...]
    state: str
    outcome: str
    asked: float
    deadline: float | None
    ended: float | None

    @property
    def label(self) -> str:
        return f"q{self.qid}"

    def needed(self, choice: str, addressees: int) -> int:
        if choice == "reject":
            return self.reject_quorum
        if self.quorum == "any":
            return 1
        if self.quorum == "all":
            return max(1, addressees)
        return int(self.quorum)


@dataclass(frozen=True)
class Answer:
    user: str
    choice: str
    comment: str
    network: str
    how: str
    at: float

    def as_field(self) -> dict[str, Any]:
        return {"who": self.user, "choice": self.choice, "comment": self.comment, "network": self.network,
                "verified": self.how, "when": _when(self.at)}

    def describe(self) -> str:
        comment = f": {self.comment}" if self.comment else ""
        return f"{self.user} {self.choice} via {self.network} ({self.how}) at {_when(self.at)}{comment}"


_Q_COLUMNS = ("qid, key, instance_id, process, project, step, question, choices, quorum, reject_quorum, allow_self, "
              "launcher, on_expiry, escalate_to, state, outcome, asked, deadline, ended")


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(at))


def _names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [v for v in value] if isinstance(value, list) else []


def user_of(actor: str | None) -> str:
    """The user name in an actor ("alice via irc:libera"), or "" (a schedule, the engine)."""
    if not actor or " via " not in actor:
        return ""
    return actor.split(" via ", 1)[0]


class Ask(Participant):
    name = "ask"
    migrations = MIGRATIONS

    def __init__(self) -> None:
        self.services: Services | None = None
        self._next = 1
        self._locks: dict[int, asyncio.Lock] = {}
        self._prune_at = 1000

    # -- checks -------------------------------------------------------------------------

    def check_params(self, params: Mapping[str, Any], config: Any) -> list[str]:
        problems = [f"unknown param {k!r} (expected {', '.join(PARAMS)})" for k in params if k not in PARAMS]

        def templated(value: Any) -> bool:
            return isinstance(value, str) and ("{{" in value or "{%" in value)
        if not isinstance(params.get("question"), str) or not params.get("question"):
            problems.append("question: expected the text of the question")
        choices = params.get("choices", list(DEFAULT_CHOICES))
        if not templated(choices):
            if (not isinstance(choices, list) or len(choices) < 2 or len(set(choices)) != len(choices)
                    or not all(isinstance(c, str) and _CHOICE.fullmatch(c) for c in choices)):
                problems.append("choices: expected two or more different lower-case words")
                choices = list(DEFAULT_CHOICES)
        for key in ("to", "escalate_to"):
            value = params.get(key)
            if value is None:
                if key == "to":
                    problems.append("to: expected users and/or role:<role> to ask")
                continue
            names = _names(value)
            if not names or not all(isinstance(n, str) and (templated(n) or _NAME.fullmatch(n)) for n in names):
                problems.append(f"{key}: expected a list of user names and role:<role>")
        quorum = params.get("quorum", "any")
        if not templated(quorum) and not (quorum in ("any", "all") or (type(quorum) is int and quorum >= 1)):
            problems.append("quorum: expected any, all or a number of answers (1 or more)")
        rq = params.get("reject_quorum", 1)
        if not templated(rq) and not (type(rq) is int and rq >= 1):
            problems.append("reject_quorum: expected a number of rejections (1 or more)")
        if "reject_quorum" in params and isinstance(choices, list) and "reject" not in choices:
            problems.append("reject_quorum: there is no 'reject' among the choices")
        if "allow_self" in params and not isinstance(params["allow_self"], bool):
            problems.append("allow_self: expected true or false")
        on_expiry = params.get("on_expiry", "reject" if "reject" in choices else "error")
        if not templated(on_expiry) and on_expiry != "error" and on_expiry not in choices:
            problems.append(f"on_expiry: expected one of the choices ({', '.join(choices)}) or error")
        return problems

    # -- life -------------------------------------------------------------------------

    async def setup(self, services: Services) -> None:
        self.services = services
        row = await services.storage.query_one("SELECT seq FROM sqlite_sequence WHERE name = 'ask_questions'")
        self._next = (int(row[0]) if row else 0) + 1

    def _svc(self) -> Services:
        assert self.services is not None, "ask: used before setup"
        return self.services

    async def consume(self, workitem: Workitem) -> Reply:
        svc = self._svc()
        if svc.outbox is None:
            return Reply.failed("ask: this bot has no outbox to ask through")
        existing = await self._question_by_key(workitem.key)
        if existing is not None:              # asked already (and written): keep waiting
            return Reply.pending()
        problems = self.check_params(workitem.params, None)
        if problems:
            return Reply.failed("ask: " + "; ".join(problems))
        params = workitem.params
        project = await svc.project_of(workitem.instance_id) if svc.project_of else None
        launcher = user_of(await svc.launched_by(workitem.instance_id) if svc.launched_by else None)
        choices = tuple(params.get("choices") or DEFAULT_CHOICES)
        allow_self = bool(params.get("allow_self", False))
        people, unknown = self._resolve(_names(params.get("to")), project)
        if not allow_self:
            people.pop(launcher, None)
        if not people:
            why = f" (unknown: {', '.join(unknown)})" if unknown else ""
            return Reply.failed(f"ask: nobody to ask: {', '.join(_names(params.get('to')))} names no one who may "
                                f"answer{' besides the launcher' if launcher and not allow_self else ''}{why}")
        timers = await svc.timers_of(workitem) if svc.timers_of else []
        deadline = next((due for name, due in timers if name == "expire"), None)
        qid = self._next
        self._next += 1
        now = svc.clock.now()
        quorum = str(params.get("quorum", "any"))
        q = Question(qid, workitem.key, workitem.instance_id, workitem.process, project, workitem.step,
                     str(params["question"]), choices, quorum, int(params.get("reject_quorum", 1)), allow_self,
                     launcher, str(params.get("on_expiry", "reject" if "reject" in choices else "error")),
                     tuple(_names(params.get("escalate_to"))), "open", "", now, deadline, None)
        storage = svc.storage
        ops: list[Op] = [storage.op(
            f"INSERT INTO ask_questions ({_Q_COLUMNS}) VALUES ({','.join('?' * 19)})",
            q.qid, q.key, q.instance_id, q.process, q.project, q.step, q.question, json.dumps(list(q.choices)),
            q.quorum, q.reject_quorum, int(q.allow_self), q.launcher, q.on_expiry, json.dumps(list(q.escalate_to)),
            "open", "", now, deadline, None)]
        ops.append(storage.rows("INSERT INTO ask_addressees (qid, user, via_role, added) VALUES (?,?,?,?)",
                                [(qid, name, role, "asked") for name, role in sorted(people.items())]))
        ops += self._ask(q, sorted(people), workitem.fields, f"ask {qid}", "")
        needed = q.needed(next(c for c in choices if c != "reject"), len(people))
        detail = (f"{q.label}: {q.question} - asked {', '.join(sorted(people))} ({needed} of {len(people)} needed"
                  + (f"; by {_when(deadline)}" if deadline else "") + ")")
        if unknown:
            detail += f"; nobody for {', '.join(unknown)}"
        return Reply.pending(ops=ops, events=[("question asked", detail)])

    def _resolve(self, names: Sequence[str], project: str | None) -> tuple[dict[str, str], list[str]]:
        """users and role:<role> -> {user: the role they are asked for ('' if named)}, and what named nobody."""
        users = self._svc().users
        people: dict[str, str] = {}
        unknown: list[str] = []
        for name in names:
            if name.startswith("role:"):
                holders = users.holders(name[5:], project)
                if not holders:
                    unknown.append(name)
                for holder in holders:
                    people.setdefault(holder.name, name[5:])
            elif users.user(name) is not None:
                people[name] = ""
            else:
                unknown.append(name)
        return people, unknown

    def _ask(self, q: Question, who: Sequence[str], fields: Mapping[str, Any], cause: str, why: str) -> list[Op]:
        """The outbox rows asking ``who`` (each on every network they have)."""
        outbox = self._svc().outbox
        choices = " | ".join(f"{c} {q.label} [comment]" for c in q.choices)
        if q.choices == DEFAULT_CHOICES:
            choices = f"approve {q.label} [comment] | reject {q.label} [reason]"
        shown = ", ".join(f"{k}={v}" for k, v in sorted(fields.items()) if not isinstance(v, (dict, list)))[:300]
        deadline = f" Deadline: {_when(q.deadline)}." if q.deadline else ""
        head = f"{why}{q.label} from {q.process} #{q.instance_id} ({q.project or 'no project'}): {q.question}"
        fields_line = f" Fields: {shown[:120]}{'...' if len(shown) > 120 else ''}." if shown else ""
        text = f"{head}{fields_line} Answer: {choices}.{deadline}"
        body = (f"{head}\n\nFields: {shown or 'none'}\n\nChoices: {', '.join(q.choices)}.{deadline}\n\n"
                f"Answer by replying to this mail: put your choice ({' or '.join(q.choices)}) on the first line;\n"
                f"anything after it is your comment.  Or, in chat: {choices}.\n")
        ops: list[Op] = []
        for name in who:
            try:
                ops += outbox.rows(f"{cause} {name}", [f"user:{name}"], text, subject=f"[{q.label}] {q.question}"[:150],
                                   body=body, origin=f"#{q.instance_id} {q.label}", project=q.project,
                                   reply=("question", f"{q.qid}:{name}", q.deadline or q.asked + 30 * 86400.0))
            except Exception as exc:       # a user with no identity on any network
                log.warning("ask %s: %s cannot be told (%s); they can still answer with `approve %s`",
                            q.label, name, exc, q.label)
        return ops

    async def on_timer(self, workitem: Workitem, name: str, timer_id: str) -> Reply | None:
        q = await self._question_by_key(workitem.key)
        if q is None or q.state != "open":
            return None
        async with self._lock(q.qid):
            people = await self._addressees(q.qid)
            answers = await self._answers(q.qid)
            waiting = sorted(u for u in people if u not in {a.user for a in answers})
            if name == "remind":
                if not waiting:
                    return None
                ops = self._ask(q, waiting, workitem.fields, f"remind {timer_id}", "Reminder: ")
                return Reply.pending(ops=ops, events=[("question reminded", f"{q.label}: {', '.join(waiting)}")])
            if name == "escalate":
                more, _unknown = self._resolve(list(q.escalate_to), q.project)
                added = {u: r for u, r in more.items() if u not in people and (q.allow_self or u != q.launcher)}
                if not added:
                    return Reply.pending(events=[("question escalated", f"{q.label}: nobody to add")])
                storage = self._svc().storage
                ops = [storage.rows("INSERT OR IGNORE INTO ask_addressees (qid, user, via_role, added) "
                                    "VALUES (?,?,?,?)", [(q.qid, u, r, "escalated") for u, r in sorted(added.items())])]
                why = (f"Escalated to you: no decision yet (asked {', '.join(sorted(people))}; "
                       f"answered: {', '.join(a.user + ' ' + a.choice for a in answers) or 'nobody'}). ")
                ops += self._ask(q, sorted(added), workitem.fields, f"escalate {timer_id}", why)
                return Reply.pending(ops=ops, events=[("question escalated", f"{q.label}: {', '.join(sorted(added))}")])
            if name == "expire":
                return self._ended(q, answers, q.on_expiry, "expired", f"{q.label} expired without a decision")
            log.warning("ask %s: unknown timer %r (ask knows %s)", q.label, name, ", ".join(TIMERS))
            return None

    async def cancel(self, workitem: Workitem) -> None:
        q = await self._question_by_key(workitem.key)
        if q is not None and q.state == "open":
            await self._svc().storage.write(self._svc().storage.op(
                "UPDATE ask_questions SET state = 'withdrawn', ended = ? WHERE qid = ? AND state = 'open'",
                self._svc().clock.now(), q.qid))

    # -- answering (the commands, and replies by mail) ------------------------------------

    async def answer(self, qid: int, user: DirectoryUser, choice: str, comment: str, *, network: str, how: str,
                     actor: str, extra: Sequence[Op] = ()) -> str:
        """Record ``user``'s answer; returns what to tell them.  AskRefused
        (nothing changed) for an unknown question, someone not asked or no
        longer holding the role, a self-approval, a second answer, an answer
        after the end, a choice not offered.  ``extra``: ops written with the
        answer (a mail token spent)."""
        svc = self._svc()
        async with self._lock(qid):
            q, people, answers = await self._read(qid)
            if q is None:
                raise AskRefused(f"no question q{qid}")
            if q.state != "open":
                raise AskRefused(self._ended_text(q))
            if user.name == q.launcher and not q.allow_self:
                raise AskRefused(f"you launched #{q.instance_id}, so you may not answer {q.label}")
            if user.name not in people:
                raise AskRefused(f"{q.label} was not asked of you")
            role = people[user.name]
            if role and not user.has_role(role, q.project):
                raise AskRefused(f"you no longer hold {role} on {q.project or 'every project'}, so you may not "
                                 f"answer {q.label}")
            if svc.users.user(user.name) is None:
                raise AskRefused("you are no longer a configured user")
            if choice not in q.choices:
                raise AskRefused(f"{choice!r} is not a choice of {q.label} ({', '.join(q.choices)})")
            if any(a.user == user.name for a in answers):
                mine = next(a for a in answers if a.user == user.name)
                raise AskRefused(f"you already answered {q.label}: {mine.choice}")
            now = svc.clock.now()
            mine = Answer(user.name, choice, comment[:500], network, how, now)
            answers.append(mine)
            insert = svc.storage.op("INSERT INTO ask_answers (qid, user, choice, comment, network, how, at) "
                                    "VALUES (?,?,?,?,?,?,?)", qid, user.name, choice, mine.comment, network, how, now)
            outcome = self._outcome(q, people, answers)
            if outcome is None:
                await svc.storage.write(insert, *extra)
                counts = {c: sum(1 for a in answers if a.choice == c) for c in q.choices}
                standing = ", ".join(f"{n} {c} of {q.needed(c, len(people))} needed" for c, n in counts.items() if n)
                return f"recorded your {choice} for {q.label} ({standing})"
            reply = self._ended(q, answers, outcome, "decided", f"{q.label} decided: {outcome}",
                                ops=[insert, *extra])
            try:
                await svc.reply(q.key, reply, actor=actor)
            except NoSuchWorkitem:
                # the step ended meanwhile (timeout, cancel): nothing recorded
                await self.cancel_stale(q)
                raise AskRefused(f"{q.label} was withdrawn: its step is no longer waiting") from None
            return f"recorded your {choice}: {q.label} is decided: {outcome}"

    async def cancel_stale(self, q: Question) -> None:
        svc = self._svc()
        await svc.storage.write(svc.storage.op(
            "UPDATE ask_questions SET state = 'withdrawn', ended = ? WHERE qid = ? AND state = 'open'",
            svc.clock.now(), q.qid))

    def _outcome(self, q: Question, people: Mapping[str, str], answers: Sequence[Answer]) -> str | None:
        counts = {c: sum(1 for a in answers if a.choice == c) for c in q.choices}
        total = len(people)
        if "reject" in counts and counts["reject"] >= q.needed("reject", total):
            return "reject"
        for choice in q.choices:
            if choice != "reject" and counts[choice] >= q.needed(choice, total):
                return choice
        open_votes = total - len(answers)
        if not any(counts[c] + open_votes >= q.needed(c, total) for c in q.choices):
            return q.on_expiry      # no choice can reach its quorum any more
        return None

    def _ended(self, q: Question, answers: Sequence[Answer], outcome: str, state: str, headline: str,
               ops: Sequence[Op] = ()) -> Reply:
        """The step's answer: the outcome in the fields, every answer in the
        history, the question closed, and everyone who answered told."""
        svc = self._svc()
        now = svc.clock.now()
        close = svc.storage.op("UPDATE ask_questions SET state = ?, outcome = ?, ended = ? WHERE qid = ?",
                               state, outcome, now, q.qid)
        told: list[Op] = []
        for name in sorted({a.user for a in answers}):
            try:
                told += svc.outbox.rows(f"outcome {q.qid}", [f"user:{name}"],
                                        f"{headline} ({q.process} #{q.instance_id}: {q.question})",
                                        subject=f"[{q.label}] {headline}", origin=f"#{q.instance_id} {q.label}",
                                        project=q.project)
            except Exception as exc:       # no identity on any network: they see it in `question`
                log.info("ask %s: cannot tell %s the outcome: %s", q.label, name, exc)
        events = [("question answered", f"{q.label}: {a.describe()}"[:500]) for a in answers]
        events.append(("question decided" if state == "decided" else "question expired",
                       f"{q.label}: {outcome}"))
        fields = {"answer": outcome, "answers": [a.as_field() for a in answers], "question": q.label}
        if outcome == "error":
            return Reply.failed(f"{headline}: no decision", ops=[*ops, close, *told], events=events)
        return Reply.done(fields, ops=[*ops, close, *told], events=events)

    def _ended_text(self, q: Question) -> str:
        if q.state == "withdrawn":
            return f"{q.label} was withdrawn (its step was cancelled or timed out)"
        if q.state == "expired":
            return f"{q.label} expired: {q.outcome}"
        return f"{q.label} is already decided: {q.outcome}"

    def _lock(self, qid: int) -> asyncio.Lock:
        """One lock per question: its answers are taken one at a time.  Locks
        nobody holds are forgotten when the table has doubled since last time."""
        lock = self._locks.get(qid)
        if lock is None:
            if len(self._locks) >= self._prune_at:
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
                self._prune_at = max(1000, 2 * len(self._locks))
            lock = self._locks[qid] = asyncio.Lock()
        return lock

    # -- reading ---------------------------------------------------------------------------

    async def _read(self, qid: int) -> tuple[Question | None, dict[str, str], list[Answer]]:
        """A question, who was asked and who answered: one read."""
        rows, people, answers = await self._svc().storage.queries(
            (f"SELECT {_Q_COLUMNS} FROM ask_questions WHERE qid = ?", (qid,)),
            ("SELECT user, via_role FROM ask_addressees WHERE qid = ?", (qid,)),
            ("SELECT user, choice, comment, network, how, at FROM ask_answers WHERE qid = ? ORDER BY at, rowid",
             (qid,)))
        return (_question(rows[0]) if rows else None, {u: r for u, r in people}, [Answer(*a) for a in answers])

    async def _question(self, qid: int) -> Question | None:
        row = await self._svc().storage.query_one(f"SELECT {_Q_COLUMNS} FROM ask_questions WHERE qid = ?", qid)
        return _question(row) if row else None

    async def _question_by_key(self, key: str) -> Question | None:
        row = await self._svc().storage.query_one(f"SELECT {_Q_COLUMNS} FROM ask_questions WHERE key = ?", key)
        return _question(row) if row else None

    async def _addressees(self, qid: int) -> dict[str, str]:
        rows = await self._svc().storage.query("SELECT user, via_role FROM ask_addressees WHERE qid = ?", qid)
        return {u: r for u, r in rows}

    async def _answers(self, qid: int) -> list[Answer]:
        rows = await self._svc().storage.query(
            "SELECT user, choice, comment, network, how, at FROM ask_answers WHERE qid = ? ORDER BY at, rowid", qid)
        return [Answer(*r) for r in rows]

    async def pending_for(self, user: str) -> list[str]:
        """Open questions asked of ``user`` that they have not answered."""
        rows = await self._svc().storage.query(
            f"SELECT {', '.join('q.' + c.strip() for c in _Q_COLUMNS.split(','))} FROM ask_questions q "
            "JOIN ask_addressees a ON a.qid = q.qid WHERE q.state = 'open' AND a.user = ? AND NOT EXISTS "
            "(SELECT 1 FROM ask_answers x WHERE x.qid = q.qid AND x.user = ?) ORDER BY q.qid", user, user)
        lines = []
        for row in rows:
            q = _question(row)
            by = f", by {_when(q.deadline)}" if q.deadline else ""
            lines.append(f"{q.label}: {q.question} ({q.process} #{q.instance_id}, {q.project or 'no project'}; "
                         f"{' | '.join(q.choices)}{by})")
        return lines

    async def describe(self, qid: int) -> tuple[Question, list[str]] | None:
        """The question, who was asked, who answered (for ``question <qid>``)."""
        q = await self._question(qid)
        if q is None:
            return None
        people = await self._addressees(qid)
        answers = await self._answers(qid)
        lines = [f"{q.label}: {q.question} ({q.process} #{q.instance_id}, {q.project or 'no project'}) - "
                 + ("open" if q.state == "open" else self._ended_text(q)),
                 f"asked: " + ", ".join(f"{u} ({r})" if r else u for u, r in sorted(people.items())),
                 f"quorum: {q.quorum}; choices: {', '.join(q.choices)}"
                 + (f"; deadline {_when(q.deadline)}" if q.deadline else "")]
        lines += [f"answer: {a.describe()}" for a in answers] or ["no answers yet"]
        return q, lines

    async def decisions(self, since: float) -> list[tuple[Question, list[Answer]]]:
        """Ended questions since ``since``, oldest first, with their answers."""
        rows = await self._svc().storage.query(
            f"SELECT {_Q_COLUMNS} FROM ask_questions WHERE state IN ('decided', 'expired') AND ended >= ? "
            "ORDER BY ended", since)
        return [(q, await self._answers(q.qid)) for q in map(_question, rows)]


def _question(row: Sequence[Any]) -> Question:
    values = list(row)
    values[7] = tuple(json.loads(values[7]))
    values[10] = bool(values[10])
    values[13] = tuple(json.loads(values[13]))
    return Question(*values)
