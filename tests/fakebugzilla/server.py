"""The fake Bugzilla's state and its HTTP front (see the package docstring).

State lives in plain dataclasses under one lock; each request is handled by
a thread of a ``ThreadingHTTPServer`` speaking HTTP/1.1 with keep-alive, so a
client that reuses its session shows up as one connection
(``connections``).  Every request is counted (``requests``), errors included.

Test hooks, which a real Bugzilla does not have: ``fail_next`` answers the
next requests with a 5xx page, ``delay`` slows every request down, and
``after_update`` is called after an update has been stored and before it is
answered (a test can stall there and SIGKILL the client between "update
applied" and "answer received"; if it raises, the connection drops without
an answer).
"""
from __future__ import annotations

import json
import secrets
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable

VERSION = "5.0.6"
DOCS = "https://bugzilla.readthedocs.org/en/5.0/api/"
MAX_COMMENT = 65535
OPEN = ("UNCONFIRMED", "CONFIRMED", "IN_PROGRESS")
CLOSED = ("RESOLVED", "VERIFIED")
WORKFLOW: dict[str, tuple[str, ...]] = {      # a default install's transitions
    "UNCONFIRMED": ("CONFIRMED", "IN_PROGRESS", "RESOLVED"),
    "CONFIRMED": ("IN_PROGRESS", "RESOLVED"),
    "IN_PROGRESS": ("CONFIRMED", "RESOLVED"),
    "RESOLVED": ("UNCONFIRMED", "CONFIRMED", "VERIFIED"),
    "VERIFIED": ("UNCONFIRMED", "CONFIRMED"),
}
RESOLUTIONS = ("FIXED", "INVALID", "WONTFIX", "DUPLICATE", "WORKSFORME")
# (HTTP status) of each error code, as Bugzilla 5's REST server maps them
HTTP_OF = {32614: 404, 100: 400, 101: 404, 102: 401, 50: 400, 51: 404, 113: 401, 114: 400, 115: 401,
           121: 400, 122: 400, 123: 400, 300: 401, 306: 400, 410: 401, 32000: 400}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Account:
    login: str
    api_key: str = ""
    password: str = ""
    groups: frozenset[str] = frozenset()
    insider: bool = False           # in the insidergroup: sees and sets private comments
    id: int = 0


@dataclass
class Comment:
    id: int                         # global
    bug_id: int
    count: int                      # per bug: 0 is the description
    text: str
    creator: str
    time: str
    is_private: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "bug_id": self.bug_id, "count": self.count, "text": self.text,
                "creator": self.creator, "author": self.creator, "time": self.time,
                "creation_time": self.time, "is_private": self.is_private, "attachment_id": None,
                "tags": []}


@dataclass
class Bug:
    id: int
    product: str
    summary: str
    status: str = "CONFIRMED"
    resolution: str = ""
    component: str = "general"
    groups: frozenset[str] = frozenset()     # a bug in a group is seen only by its members
    creator: str = "reporter@example.org"
    creation_time: str = field(default_factory=_now)
    last_change_time: str = field(default_factory=_now)
    comments: list[Comment] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "alias": [], "summary": self.summary, "status": self.status,
                "resolution": self.resolution, "is_open": self.status in OPEN, "product": self.product,
                "component": self.component, "groups": sorted(self.groups), "creator": self.creator,
                "assigned_to": "nobody@example.org", "creation_time": self.creation_time,
                "last_change_time": self.last_change_time, "priority": "---", "severity": "normal",
                "version": "unspecified", "keywords": [], "cc": [], "blocks": [], "depends_on": []}


class BugzillaFault(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class FakeBugzilla:
    """``with FakeBugzilla() as bz: bz.add_account(...); bz.add_bug(...); bz.url``"""

    def __init__(self, version: str = VERSION) -> None:
        self.version = version
        self.lock = threading.RLock()
        self.accounts: list[Account] = []
        self.bugs: dict[int, Bug] = {}
        self.tokens: dict[str, Account] = {}
        self.requests: list[tuple[str, str]] = []       # (method, path): every request, errors too
        self.connections = 0
        self.after_update: Callable[[int], None] | None = None
        self.delay = 0.0                # seconds every request takes (a slow Bugzilla)
        self._fail: list[int] = []
        self._comment_ids = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- life ---------------------------------------------------------------------

    def start(self) -> "FakeBugzilla":
        fake = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass                 # a hook that raised, or a client that went away: the connection drops

            def process_request(self, request: Any, client_address: Any) -> None:
                with fake.lock:
                    fake.connections += 1
                super().process_request(request, client_address)

        self._server = Server(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fakebugzilla",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeBugzilla":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The explicit REST URL a client is configured with."""
        return f"http://127.0.0.1:{self.port}/rest/"

    # -- state for tests ------------------------------------------------------------

    def add_account(self, login: str, api_key: str = "", *, password: str = "", groups: Iterable[str] = (),
                    insider: bool = False) -> Account:
        with self.lock:
            account = Account(login, api_key or secrets.token_hex(20), password, frozenset(groups), insider,
                              len(self.accounts) + 1)
            self.accounts.append(account)
            return account

    def add_bug(self, product: str = "Product", summary: str = "something is wrong", *, status: str = "CONFIRMED",
                resolution: str = "", groups: Iterable[str] = (), bug_id: int | None = None) -> int:
        with self.lock:
            number = bug_id if bug_id is not None else max(self.bugs, default=0) + 1
            bug = Bug(number, product, summary, status, resolution, groups=frozenset(groups))
            self.bugs[number] = bug
            self._add_comment(bug, f"description of bug {number}", bug.creator, False)
            return number

    def add_comment(self, bug_id: int, text: str, *, creator: str = "someone@example.org",
                    private: bool = False) -> int:
        with self.lock:
            return self._add_comment(self.bugs[bug_id], text, creator, private).id

    def comments(self, bug_id: int) -> list[str]:
        """Every comment's text after the description, private ones too."""
        with self.lock:
            return [c.text for c in self.bugs[bug_id].comments[1:]]

    def bug(self, bug_id: int) -> Bug:
        with self.lock:
            return self.bugs[bug_id]

    def fail_next(self, count: int = 1, status: int = 503) -> None:
        """Answer the next ``count`` requests with an HTTP ``status`` error page."""
        with self.lock:
            self._fail += [status] * count

    def count(self, method: str | None = None, prefix: str = "") -> int:
        with self.lock:
            return sum(1 for m, p in self.requests if (method is None or m == method) and p.startswith(prefix))

    def reset_counts(self) -> None:
        with self.lock:
            self.requests.clear()
            self.connections = 0

    def _add_comment(self, bug: Bug, text: str, creator: str, private: bool) -> Comment:
        self._comment_ids += 1
        comment = Comment(self._comment_ids, bug.id, len(bug.comments), text, creator, _now(), private)
        bug.comments.append(comment)
        return comment

    # -- the API ----------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        """One REST call: (HTTP status, JSON answer).  Raises BugzillaFault."""
        parts = [p for p in path.split("/") if p]
        route = (method, parts[0] if parts else "", len(parts))
        if route == ("GET", "version", 1):
            return 200, {"version": self.version}
        if route == ("GET", "login", 1):
            return 200, self._login(query)
        account = self._authenticate(query)
        if route == ("GET", "logout", 1):
            token = _one(query, "Bugzilla_token")
            if token:
                self.tokens.pop(token, None)
            return 200, {"result": None}
        if parts[:1] == ["bug"]:
            if method == "GET" and len(parts) == 1:
                return 200, self._search(account, query)
            if method == "GET" and len(parts) == 2:
                return 200, self._get(account, parts[1], query)
            if method == "PUT" and len(parts) == 2:
                return 200, self._update(account, parts[1], body)
            if method == "GET" and len(parts) == 3 and parts[2] == "comment":
                return 200, self._comments(account, parts[1], query)
            if method == "POST" and len(parts) == 3 and parts[2] == "comment":
                return 201, self._post_comment(account, parts[1], body)
        raise BugzillaFault(32614, f"A REST API resource was not found for '{method} /{'/'.join(parts)}'.")

    def _login(self, query: dict[str, list[str]]) -> dict[str, Any]:
        login, password = _one(query, "login"), _one(query, "password")
        for account in self.accounts:
            if account.login == login and account.password and account.password == password:
                token = f"{account.id}-{secrets.token_hex(8)}"
                self.tokens[token] = account
                return {"id": account.id, "token": token}
        raise BugzillaFault(300, "The login or password you entered is not valid.")

    def _authenticate(self, query: dict[str, list[str]]) -> Account | None:
        """Bugzilla 5 reads credentials from the query string only: the
        X-BUGZILLA-API-KEY header is ignored (the request is anonymous)."""
        key = _one(query, "Bugzilla_api_key")
        if key is not None:
            for account in self.accounts:
                if secrets.compare_digest(account.api_key, key):
                    return account
            raise BugzillaFault(306, "The API key you specified is invalid. Please check that you typed it "
                                     "correctly.")
        token = _one(query, "Bugzilla_token")
        if token is not None:
            if token in self.tokens:
                return self.tokens[token]
            raise BugzillaFault(32000, "The cookies or token provide were not valid or have expired. You may "
                                       "login again to get a new cookie or token.")
        return None

    def _visible(self, account: Account | None, bug: Bug) -> bool:
        return bug.groups <= (account.groups if account else frozenset())

    def _bug(self, account: Account | None, ident: str) -> Bug:
        """The bug named ``ident`` if the account may see it (101 / 102 / 100 otherwise)."""
        if not ident.isdigit() or not ident.isascii():
            raise BugzillaFault(100, f"'{ident}' is not a valid bug number nor an alias to a bug.")
        bug = self.bugs.get(int(ident))
        if bug is None:
            raise BugzillaFault(101, f"Bug #{int(ident)} does not exist.")
        if not self._visible(account, bug):
            message = f"You are not authorized to access bug #{bug.id}."
            if account is None:
                message += (" To see this bug, you must first log in to an account with the appropriate "
                            "permissions.")
            raise BugzillaFault(102, message)
        return bug

    def _get(self, account: Account | None, ident: str, query: dict[str, list[str]]) -> dict[str, Any]:
        if _one(query, "permissive") in ("1", "true"):
            try:
                bug = self._bug(account, ident)
            except BugzillaFault as fault:
                return {"bugs": [], "faults": [{"id": ident, "faultString": fault.message,
                                                "faultCode": fault.code}]}
        else:
            bug = self._bug(account, ident)
        return {"bugs": [_fields(bug.as_json(), query)], "faults": []}

    def _search(self, account: Account | None, query: dict[str, list[str]]) -> dict[str, Any]:
        """Search semantics: bugs that are missing or that the account may not see are left out, alike."""
        wanted = {int(i) for i in _many(query, "id") if i.isdigit()}
        found = [self.bugs[i] for i in sorted(wanted) if i in self.bugs and self._visible(account, self.bugs[i])]
        return {"bugs": [_fields(b.as_json(), query) for b in found]}

    def _comments(self, account: Account | None, ident: str, query: dict[str, list[str]]) -> dict[str, Any]:
        bug = self._bug(account, ident)
        since = _one(query, "new_since")
        shown = [c.as_json() for c in bug.comments
                 if (not c.is_private or (account is not None and account.insider))
                 and (since is None or c.time >= since)]
        return {"bugs": {str(bug.id): {"comments": shown}}, "comments": {}}

    def _comment_of(self, account: Account | None, spec: Any) -> tuple[str, bool]:
        """(text, private) of a comment hash; ``body`` or, for compatibility, ``comment``."""
        if not isinstance(spec, dict):
            return "", False
        text = spec.get("body", spec.get("comment", ""))
        text = "" if text is None else str(text)
        private = bool(spec.get("is_private"))
        if len(text) > MAX_COMMENT:
            raise BugzillaFault(114, f"Comments cannot be longer than {MAX_COMMENT} characters.")
        if private and not (account and account.insider):
            raise BugzillaFault(113, "Sorry, but you are not allowed to (un)mark comments or attachments as "
                                     "private.")
        return text, private

    def _update(self, account: Account | None, ident: str, body: Any) -> dict[str, Any]:
        params = body if isinstance(body, dict) else {}
        if account is None:
            raise BugzillaFault(410, "You must log in before using this part of Bugzilla.")
        bug = self._bug(account, ident)
        # everything is checked before anything is stored: a failed update stores nothing
        status = bug.status
        if "status" in params:
            status = str(params["status"]).upper()
            if status not in WORKFLOW:
                raise BugzillaFault(51, f"There is no status named '{params['status']}'.")
            if status != bug.status and status not in WORKFLOW[bug.status]:
                raise BugzillaFault(123, f"You are not allowed to change the bug status from {bug.status} "
                                         f"to {status}.")
        resolution = bug.resolution
        if "resolution" in params:
            resolution = str(params["resolution"] or "").upper()
            if resolution and resolution not in RESOLUTIONS:
                raise BugzillaFault(51, f"There is no Resolution named '{params['resolution']}'.")
        if status in OPEN:
            if "resolution" in params and resolution:
                raise BugzillaFault(122, "You cannot set a resolution for open bugs.")
            resolution = ""
        elif not resolution:
            raise BugzillaFault(121, f"A valid resolution is required to mark bugs as {status}.")
        text, private = self._comment_of(account, params.get("comment"))
        changes: dict[str, dict[str, str]] = {}
        if status != bug.status:
            changes["status"] = {"removed": bug.status, "added": status}
        if resolution != bug.resolution:
            changes["resolution"] = {"removed": bug.resolution, "added": resolution}
        bug.status, bug.resolution = status, resolution
        if text:
            self._add_comment(bug, text, account.login, private)
        if changes or text:
            bug.last_change_time = _now()
        return {"bugs": [{"id": bug.id, "alias": [], "last_change_time": bug.last_change_time,
                          "changes": changes}]}

    def _post_comment(self, account: Account | None, ident: str, body: Any) -> dict[str, Any]:
        if account is None:
            raise BugzillaFault(410, "You must log in before using this part of Bugzilla.")
        bug = self._bug(account, ident)
        text, private = self._comment_of(account, body if isinstance(body, dict) else {})
        if not text:
            raise BugzillaFault(50, "The function requires a comment argument, and that argument was not set.")
        comment = self._add_comment(bug, text, account.login, private)
        bug.last_change_time = _now()
        return {"id": comment.id}


def _one(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[-1] if values else None


def _many(query: dict[str, list[str]], key: str) -> list[str]:
    """Repeated parameters and comma-separated lists, as Bugzilla takes both."""
    return [part.strip() for value in query.get(key, []) for part in value.split(",") if part.strip()]


def _fields(bug: dict[str, Any], query: dict[str, list[str]]) -> dict[str, Any]:
    include = _many(query, "include_fields")
    exclude = set(_many(query, "exclude_fields"))
    chosen = {k: v for k, v in bug.items() if (not include or k in include) and k not in exclude}
    return chosen


def _handler_for(fake: FakeBugzilla) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "Apache"
        sys_version = ""

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def setup(self) -> None:
            super().setup()
            # headers and body are two writes: without this, Nagle and the client's delayed ACK add 40 ms
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_PUT(self) -> None:
            self._serve("PUT")

        def do_POST(self) -> None:
            self._serve("POST")

        def _serve(self, method: str) -> None:
            url = urllib.parse.urlsplit(self.path)
            if fake.delay:
                time.sleep(fake.delay)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            with fake.lock:
                fake.requests.append((method, url.path))
                failure = fake._fail.pop(0) if fake._fail else None
            if failure is not None:
                page = f"<html><body><h1>{failure} Service Unavailable</h1></body></html>".encode()
                self._send(failure, page, "text/html; charset=iso-8859-1")
                return
            if not url.path.startswith("/rest/") and url.path != "/rest":
                self._send(404, b"<html><body>Not Found</body></html>", "text/html")
                return
            query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
            status, answer = 200, None
            try:
                body: Any = None
                # a JSON body counts only when it says so
                if raw and (self.headers.get("Content-Type") or "").split(";")[0].strip() == "application/json":
                    try:
                        body = json.loads(raw)
                    except ValueError as exc:
                        raise BugzillaFault(32000, f"Could not parse the 'params' argument as valid JSON. "
                                                   f"Error: {exc}") from None
                with fake.lock:
                    status, answer = fake.handle(method, url.path[len("/rest"):], query, body)
            except BugzillaFault as fault:
                status = HTTP_OF.get(fault.code, 400)
                answer = {"error": True, "code": fault.code, "message": fault.message, "documentation": DOCS}
            hook = fake.after_update
            if method == "PUT" and status == 200 and hook is not None:
                hook(int(url.path.rstrip("/").rsplit("/", 1)[-1]))
            self._send(status, json.dumps(answer).encode(), "application/json; charset=UTF-8")

        def _send(self, status: int, payload: bytes, kind: str) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except OSError:          # the client went away (killed while we stalled)
                self.close_connection = True

    return Handler
