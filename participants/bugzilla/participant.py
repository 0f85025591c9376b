"""The ``bugzilla`` participant: comment on and move the bugs a change fixes.

    - id: update-bugs
      participant: bugzilla
      params:
        changelog: "{{ changelog }}"      # RPM %changelog or .changes text; or a list of
                                          # {package, version, changelog} for several packages
        package: "{{ package }}"          # with a text changelog
        version: "{{ version }}"
        changelog_file: /srv/changes/x.changes   # instead of changelog: a file (absolute path)
        entries: 1                        # only the newest N entries of each changelog (default: all)
        approved_by: "{{ approved_by }}"  # for the comment template
        trackers: [bmc]                   # default: every tracker the instance's project uses
        dry_run: false                    # true: report what would happen, change nothing

For each tracker the project uses, the references its regex finds are
*fixed* or *mentioned* (``changelog.py``).  All of a tracker's bugs are read
in one batched request; a bug missing from the answer is read alone to say
whether it is missing (101) or private (102).  Then, per bug, **one** update:
a fixed bug gets the comment *and* the status change together, a mentioned
bug a comment only (or nothing, ``mentioned: nothing``).  Skipped, with a
message: bugs the account cannot see, missing bugs, other products, fixed
bugs already in the target status.  A bug Bugzilla refuses (123, 121, 122,
114, ...) gets a message and the others go on; a refused API key (306, 410),
an unreachable server or a 5xx fails the step (retry it, or give the step
``on_error: {retry: 3, backoff: 1m}``).

Exactly once.  Before any update, an intent row per bug (instance, step
path, tracker, bug) is committed; each comment ends with a marker line
naming this bot, the instance and the step path; the row becomes ``done``
when Bugzilla confirms.  Dispatched again (the bot died before its answer
was committed, or the step is retried after a failure), the step skips the
``done`` bugs, and reads the comments of the bugs whose intent is still
``sent``, skipping those whose comments carry the marker.  The rows go with
the step's answer (``Reply.ops``).  The path, not the dispatch key, is in the
marker: a retry has a new key, and must still not comment twice.

Dry run (``dry_run: true``): reads only, and reports per bug what would
happen; the step fails, listing the reasons, when a fixed bug does not exist,
is already closed, or cannot move to the target status under the tracker's
configured workflow.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from engine.configkit import Section
from engine.errors import Refusal
from engine.participant_runtime import Storage
from engine.participants import Participant, Reply, Services, Workitem
from engine.templating import TemplateProblem, render
from participants.argsafety import UnsafeArgument, confined_path, is_template, path_problem
from participants.bugzilla.changelog import PackageLog, Referenced, by_tracker, collect
from participants.bugzilla.model import BugState, BugzillaFailure

if TYPE_CHECKING:
    from participants.bugzilla.client import Client
from participants.bugzilla.config import BugzillaConfig, Tracker, check_config

log = logging.getLogger(__name__)

PARAMS = ("changelog", "changelog_file", "package", "version", "entries", "approved_by", "trackers", "dry_run")
MAX_COMMENT = 65535
CUT_NOTE = f"\n[comment cut to {MAX_COMMENT} characters]"
KEEP_ROWS = 30 * 86400.0


@dataclass
class _Action:
    tracker: Tracker
    ref: Referenced
    state: BugState
    fix: bool                   # status change and comment; else a comment only


class UnknownTracker(Refusal):
    pass


class Bugzilla(Participant):
    name = "bugzilla"
    migrations = ("""
        CREATE TABLE bugzilla_intents (
            instance_id INTEGER NOT NULL,
            path TEXT NOT NULL,          -- the step's path: stable across re-dispatch and retry
            tracker TEXT NOT NULL,
            bug INTEGER NOT NULL,
            state TEXT NOT NULL,         -- sent: the update may have been applied | done: it was
            updated REAL NOT NULL,
            PRIMARY KEY (instance_id, path, tracker, bug)
        );
        CREATE TABLE bugzilla_meta (
            name TEXT PRIMARY KEY,       -- marker_id: this bot's part of the comment marker
            value TEXT NOT NULL
        );
    """,)

    def __init__(self) -> None:
        self._config = BugzillaConfig()
        self._services: Services | None = None
        self._clients: dict[str, Client] = {}
        self._marker_id = ""
        self._consuming: set[str] = set()
        self._cancelled: set[str] = set()

    # -- configuration -------------------------------------------------------------

    def check_config(self, section: Section) -> BugzillaConfig:
        return check_config(section)

    def check_params(self, params: Mapping[str, Any], config: Any) -> list[str]:
        cfg = config if isinstance(config, BugzillaConfig) else self._config
        problems = [f"unknown param {key!r} (expected {', '.join(PARAMS)})" for key in params if key not in PARAMS]
        if ("changelog" in params) == ("changelog_file" in params):
            problems.append("give one of 'changelog' (text, or a list of {package, version, changelog}) "
                            "and 'changelog_file'")
        changelog = params.get("changelog")
        if changelog is not None and not isinstance(changelog, (str, list)):
            problems.append("changelog: expected text or a list of {package, version, changelog}")
        if isinstance(changelog, list):
            for n, item in enumerate(changelog):
                if not isinstance(item, dict) or "changelog" not in item or \
                        set(item) - {"package", "version", "changelog"}:
                    problems.append(f"changelog[{n}]: expected {{package, version, changelog}}")
        if "changelog_file" in params and path_problem(params["changelog_file"], "changelog_file"):
            problems.append(str(path_problem(params["changelog_file"], "changelog_file")))
        dry_run = params.get("dry_run")
        if dry_run is not None and not isinstance(dry_run, bool) and not is_template(dry_run):
            problems.append(f"dry_run: expected true or false, got {dry_run!r}")
        entries = params.get("entries")
        if entries is not None and not is_template(entries) and (
                not isinstance(entries, int) or isinstance(entries, bool) or entries < 1):
            problems.append(f"entries: expected a whole number of at least 1, got {entries!r}")
        trackers = params.get("trackers")
        if trackers is not None:
            names = [trackers] if isinstance(trackers, str) else trackers
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                problems.append("trackers: expected a list of tracker names")
            else:
                unknown = [n for n in names if n not in cfg.trackers]
                if unknown:
                    problems.append(f"trackers: unknown tracker(s) {', '.join(unknown)} "
                                    f"(configured: {', '.join(sorted(cfg.trackers)) or 'none'})")
        return problems

    # -- life ----------------------------------------------------------------------

    async def setup(self, services: Services) -> None:
        self._services = services
        if isinstance(services.config, BugzillaConfig):
            self._config = services.config
        storage = services.storage
        row = await storage.query_one("SELECT value FROM bugzilla_meta WHERE name = 'marker_id'")
        ops = [storage.op("DELETE FROM bugzilla_intents WHERE updated < ?", services.clock.now() - KEEP_ROWS)]
        if row is None:
            self._marker_id = secrets.token_hex(4)
            ops.append(storage.op("INSERT INTO bugzilla_meta (name, value) VALUES ('marker_id', ?)",
                                  self._marker_id))
        else:
            self._marker_id = str(row[0])
        await storage.write(*ops)

    async def shutdown(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    async def cancel(self, workitem: Workitem) -> None:
        if workitem.key in self._consuming:
            self._cancelled.add(workitem.key)       # consume stops before its next update

    # -- for the chat command ``bug <tracker> <id>`` ------------------------------------

    def trackers_for(self, tracker: str) -> tuple[str, ...]:
        """The projects using ``tracker`` (``"*"``: all); whoever may read one of
        them may read its bugs through the bot.  Refusal for an unknown tracker."""
        return self._tracker(tracker).projects

    async def bug_summary(self, tracker: str, bug_id: int) -> str:
        """One line: the bug's status, resolution and summary, read now.
        Refusal (one line) for an unknown tracker, a missing or private bug, or
        a Bugzilla that cannot be read."""
        t = self._tracker(tracker)
        if bug_id < 1:
            raise Refusal(f"{tracker} {bug_id}: not a bug number")
        try:
            state = await self._client(t).probe(bug_id)
        except BugzillaFailure as failure:
            if failure.code == 101:
                raise Refusal(f"{t.name} bug {bug_id} does not exist") from None
            if failure.code == 102:
                raise Refusal(f"{t.name} bug {bug_id} is private (the bot's account may not see it)") from None
            raise Refusal(failure.message) from None
        status = f"{state.status} {state.resolution}".strip()
        return f"{t.name} bug {bug_id}: {status} - {_one_line(state.summary)} [{state.product}]"

    def _tracker(self, name: str) -> Tracker:
        tracker = self._config.trackers.get(name)
        if tracker is None:
            known = ", ".join(sorted(self._config.trackers)) or "none configured"
            raise UnknownTracker(f"unknown tracker {_one_line(name)[:40]!r} (known: {known})")
        return tracker

    def _client(self, tracker: Tracker) -> Client:
        client = self._clients.get(tracker.name)
        if client is None:
            from participants.bugzilla.client import Client     # python-bugzilla: loaded when first needed
            client = self._clients[tracker.name] = Client(tracker)
        return client

    # -- a step --------------------------------------------------------------------

    async def consume(self, workitem: Workitem) -> Reply:
        self._consuming.add(workitem.key)
        try:
            return await self._consume(workitem)
        finally:
            self._consuming.discard(workitem.key)
            self._cancelled.discard(workitem.key)

    async def _consume(self, w: Workitem) -> Reply:
        where = f"#{w.instance_id} {w.step}"
        try:
            logs, entries, wanted, dry_run = await self._inputs(w)
        except (ValueError, UnsafeArgument, OSError) as exc:
            return Reply.failed(f"not run: {exc}")
        project = w.fields.get("project")
        project = project if isinstance(project, str) else None
        trackers = [t for t in self._config.trackers.values()
                    if t.uses(project) and (wanted is None or t.name in wanted)]
        if not trackers:
            note = f"no tracker is used by project {project}" if project else "no tracker is used by this process"
            return Reply.done({"bugzilla": [], "bugzilla_summary": note})
        bugs, messages = collect(logs, [t.syntax for t in trackers], entries)
        report = _Report(dry_run, messages)
        storage = self._storage()
        intents: dict[tuple[str, int], str] = {}
        if not dry_run:
            rows = await storage.query("SELECT tracker, bug, state FROM bugzilla_intents WHERE instance_id = ? "
                                       "AND path = ?", w.instance_id, w.path)
            intents = {(str(t), int(b)): str(s) for t, b, s in rows}
        actions: list[_Action] = []
        reasons: list[str] = []
        by_name = {t.name: t for t in trackers}
        try:
            for name, refs in by_tracker(bugs).items():
                tracker = by_name[name]
                client = self._client(tracker)
                todo = []
                for ref in refs:
                    if intents.get((name, ref.bug)) == "done":
                        report.add(tracker, ref, "skipped", "updated already by this step")
                    else:
                        todo.append(ref)
                states = await client.read([r.bug for r in todo])
                for ref in todo:
                    state = states.get(ref.bug)
                    if state is None:
                        state = await self._unseen(client, tracker, ref, report, reasons)
                    if state is not None:
                        action = self._decide(tracker, ref, state, report, reasons)
                        if action is not None:
                            actions.append(action)
        except BugzillaFailure as failure:
            return Reply.failed(failure.message)
        if dry_run:
            fields = report.fields()
            if reasons:
                return Reply.failed(f"dry run: {len(reasons)} fixed bug(s) cannot be updated: " + "; ".join(reasons))
            log.info("%s: dry run: %s", where, fields["bugzilla_summary"])
            return Reply.done(fields)
        return await self._update(w, actions, intents, report)

    async def _inputs(self, w: Workitem) -> tuple[list[PackageLog], int | None, set[str] | None, bool]:
        params = w.params
        unknown = [k for k in params if k not in PARAMS]
        if unknown:
            raise ValueError(f"unknown param {unknown[0]!r}")
        dry_run = _boolean(params.get("dry_run", False), "dry_run")
        entries = params.get("entries")
        if entries is not None:
            if isinstance(entries, str) and entries.strip().isdigit():
                entries = int(entries)
            if not isinstance(entries, int) or isinstance(entries, bool) or entries < 1:
                raise ValueError(f"entries: expected a whole number of at least 1, got {entries!r}")
        wanted = params.get("trackers")
        names = None if wanted is None else {str(n) for n in ([wanted] if isinstance(wanted, str) else wanted)}
        package, version = str(params.get("package") or ""), str(params.get("version") or "")
        logs: list[PackageLog] = []
        changelog = params.get("changelog")
        if "changelog_file" in params:
            source = (await self._services_().step_params(w)).get("changelog_file")
            path = confined_path(params["changelog_file"], source, "changelog_file")
            text = await asyncio.to_thread(Path(path).read_text, encoding="utf-8", errors="replace")
            logs.append(PackageLog(package or Path(path).stem, version, text))
        elif isinstance(changelog, str):
            logs.append(PackageLog(package, version, changelog))
        elif isinstance(changelog, list):
            for n, item in enumerate(changelog):
                if not isinstance(item, Mapping) or not isinstance(item.get("changelog"), str):
                    raise ValueError(f"changelog[{n}]: expected {{package, version, changelog}}")
                logs.append(PackageLog(str(item.get("package") or ""), str(item.get("version") or ""),
                                       item["changelog"]))
        else:
            raise ValueError("changelog: expected text or a list of {package, version, changelog}")
        return logs, entries, names, dry_run

    async def _unseen(self, client: Client, tracker: Tracker, ref: Referenced, report: _Report,
                      reasons: list[str]) -> BugState | None:
        """A bug the batched read left out: read alone, it says missing (101) or private (102)."""
        try:
            return await client.probe(ref.bug)
        except BugzillaFailure as failure:
            if failure.code == 101:
                report.add(tracker, ref, "skipped", "does not exist")
                if ref.fixed:
                    reasons.append(f"{ref.text} does not exist")
                return None
            if failure.code == 102:
                report.add(tracker, ref, "skipped", "is private: the bot's account may not see it")
                return None
            raise

    def _decide(self, tracker: Tracker, ref: Referenced, state: BugState, report: _Report,
                reasons: list[str]) -> _Action | None:
        if tracker.products and state.product not in tracker.products:
            report.add(tracker, ref, "skipped", f"product {state.product!r} is not one of the tracker's "
                                                f"({', '.join(tracker.products)})")
            return None
        now = f"{state.status} {state.resolution}".strip()
        if not ref.fixed:
            if tracker.mentioned == "nothing":
                report.add(tracker, ref, "skipped", "only mentioned (mentioned: nothing)")
                return None
            report.add(tracker, ref, "would comment" if report.dry_run else "to comment", f"mentioned; {now}")
            return _Action(tracker, ref, state, fix=False)
        target = f"{tracker.status} {tracker.resolution}".strip()
        if report.dry_run:
            if not tracker.is_open(state.status):
                reasons.append(f"{ref.text} is already closed ({now})")
                report.add(tracker, ref, "skipped", f"already closed ({now})")
                return None
            if not tracker.may_move(state.status, tracker.status):
                reasons.append(f"{ref.text} cannot move from {state.status} to {tracker.status} under the "
                               f"tracker's workflow")
                report.add(tracker, ref, "skipped", f"cannot move from {state.status} to {tracker.status}")
                return None
        if state.status == tracker.status:
            report.add(tracker, ref, "skipped", f"already {now}")
            return None
        report.add(tracker, ref, "would fix" if report.dry_run else "to fix", f"{now} -> {target}")
        return _Action(tracker, ref, state, fix=True)

    # -- updating, exactly once --------------------------------------------------------

    async def _update(self, w: Workitem, actions: list[_Action], intents: Mapping[tuple[str, int], str],
                      report: _Report) -> Reply:
        storage = self._storage()
        where = f"#{w.instance_id} {w.step}"
        marker = f"[releasebot {self._marker_id} #{w.instance_id} {w.path}]"
        forget = storage.op("DELETE FROM bugzilla_intents WHERE instance_id = ? AND path = ?", w.instance_id, w.path)
        pending: list[asyncio.Future[None]] = []

        def mark(action: _Action, state: str | None) -> None:
            """The intent becomes done, or (None) goes: Bugzilla refused, nothing was applied."""
            if state is None:
                op = storage.op("DELETE FROM bugzilla_intents WHERE instance_id = ? AND path = ? AND tracker = ? "
                                "AND bug = ?", w.instance_id, w.path, action.tracker.name, action.ref.bug)
            else:
                op = storage.op("UPDATE bugzilla_intents SET state = ?, updated = ? WHERE instance_id = ? "
                                "AND path = ? AND tracker = ? AND bug = ?", state, self._now(), w.instance_id,
                                w.path, action.tracker.name, action.ref.bug)
            pending.append(asyncio.ensure_future(storage.write(op)))

        try:
            # an intent still 'sent': the update may have reached Bugzilla before the bot stopped
            unsure = [a for a in actions if intents.get((a.tracker.name, a.ref.bug)) == "sent"]
            for action in unsure:
                texts = await self._client(action.tracker).comments(action.ref.bug)
                if any(marker in text for text in texts):
                    report.add(action.tracker, action.ref, "skipped", "updated already by this step (its comment "
                                                                      "carries the step's marker)")
                    mark(action, "done")
                    actions.remove(action)
        except BugzillaFailure as failure:
            return Reply.failed(failure.message)
        now = self._now()
        await storage.write(storage.rows(
            "INSERT INTO bugzilla_intents (instance_id, path, tracker, bug, state, updated) VALUES (?, ?, ?, ?, "
            "'sent', ?) ON CONFLICT (instance_id, path, tracker, bug) DO UPDATE SET state = 'sent', "
            "updated = excluded.updated",
            [(w.instance_id, w.path, a.tracker.name, a.ref.bug, now) for a in actions]))
        failed: BugzillaFailure | None = None
        for n, action in enumerate(actions):
            if w.key in self._cancelled:
                failed = BugzillaFailure("cancelled")
            if failed is not None:           # not sent: the intents go
                for rest in actions[n:]:
                    mark(rest, None)
                break
            tracker, ref = action.tracker, action.ref
            try:
                comment, cut = self._comment(w, action, marker)
            except TemplateProblem as exc:
                report.add(tracker, ref, "refused", f"comment template: {exc}")
                mark(action, None)
                continue
            try:
                await self._client(tracker).update(ref.bug, comment, tracker.status if action.fix else "",
                                                   tracker.resolution if action.fix else "")
            except BugzillaFailure as failure:
                if failure.about_bug:
                    report.add(tracker, ref, "refused", failure.brief)
                    mark(action, None)
                    log.warning("%s: %s", where, failure.message)
                    continue
                failed = failure             # its intent stays 'sent': it may have been applied
                continue
            mark(action, "done")
            what = f"{action.state.status} -> {tracker.status} {tracker.resolution}".strip() if action.fix \
                else "commented (mentioned)"
            report.add(tracker, ref, "fixed" if action.fix else "commented",
                       what + ("; comment cut to 65535 characters" if cut else ""))
            log.info("%s: %s %s", where, ref.text, what)
        if pending:
            await asyncio.gather(*pending)
        fields = report.fields()
        if failed is not None:
            return Reply.failed(f"{failed.message}; so far: {fields['bugzilla_summary']}")
        log.info("%s: %s", where, fields["bugzilla_summary"])
        return Reply.done(fields, ops=[forget])

    def _comment(self, w: Workitem, action: _Action, marker: str) -> tuple[str, bool]:
        """The comment's text, ending with the marker line; cut to Bugzilla's limit (and saying so)."""
        tracker, ref = action.tracker, action.ref
        packages = [{"name": name, "version": version, "lines": list(lines)}
                    for name, (version, lines) in ref.packages.items()]
        values = {"bug": ref.bug, "ref": ref.text, "tracker": tracker.name, "fixed": action.fix,
                  "status": tracker.status, "resolution": tracker.resolution, "packages": packages,
                  "package": packages[0]["name"] if packages else "",
                  "version": packages[0]["version"] if packages else "",
                  "lines": [line for p in packages for line in p["lines"]], "instance": w.instance_id,
                  "process": w.process, "project": w.fields.get("project") or "", "step": w.step,
                  "approved_by": str(w.params.get("approved_by") or "")}
        template = tracker.comment if action.fix else tracker.mentioned_comment
        text = str(render(template, values)).rstrip()
        tail = f"\n\n{marker}"
        if len(text) + len(tail) <= MAX_COMMENT:
            return text + tail, False
        return text[:MAX_COMMENT - len(tail) - len(CUT_NOTE)] + CUT_NOTE + tail, True

    # -- helpers -----------------------------------------------------------------------

    def _services_(self) -> Services:
        if self._services is None:
            raise RuntimeError("bugzilla: used before setup")
        return self._services

    def _storage(self) -> Storage:
        return self._services_().storage

    def _now(self) -> float:
        return self._services_().clock.now()


class _Report:
    """Per bug what happened (or would), and the step's summary line."""

    def __init__(self, dry_run: bool, messages: Sequence[str]) -> None:
        self.dry_run = dry_run
        self.messages = list(messages)
        self.rows: dict[tuple[str, int], dict[str, Any]] = {}

    def add(self, tracker: Tracker, ref: Referenced, action: str, message: str) -> None:
        self.rows[(tracker.name, ref.bug)] = {"tracker": tracker.name, "bug": ref.bug, "ref": ref.text,
                                              "fixed": ref.fixed, "action": action, "message": message}

    def fields(self) -> dict[str, Any]:
        rows = list(self.rows.values())
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["action"]] = counts.get(row["action"], 0) + 1
        summary = ", ".join(f"{n} {action}" for action, n in counts.items()) or "no bug references"
        notes = [f"{r['ref']}: {r['message']}" for r in rows if r["action"] == "refused"]
        notes += [f"{r['ref']}: {r['message']}" for r in rows if r["action"] == "skipped"]
        notes += self.messages
        if notes:
            summary += "; " + "; ".join(notes[:10]) + (f"; and {len(notes) - 10} more" if len(notes) > 10 else "")
        # the summary first: the history shows the start of a step's fields
        return {"bugzilla_summary": ("dry run: " if self.dry_run else "") + summary, "bugzilla": rows}


def _boolean(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0", ""):
        return value.strip().lower() in ("true", "yes", "on", "1")
    raise ValueError(f"{what}: expected true or false, got {value!r}")


def _one_line(text: str) -> str:
    return "".join(ch if ch.isprintable() else " " for ch in text)
