"""A trusted receiving host's verdict on a mail: RFC 8601
``Authentication-Results``, parsed with the ``authres`` package.

Opt-in and weaker than a reply address, like an IRC hostmask: it shows that
the From domain sent the mail, not which mailbox did, so it is never enough
to answer an approval.

Which headers count.  Anyone can write an ``Authentication-Results`` header
into the mail they send, naming any host.  The trusted host (the configured
``authserv_id``) adds its own on top of the mail when it receives it, and RFC
8601 section 5 has it delete any arriving header that claims its id.  So only
the topmost run counts: the first ``Authentication-Results`` header from the
top must be the trusted host's, and the run goes on only while the next
header, directly below, is one too.  Any other header in between (a
``Received`` line of an earlier hop) ends it; a header with the trusted id
lower down is ignored.  Other hosts' headers never count.

What passes.  The From domain must be one the trusted host may vouch for
(``domains``), and a counted header must say either ``dmarc=pass`` with
``header.from`` equal to the From domain, or ``dkim=pass`` with ``header.d``
equal to it, and none may say ``dmarc=fail``.  Alignment is strict (equal domains), not DMARC's relaxed
"same organisational domain": deciding that needs the Public Suffix List,
which the bot does not carry; a subdomain that signs its own mail is vouched
for by listing it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import authres

#: The longest header value handed to the parser (a real one is well under this).
MAX_VALUE = 8_000


@dataclass(frozen=True)
class Trust:
    """The receiving host whose verdicts count, and the domains it may vouch for."""

    authserv_id: str
    domains: frozenset[str]

    @classmethod
    def of(cls, authserv_id: str, domains: Iterable[str]) -> "Trust":
        return cls(authserv_id.strip().lower(), frozenset(d.strip().lower().rstrip(".") for d in domains))


@dataclass(frozen=True)
class Verdict:
    """``ok`` with ``how`` it was verified ("dmarc=pass for example.org by
    mx.example.org"), or not, with the ``reason``."""

    ok: bool
    how: str = ""
    reason: str = ""


def verify(headers: Sequence[tuple[int, str]], from_domain: str | None, trust: Trust | None) -> Verdict:
    """The verdict of ``trust``'s host on a mail whose From domain is
    ``from_domain``, from its ``Authentication-Results`` headers as (position
    among all headers, value), top to bottom (``parse.Mail.auth_results``)."""
    if trust is None:
        return Verdict(False, reason="no trusted authserv-id is configured")
    if not from_domain:
        return Verdict(False, reason="the mail has no usable From address")
    domain = from_domain.lower()
    counted = _topmost_run(headers, trust.authserv_id)
    if isinstance(counted, str):
        return Verdict(False, reason=counted)
    if domain not in trust.domains:
        return Verdict(False, reason=f"{trust.authserv_id} may not vouch for {domain}")
    seen: list[str] = []
    passed: Verdict | None = None
    for result in (r for header in counted for r in header.results):
        method, outcome = str(result.method).lower(), str(result.result).lower()
        seen.append(f"{method}={outcome}")
        if method == "dmarc" and outcome == "fail":
            return Verdict(False, reason=f"{trust.authserv_id} says dmarc=fail for {domain}")
        if outcome != "pass" or passed is not None:
            continue
        if method == "dmarc" and _property(result, "header", "from") == domain:
            passed = Verdict(True, how=f"dmarc=pass for {domain} by {trust.authserv_id}")
        elif method == "dkim" and _property(result, "header", "d") == domain:
            passed = Verdict(True, how=f"dkim=pass (header.d={domain}) by {trust.authserv_id}")
    if passed is not None:
        return passed
    said = ", ".join(seen[:6]) or "no results"
    return Verdict(False, reason=f"{trust.authserv_id} says {said}: no dmarc=pass or aligned dkim=pass for {domain}")


def _topmost_run(headers: Sequence[tuple[int, str]], authserv_id: str) -> list[authres.AuthenticationResultsHeader] | str:
    """The trusted host's headers that count (module docstring), or why there are none."""
    counted: list[authres.AuthenticationResultsHeader] = []
    previous: int | None = None
    for position, value in headers:
        if previous is not None and position != previous + 1:
            break                                   # another header in between: the run is over
        header = _parse(value)
        if header is None or str(header.authserv_id).lower() != authserv_id:
            if not counted:
                found = "an unparsable one" if header is None else f"from {str(header.authserv_id)[:60]!r}"
                return f"the topmost Authentication-Results is {found}, not from {authserv_id}"
            break
        counted.append(header)
        previous = position
    if not counted:
        return "no Authentication-Results header"
    return counted


def _parse(value: str) -> authres.AuthenticationResultsHeader | None:
    if len(value) > MAX_VALUE:
        return None
    try:
        return authres.AuthenticationResultsHeader.parse_value(" ".join(value.split()))
    except Exception:         # authres.AuthResError and whatever a hostile value provokes
        return None


def _property(result: object, type_: str, name: str) -> str | None:
    for prop in getattr(result, "properties", ()):
        if str(prop.type).lower() == type_ and str(prop.name).lower() == name:
            return str(prop.value).strip().lower().rstrip(".")
    return None
