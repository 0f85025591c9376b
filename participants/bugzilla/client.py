"""One tracker's Bugzilla, through python-bugzilla over REST, off the event loop.

python-bugzilla is synchronous, so every call runs in the tracker's own
worker thread (one thread, so its one ``requests`` session is never used by
two calls at once, and is reused for every request: one connection, kept
alive).  A slow or hanging Bugzilla delays that tracker's step, never the
event loop, so IRC pings and XMPP keepalives go on.

The API key.  Bugzilla 5 takes it only as a query parameter, so it is part of
every URL: urllib3's DEBUG log prints that URL, and requests' connection
errors quote it.  So:

* every record of the loggers of urllib3, requests and python-bugzilla passes
  ``Redactor``, which replaces the key (raw and URL-encoded) and any
  ``Bugzilla_api_key=...`` by ``[redacted]``, in the message and in the
  traceback (which it then carries in the message, as later formatters would
  print the raw one);
* an exception never leaves this module: ``call`` turns it into a
  ``BugzillaFailure`` whose message is built from the error's kind and
  Bugzilla's own message, redacted, raised outside the ``except`` block so no
  original exception hangs on it as context;
* no token or cookie file: ``use_creds=False, tokenfile=None``, no bugzillarc.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import threading
import traceback
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

import bugzilla
import requests
import urllib3
from bugzilla.exceptions import BugzillaError, BugzillaHTTPError

from participants.bugzilla.config import Tracker
from participants.bugzilla.model import BUG_CODES, BugState, BugzillaFailure

log = logging.getLogger(__name__)
T = TypeVar("T")
REDACTED = "[redacted]"
LOGGERS = ("urllib3", "requests", "bugzilla", "charset_normalizer", "participants.bugzilla")
READ_FIELDS = ["id", "status", "resolution", "product", "summary"]
# -- redaction ----------------------------------------------------------------------------

class Redactor(logging.Filter):
    """Takes every known API key out of a log record (module docstring)."""

    _PARAM = re.compile(r"(Bugzilla_api_key|Bugzilla_token|Bugzilla_password)=[^&\s'\"]*")

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def add(self, secret: str) -> None:
        with self._lock:
            self._secrets |= {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}

    def redact(self, text: str) -> str:
        text = self._PARAM.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
        for secret in sorted(self._secrets, key=len, reverse=True):
            if secret:
                text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:         # a broken record: keep only its template
            message = str(record.msg)
        clean = self.redact(message)
        if record.exc_info and record.exc_info[1] is not None:
            trace = "".join(traceback.format_exception(*record.exc_info))
            clean += "\n" + self.redact(trace).rstrip()
            record.exc_info, record.exc_text = None, None
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        if clean != message or record.args:
            record.msg, record.args = clean, ()
        return True


REDACTOR = Redactor()


def guard_logs() -> None:
    """Put the redactor on every logger that may see a key (the libraries
    create theirs at import; called again for each client, it also covers
    loggers created since)."""
    names = [n for n in list(logging.root.manager.loggerDict)
             if any(n == p or n.startswith(p + ".") for p in LOGGERS)]
    for name in {*LOGGERS, *names}:
        logger = logging.getLogger(name)
        if REDACTOR not in logger.filters:
            logger.addFilter(REDACTOR)


# -- the client -----------------------------------------------------------------------------

class _Session(requests.Session):
    """requests, with the tracker's timeout on every request (python-bugzilla's default is 5 minutes)."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self._timeout = timeout

    def request(self, method: Any, url: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["timeout"] = self._timeout
        return super().request(method, url, *args, **kwargs)


class Client:
    """One tracker's connection: made at first use, kept for the bot's life."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"bugzilla-{tracker.name}")
        self._bz: Any = None
        if tracker.api_key:
            REDACTOR.add(tracker.api_key)
        guard_logs()

    async def call(self, what: str, fn: Callable[[Any], T]) -> T:
        """``fn(bugzilla_api)`` in the worker thread; any failure as a BugzillaFailure."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, what, fn)

    def _run(self, what: str, fn: Callable[[Any], T]) -> T:
        failure: BugzillaFailure | None = None
        try:
            if self._bz is None:
                self._bz = self._connect()
            return fn(self._bz)
        except BugzillaFailure as exc:
            failure = exc
        except Exception as exc:
            failure = self._failure(what, exc)
        raise failure          # outside the except blocks: no original exception rides along

    def _connect(self) -> Any:
        tracker = self.tracker
        if not tracker.api_key:
            raise BugzillaFailure(f"tracker {tracker.name}: no API key (environment variable "
                                  f"{tracker.api_key_env} is not set)")
        session = _Session(tracker.timeout)
        bz = bugzilla.Bugzilla(url=None, api_key=tracker.api_key, force_rest=True, use_creds=False,
                               tokenfile=None, configpaths=[], requests_session=session,
                               sslverify=tracker.ca_file or True)
        bz.connect(tracker.url)
        return bz

    def _failure(self, what: str, exc: BaseException) -> BugzillaFailure:
        where = f"tracker {self.tracker.name}: {what}"
        host = urllib.parse.urlsplit(self.tracker.url).netloc
        if isinstance(exc, BugzillaError):
            code = int(exc.code or 0)
            message = re.sub(r" \(code=\d+\)$", "", str(exc))
            brief = REDACTOR.redact(_explain(code, message, self.tracker))
            return BugzillaFailure(f"{where}: {brief}", code, brief=brief)
        if isinstance(exc, BugzillaHTTPError) or isinstance(exc, requests.HTTPError):
            response = getattr(exc, "response", None)
            status = getattr(response, "status_code", 0) or 0
            reason = getattr(response, "reason", "") or ""
            return BugzillaFailure(f"{where}: {host} answered HTTP {status} {reason}".rstrip(),
                                   transient=status >= 500 or status in (408, 429))
        if isinstance(exc, requests.Timeout):
            return BugzillaFailure(f"{where}: {host} did not answer within {self.tracker.timeout:g}s",
                                   transient=True)
        if isinstance(exc, requests.ConnectionError):
            if _caused_by(exc, urllib3.exceptions.NewConnectionError):
                return BugzillaFailure(f"{where}: cannot connect to {host}", transient=True)
            return BugzillaFailure(f"{where}: connection to {host} failed", transient=True)
        if isinstance(exc, (requests.RequestException, OSError)):
            return BugzillaFailure(f"{where}: {type(exc).__name__} talking to {host}", transient=True)
        if isinstance(exc, ValueError):      # a 200 answer that is not Bugzilla's JSON
            return BugzillaFailure(f"{where}: {host} gave an answer that is not Bugzilla's", transient=True)
        return BugzillaFailure(REDACTOR.redact(f"{where}: {type(exc).__name__}: {exc}"))

    def close(self) -> None:
        bz, self._bz = self._bz, None
        if bz is not None:
            self._executor.submit(lambda: bz.get_requests_session().close())
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- the calls the participant makes ----------------------------------------------

    async def read(self, ids: Iterable[int]) -> dict[int, BugState]:
        """One batched read: the bugs the account can see; missing and private
        bugs are left out alike (``probe`` tells them apart)."""
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        if len(wanted) == 1:        # python-bugzilla reads one bug at /bug/N, which says why it cannot
            try:
                return {wanted[0]: await self.probe(wanted[0])}
            except BugzillaFailure as failure:
                if failure.code in (101, 102):
                    return {}
                raise
        bugs = await self.call("read bugs", lambda bz: bz.getbugs(wanted, include_fields=list(READ_FIELDS),
                                                                   permissive=False))
        return {b.id: _state(b) for b in bugs if b is not None}

    async def probe(self, bug: int) -> BugState:
        """One bug, read alone: a BugzillaFailure with code 101 (missing) or 102 (private) if it cannot be."""
        found = await self.call(f"read bug {bug}", lambda bz: bz.getbugs([bug], include_fields=list(READ_FIELDS),
                                                                         permissive=False))
        if not found or found[0] is None:
            raise BugzillaFailure(f"tracker {self.tracker.name}: bug {bug} does not exist", 101)
        return _state(found[0])

    async def comments(self, bug: int) -> list[str]:
        """The texts of a bug's comments the account may see, oldest first."""
        answer = await self.call(f"read the comments of bug {bug}", lambda bz: bz.get_comments([bug]))
        bugs = answer.get("bugs", {}) if isinstance(answer, dict) else {}
        entry = bugs.get(str(bug)) or bugs.get(bug) or {}
        return [str(c.get("text", "")) for c in entry.get("comments", [])]

    async def update(self, bug: int, comment: str, status: str = "", resolution: str = "") -> dict[str, Any]:
        """One update: the comment and, for a fixed bug, the status change together (atomic in Bugzilla)."""
        change: dict[str, Any] = {"comment": {"body": comment, "is_private": False}}
        if status:
            change["status"] = status
            if resolution:
                change["resolution"] = resolution
        answer = await self.call(f"update bug {bug}", lambda bz: bz.update_bugs([bug], change))
        return dict(answer) if isinstance(answer, dict) else {}


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``kind`` is in the chain of causes (python-bugzilla re-raises
    connection errors as a new exception of the same type, its cause as context)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kind):
            return True
        stack += [current.__cause__, current.__context__, *[a for a in current.args if isinstance(a, BaseException)]]
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            stack.append(reason)
    return False


def _state(bug: Any) -> BugState:
    return BugState(int(bug.id), str(getattr(bug, "status", "") or ""), str(getattr(bug, "resolution", "") or ""),
                    str(getattr(bug, "product", "") or ""), str(getattr(bug, "summary", "") or ""))


def _explain(code: int, message: str, tracker: Tracker) -> str:
    """Bugzilla's error as a clear one-line message."""
    if code == 306:
        return f"the API key in {tracker.api_key_env} is not valid for {tracker.url} (Bugzilla 306: {message})"
    if code == 410:
        return f"Bugzilla took the request as anonymous, the API key was not accepted (410: {message})"
    if code in (300, 32000):
        return f"not logged in ({code}: {message})"
    if code == 123:
        return f"the workflow refuses the change (123: {message})"
    if code in (121, 122):
        return f"resolution rules ({code}: {message})"
    if code == 114:
        return f"the comment is too long (114: {message})"
    if code == 101:
        return "the bug does not exist (101)"
    if code == 102:
        return "the bug is private, the bot's account may not see it (102)"
    return f"Bugzilla error {code}: {message}"
