"""The fake Bugzilla behaves as Bugzilla 5 does (see tests/fakebugzilla):
status codes, error codes and messages, the API key only as a query
parameter, the default workflow and resolution rules, atomic updates,
comments oldest first with private ones removed, private bugs left out of
searches like missing ones, and python-bugzilla working against it over one
kept-alive connection."""
from __future__ import annotations

import json
from typing import Any, Iterator

import bugzilla
import pytest
import requests

from tests.fakebugzilla import FakeBugzilla

KEY = "k" * 40


@pytest.fixture
def fake() -> Iterator[FakeBugzilla]:
    with FakeBugzilla() as bz:
        bz.add_account("bot@example.org", KEY)
        bz.add_account("insider@example.org", "i" * 40, insider=True, groups=["secret"])
        yield bz


@pytest.fixture
def http(fake: FakeBugzilla) -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def call(http: requests.Session, fake: FakeBugzilla, method: str, path: str, key: str | None = KEY,
         body: Any = None, headers: dict[str, str] | None = None, **query: Any) -> tuple[int, Any]:
    params = dict(query)
    if key is not None:
        params["Bugzilla_api_key"] = key
    data = json.dumps(body) if body is not None and not isinstance(body, (str, bytes)) else body
    response = http.request(method, fake.url + path.lstrip("/"), params=params, data=data,
                            headers={"Content-Type": "application/json", **(headers or {})})
    return response.status_code, response.json()


def error(answer: Any) -> tuple[int, str]:
    assert answer["error"] is True and answer["documentation"]
    return answer["code"], answer["message"]


def test_version_and_unknown_paths(fake: FakeBugzilla, http: requests.Session) -> None:
    assert call(http, fake, "GET", "version", key=None) == (200, {"version": "5.0.6"})
    status, answer = call(http, fake, "GET", "nosuch")
    assert status == 404 and error(answer) == (32614, "A REST API resource was not found for 'GET /nosuch'.")


def test_bug_get_missing_private_and_bad_ids(fake: FakeBugzilla, http: requests.Session) -> None:
    public = fake.add_bug("Product", "a public bug")
    private = fake.add_bug("Product", "a private bug", groups=["secret"])
    status, answer = call(http, fake, "GET", f"bug/{public}", include_fields="id,status")
    assert status == 200 and answer == {"bugs": [{"id": public, "status": "CONFIRMED"}], "faults": []}
    status, answer = call(http, fake, "GET", "bug/99999")
    assert status == 404 and error(answer) == (101, "Bug #99999 does not exist.")
    status, answer = call(http, fake, "GET", "bug/0")
    assert status == 404 and error(answer) == (101, "Bug #0 does not exist.")
    status, answer = call(http, fake, "GET", "bug/x")
    assert status == 400 and error(answer) == (100, "'x' is not a valid bug number nor an alias to a bug.")
    status, answer = call(http, fake, "GET", f"bug/{private}")
    assert status == 401 and error(answer) == (102, f"You are not authorized to access bug #{private}.")
    status, answer = call(http, fake, "GET", f"bug/{private}", key=None)
    assert status == 401 and error(answer)[1].endswith("you must first log in to an account with the appropriate "
                                                       "permissions.")
    status, answer = call(http, fake, "GET", f"bug/{private}", key="i" * 40, include_fields=["id"])
    assert status == 200 and answer["bugs"] == [{"id": private}]
    status, answer = call(http, fake, "GET", "bug/99999", permissive="1")
    assert status == 200 and answer["bugs"] == [] and answer["faults"][0]["faultCode"] == 101


def test_a_search_leaves_out_private_and_missing_bugs_alike(fake: FakeBugzilla, http: requests.Session) -> None:
    a, b = fake.add_bug(), fake.add_bug()
    private = fake.add_bug(groups=["secret"])
    status, answer = call(http, fake, "GET", "bug", id=[b, 99999, private, a], include_fields=["id", "product"])
    assert status == 200 and answer == {"bugs": [{"id": a, "product": "Product"}, {"id": b, "product": "Product"}]}
    status, answer = call(http, fake, "GET", "bug", id=f"{a},{private}", key="i" * 40, include_fields="id")
    assert [bug["id"] for bug in answer["bugs"]] == [a, private]


def test_the_api_key_counts_only_as_a_query_parameter(fake: FakeBugzilla, http: requests.Session) -> None:
    bug = fake.add_bug()
    private = fake.add_bug(groups=["secret"])
    header = {"X-BUGZILLA-API-KEY": "i" * 40}
    status, _ = call(http, fake, "GET", f"bug/{bug}", key=None, headers=header)
    assert status == 200                               # reads work anonymously
    status, answer = call(http, fake, "GET", f"bug/{private}", key=None, headers=header)
    assert status == 401 and error(answer)[0] == 102   # the header did not log anyone in
    status, answer = call(http, fake, "PUT", f"bug/{bug}", key=None, headers=header,
                          body={"ids": [bug], "comment": {"body": "x"}})
    assert status == 401 and error(answer) == (410, "You must log in before using this part of Bugzilla.")
    status, answer = call(http, fake, "GET", f"bug/{bug}", key="wrong")
    assert status == 400 and error(answer) == (306, "The API key you specified is invalid. Please check that you "
                                                    "typed it correctly.")
    assert call(http, fake, "GET", "version", key="wrong")[0] == 200     # version needs no login
    assert fake.comments(bug) == []


def test_login_token_and_logout(fake: FakeBugzilla, http: requests.Session) -> None:
    fake.add_account("person@example.org", password="secret-pw")
    status, answer = call(http, fake, "GET", "login", key=None, login="person@example.org", password="nope")
    assert status == 401 and error(answer) == (300, "The login or password you entered is not valid.")
    status, answer = call(http, fake, "GET", "login", key=None, login="person@example.org", password="secret-pw")
    token = answer["token"]
    assert status == 200 and token.startswith(f"{answer['id']}-")
    bug = fake.add_bug()
    status, _ = call(http, fake, "PUT", f"bug/{bug}", key=None, Bugzilla_token=token, body={"comment": {"body": "t"}})
    assert status == 200 and fake.comments(bug) == ["t"]
    assert call(http, fake, "GET", "logout", key=None, Bugzilla_token=token) == (200, {"result": None})
    status, answer = call(http, fake, "GET", f"bug/{bug}", key=None, Bugzilla_token=token)
    assert status == 400 and error(answer)[0] == 32000


def test_the_default_workflow_and_the_resolution_rules(fake: FakeBugzilla, http: requests.Session) -> None:
    bug = fake.add_bug(status="CONFIRMED")

    def put(**change: Any) -> tuple[int, Any]:
        return call(http, fake, "PUT", f"bug/{bug}", body={"ids": [bug], **change})

    status, answer = put(status="VERIFIED", resolution="FIXED", comment={"body": "skip a step"})
    assert status == 400 and error(answer) == (123, "You are not allowed to change the bug status from CONFIRMED "
                                                    "to VERIFIED.")
    status, answer = put(status="RESOLVED", comment={"body": "no resolution"})
    assert status == 400 and error(answer) == (121, "A valid resolution is required to mark bugs as RESOLVED.")
    status, answer = put(status="IN_PROGRESS", resolution="FIXED")
    assert status == 400 and error(answer) == (122, "You cannot set a resolution for open bugs.")
    status, answer = put(status="BOGUS")
    assert status == 404 and error(answer) == (51, "There is no status named 'BOGUS'.")
    status, answer = put(status="RESOLVED", resolution="X")
    assert status == 404 and error(answer) == (51, "There is no Resolution named 'X'.")
    assert fake.comments(bug) == [] and fake.bug(bug).status == "CONFIRMED"      # failed updates store nothing

    status, answer = put(status="resolved", resolution="FIXED", comment={"body": "fixed", "is_private": False})
    assert status == 200
    [changed] = answer["bugs"]
    assert changed["id"] == bug and changed["alias"] == [] and changed["last_change_time"].endswith("Z")
    assert changed["changes"] == {"status": {"removed": "CONFIRMED", "added": "RESOLVED"},
                                  "resolution": {"removed": "", "added": "FIXED"}}
    status, answer = put(status="RESOLVED", comment={"body": "same status"})
    assert status == 200 and answer["bugs"][0]["changes"] == {}
    status, answer = put(status="VERIFIED")
    assert answer["bugs"][0]["changes"] == {"status": {"removed": "RESOLVED", "added": "VERIFIED"}}
    assert fake.bug(bug).resolution == "FIXED"
    status, answer = put(status="CONFIRMED")        # reopening clears the resolution
    assert answer["bugs"][0]["changes"] == {"status": {"removed": "VERIFIED", "added": "CONFIRMED"},
                                            "resolution": {"removed": "FIXED", "added": ""}}
    status, answer = put(comment={"body": ""})
    assert status == 200 and answer["bugs"][0]["changes"] == {}
    assert fake.comments(bug) == ["fixed", "same status"]


def test_comments_oldest_first_private_removed_and_limits(fake: FakeBugzilla, http: requests.Session) -> None:
    bug = fake.add_bug()
    fake.add_comment(bug, "first")
    fake.add_comment(bug, "hidden", private=True)
    fake.add_comment(bug, "third")
    status, answer = call(http, fake, "GET", f"bug/{bug}/comment")
    assert status == 200 and answer["comments"] == {}
    comments = answer["bugs"][str(bug)]["comments"]
    assert [(c["count"], c["text"]) for c in comments] == [(0, f"description of bug {bug}"), (1, "first"),
                                                           (3, "third")]
    assert set(comments[1]) >= {"id", "bug_id", "text", "creator", "time", "creation_time", "is_private",
                                "attachment_id", "tags", "count"}
    insider = call(http, fake, "GET", f"bug/{bug}/comment", key="i" * 40)[1]["bugs"][str(bug)]["comments"]
    assert [c["text"] for c in insider][1:] == ["first", "hidden", "third"]

    status, answer = call(http, fake, "PUT", f"bug/{bug}", body={"comment": {"body": "x", "is_private": True}})
    assert status == 401 and error(answer)[0] == 113
    status, answer = call(http, fake, "PUT", f"bug/{bug}", body={"comment": {"body": "x" * 65536}})
    assert status == 400 and error(answer) == (114, "Comments cannot be longer than 65535 characters.")
    status, answer = call(http, fake, "POST", f"bug/{bug}/comment", body={"comment": ""})
    assert status == 400 and error(answer)[0] == 50
    status, answer = call(http, fake, "POST", f"bug/{bug}/comment", body={"comment": "posted"})
    assert status == 201 and isinstance(answer["id"], int)
    status, answer = call(http, fake, "GET", "bug/99999/comment")
    assert status == 404 and error(answer)[0] == 101


def test_a_body_counts_only_as_json(fake: FakeBugzilla, http: requests.Session) -> None:
    bug = fake.add_bug()
    response = http.put(fake.url + f"bug/{bug}", params={"Bugzilla_api_key": KEY},
                        data=json.dumps({"comment": {"body": "ignored"}}), headers={"Content-Type": "text/plain"})
    assert response.status_code == 200 and fake.comments(bug) == []
    status, answer = call(http, fake, "PUT", f"bug/{bug}", body="{not json")
    assert status == 400 and error(answer)[0] == 32000


def test_requests_are_counted_and_5xx_can_be_injected(fake: FakeBugzilla, http: requests.Session) -> None:
    fake.fail_next(1, 503)
    assert http.get(fake.url + "version").status_code == 503
    assert http.get(fake.url + "version").status_code == 200
    assert fake.count("GET", "/rest/version") == 2
    assert fake.connections == 1                      # kept alive


def test_python_bugzilla_over_rest_uses_one_connection(fake: FakeBugzilla) -> None:
    a, b = fake.add_bug(summary="one"), fake.add_bug(summary="two")
    private = fake.add_bug(groups=["secret"])
    bz = bugzilla.Bugzilla(url=None, api_key=KEY, force_rest=True, use_creds=False, tokenfile=None)
    bz.connect(fake.url)
    bugs = bz.getbugs([a, b, private, 99999], include_fields=["id", "summary"], permissive=False)
    assert [bug.summary for bug in bugs] == ["one", "two"]
    bz.update_bugs([a], {"status": "RESOLVED", "resolution": "FIXED", "comment": {"body": "done"}})
    bz.update_bugs([b], bz.build_update(comment="legacy 'comment' key"))
    assert [c["text"] for c in bz.get_comments([a])["bugs"][str(a)]["comments"]][1:] == ["done"]
    assert fake.comments(b) == ["legacy 'comment' key"]
    with pytest.raises(bugzilla.BugzillaError) as caught:
        bz.getbugs([private], permissive=False)
    assert caught.value.code == 102
    assert fake.requests == [("GET", "/rest/version"), ("GET", "/rest/bug"), ("PUT", f"/rest/bug/{a}"),
                             ("PUT", f"/rest/bug/{b}"), ("GET", f"/rest/bug/{a}/comment"),
                             ("GET", f"/rest/bug/{private}")]
    assert fake.connections == 1
