"""Reading incoming mail (bot/transports/email/parse.py) and a trusted host's
verdict (verify.py): pure functions over raw bytes, so these tests feed them
the hostile mail the issue lists, byte for byte.  The same mail goes through
real servers in test_email_in_listener.py and test_email_in_imap.py."""
from __future__ import annotations

import base64

import pytest

from bot.transports.email.parse import MAX_TEXT, Mail, html_to_text, parse, strip_subject
from bot.transports.email.verify import Trust, verify

COMMANDS = ("status", "launch", "whoami", "help", "cancel", "approve")


def is_command(text: str) -> bool:
    return text.split(maxsplit=1)[0].lower() in COMMANDS if text.strip() else False


def mail(headers: str, body: str | bytes = "status 12\n", **kw: object) -> Mail:
    head = headers.strip("\n").replace("\n", "\r\n").encode("utf-8", "surrogateescape")
    data = body if isinstance(body, bytes) else body.replace("\n", "\r\n").encode()
    return parse(head + b"\r\n\r\n" + data, is_command=is_command, **kw)  # type: ignore[arg-type]


BASIC = "From: Alice <alice@example.org>\nTo: bot@example.org\nSubject: hello\nMessage-ID: <m1@example.org>"


# -- the sender -----------------------------------------------------------------

def test_a_plain_mail_has_its_sender_ids_and_command() -> None:
    m = mail(BASIC + "\nIn-Reply-To: <out.7@bot.example.org>\nReferences: <a@x> <out.7@bot.example.org>\n"
             "Cc: Bob <BOB@Example.ORG>\nDelivered-To: bot+k7qd2m9xw4ab@example.org")
    assert (m.sender, m.sender_problem, m.refused, m.never_answer) == ("alice@example.org", None, None, None)
    assert m.message_id == "m1@example.org"
    assert m.in_reply_to == ("out.7@bot.example.org",) and m.references == ("a@x", "out.7@bot.example.org")
    assert m.recipients == ("bot@example.org", "bob@example.org", "bot+k7qd2m9xw4ab@example.org")
    assert (m.command, m.command_source, m.answer) == ("status 12", "body", "status 12")


# Python's address parser changed within 3.11 (the getaddresses fix for CVE-2023-27043, which
# Debian backports): some malformed Froms read as "no address" rather than two; either way the
# mail has no sender.  The reasons after "|" are the other version's.
@pytest.mark.parametrize("from_lines, problem", [
    ("", "no From header"),
    ("From: alice@example.org\nFrom: mallory@evil.test", "2 From headers"),
    ("From: alice@example.org, mallory@evil.test", "holds 2 addresses"),
    ("From: alice@example.org <mallory@evil.test>", "holds 2 addresses|holds no address"),
    ("From: <alice@example.org>@evil.test", "holds 2 addresses|holds no address"),
    ("From: undisclosed-recipients:;", "holds no address"),
    ('From: "a b"@example.org', "not a plain address"),
    ("From: alice@[127.0.0.1]", "not a plain address|holds no address"),
    ("From: =?utf-8?q?alice=40example.org?=", "not a plain address"),
    ("From: " + "a" * 3000 + "@example.org", "too long"),
])
def test_no_sender_unless_exactly_one_plain_address(from_lines: str, problem: str) -> None:
    m = mail(from_lines + "\nSubject: status 1\nMessage-ID: <x@y>")
    assert m.sender is None and any(p in (m.sender_problem or "") for p in problem.split("|")), m.sender_problem
    assert m.refused and m.refused.startswith("no usable sender")


@pytest.mark.parametrize("value", ['"alice@example.org" <mallory@evil.test>',
                                   '=?utf-8?q?alice=40example=2Eorg?= <mallory@evil.test>',
                                   '"Alice <alice@example.org>" <mallory@evil.test>'])
def test_a_display_name_dressed_as_an_address_is_the_real_addr_spec(value: str) -> None:
    m = mail(f"From: {value}\nSubject: hi")
    assert m.sender == "mallory@evil.test" and m.sender_domain == "evil.test"


def test_the_domain_is_lower_cased_the_local_part_kept() -> None:
    assert mail("From: Alice.Smith@Example.ORG").sender == "Alice.Smith@example.org"


# -- the command ------------------------------------------------------------------

@pytest.mark.parametrize("subject, stripped", [
    ("Re: status 12", "status 12"), ("RE: Fwd: [dev] status 12", "status 12"), ("AW: WG: status 12", "status 12"),
    ("[releases] Re[2]: launch build", "launch build"), ("Fw: SV: VS: whoami", "whoami"), ("  status  ", "status"),
])
def test_subject_prefixes_are_stripped(subject: str, stripped: str) -> None:
    assert strip_subject(subject) == stripped
    m = mail(f"From: alice@example.org\nSubject: {subject}", "not a command\n")
    assert (m.command, m.command_source) == (stripped, "subject")


def test_an_encoded_subject_is_decoded() -> None:
    m = mail("From: alice@example.org\nSubject: =?iso-8859-1?q?Re=3A_status_=E4?=", "")
    assert m.subject == "Re: status ä" and m.command == "status ä"


def test_a_subject_that_is_no_command_leaves_the_first_body_line() -> None:
    body = ("\n\nlaunch build project=foo\nplease and thanks\n\nOn Mon, 1 Jan 2026 at 10:00, Release Bot\n"
            "<bot@example.org> wrote:\n> Build #12 failed\n> launch build\n-- \nAlice\nstatus 99\n")
    m = mail("From: alice@example.org\nSubject: Re: Build #12 failed", body)
    assert (m.command, m.command_source) == ("launch build project=foo", "body")
    assert (m.answer, m.comment) == ("launch build project=foo", "please and thanks")


def test_quotes_above_the_answer_are_skipped_bottom_posting() -> None:
    body = "Am 01.01.2026 um 10:00 schrieb Release Bot <bot@example.org>:\n> Approve release 2.1?\n\nyes\n" \
           "looks fine to me\n> more quote\n\n-- \nsig\n"
    m = mail("From: alice@example.org\nSubject: Re: Release 2.1 ready?", body)
    assert (m.answer, m.comment, m.command) == ("yes", "looks fine to me", None)


@pytest.mark.parametrize("separator", ["-----Original Message-----", "________________________________",
                                       "---------- Forwarded message ---------", "Begin forwarded message:"])
def test_a_full_quote_below_the_reply_is_ignored(separator: str) -> None:
    body = f"no\n{separator}\nFrom: Release Bot\nstatus 1\n"
    m = mail("From: alice@example.org\nSubject: Re: question", body)
    assert (m.answer, m.comment, m.command) == ("no", "", None)


def test_a_reply_that_only_quotes_has_no_command() -> None:
    body = "On Mon, Jan 1, 2026 at 10:00 AM Bot <bot@example.org> wrote:\n" + "> status 12\n" * 50
    m = mail("From: alice@example.org\nSubject: Re: Build #12", body)
    assert (m.command, m.answer) == (None, None)


def test_a_signature_ends_the_text() -> None:
    m = mail("From: alice@example.org\nSubject: x", "\n-- \nstatus 1\n")
    assert (m.command, m.answer) == (None, None)


# -- robustness: bodies -------------------------------------------------------------

def test_html_only_multipart_alternative_is_reduced_to_text() -> None:
    html = ("<html><head><title>status 1</title><style>p{}</style></head><body><script>launch evil</script>"
            "<p>status&nbsp;12 &amp; more</p><blockquote>launch quoted</blockquote><div>second</div></body></html>")
    body = ("--b\nContent-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: base64\n\n"
            + base64.encodebytes(html.encode()).decode() + "--b--\n")
    m = mail("From: alice@example.org\nSubject: hi\nMIME-Version: 1.0\n"
             "Content-Type: multipart/alternative; boundary=b", body)
    assert m.command == "status 12 & more"
    assert "launch" not in m.text and "HTML only" in m.notes
    assert m.comment == "second"


def test_the_plain_part_wins_over_html_and_attachments_are_skipped() -> None:
    body = ("--b\nContent-Type: text/plain; charset=utf-8\nContent-Disposition: attachment; filename=a.txt\n\n"
            "launch evil\n--b\nContent-Type: text/html\n\n<p>whoami</p>\n--b\nContent-Type: text/plain\n\n"
            "status 3\n--b--\n")
    m = mail("From: alice@example.org\nSubject: hi\nContent-Type: multipart/mixed; boundary=b", body)
    assert m.command == "status 3"


def test_quoted_printable_and_base64_bodies_are_decoded() -> None:
    qp = mail("From: alice@example.org\nSubject: x\nContent-Type: text/plain; charset=utf-8\n"
              "Content-Transfer-Encoding: quoted-printable", "status =C3=A4=\n12\n")
    assert qp.command == "status ä12"
    b64 = mail("From: alice@example.org\nSubject: x\nContent-Transfer-Encoding: base64",
               base64.b64encode("launch build\n".encode()).decode() + "\n")
    assert b64.command == "launch build"


@pytest.mark.parametrize("charset, data, expected", [
    ("iso-8859-1", "status caf\xe9\n".encode("latin-1"), "status café"),
    ("windows-1252", b"status \x80\n", "status €"),
    ("utf-8", b"status \xff\xfe broken\n", "status \ufffd\ufffd broken"),
    ("x-no-such-charset", b"status 1\n", "status 1"),
    ("base64", b"status 1\n", "status 1"),          # a codec, but not a text encoding
    ("rot13", b"status 1\n", "status 1"),
    ('"utf-8', b"status 1\n", "status 1"),
])
def test_charsets_known_unknown_and_broken_never_raise(charset: str, data: bytes, expected: str) -> None:
    m = mail(f"From: alice@example.org\nSubject: x\nContent-Type: text/plain; charset={charset}", data)
    assert m.command == expected


def test_broken_base64_and_8bit_headers_do_not_raise() -> None:
    m = mail("From: Al\udcefce <alice@example.org>\nSubject: status \udcff\nContent-Transfer-Encoding: base64",
             b"!!!not base64 at all===\n")
    assert m.sender == "alice@example.org" and m.refused is None


def test_a_10000_line_body_is_bounded_work() -> None:
    body = "".join(f"> quoted line {i}\n" for i in range(10_000)) + "status 1\n"
    m = mail("From: alice@example.org\nSubject: Re: x", body)
    assert m.command is None          # the line after 10,000 quoted ones is past the scan limit
    assert len(m.text) <= MAX_TEXT
    long = mail("From: alice@example.org\nSubject: x", "status 1\n" + "words words words\n" * 10_000)
    assert long.command == "status 1" and len(long.comment) <= 4_000


def test_an_over_size_mail_is_refused_from_its_headers_alone() -> None:
    raw = (BASIC.replace("\n", "\r\n") + "\r\n\r\n").encode() + b"x" * 2_000_000
    m = parse(raw, is_command=is_command)
    assert m.refused == "message too large (over 1000000 bytes)" and m.size == len(raw)
    assert m.sender == "alice@example.org" and m.text == "" and m.command is None
    assert parse(raw, is_command=is_command, max_bytes=3_000_000).refused is None


def test_garbage_never_raises() -> None:
    for raw in (b"", b"\r\n\r\n", b"\x00\xff" * 1000, b"From:\r\n\r\n", b"Content-Type: multipart/mixed\r\n\r\n--",
                b"Content-Type: multipart/mixed; boundary=a\r\n\r\n" + b"--a\r\nContent-Type: multipart/mixed;"
                b" boundary=a\r\n\r\n" * 200):
        assert isinstance(parse(raw, is_command=is_command), Mail)


def test_html_to_text_keeps_no_markup() -> None:
    assert html_to_text("<b>st</b>atus <i>1</i><br>next<script>x</script>") == "status 1\nnext"


# -- loops, auto-replies and bounces --------------------------------------------------

@pytest.mark.parametrize("extra, reason", [
    ("Auto-Submitted: auto-replied", "auto-submitted (auto-replied)"),
    ("Auto-Submitted: auto-generated; owner-email=x@y", "auto-submitted (auto-generated)"),
    ("Precedence: bulk", "Precedence: bulk"), ("Precedence: junk", "Precedence: junk"),
    ("Precedence: list", "Precedence: list"),
    ("X-Autoreply: yes", "auto-reply (x-autoreply)"),
    ("X-Auto-Response-Suppress: All", "auto-reply (x-auto-response-suppress)"),
    ("Return-Path: <>", "bounce (empty Return-Path)"),
    ("Content-Type: multipart/report; report-type=delivery-status; boundary=r",
     "delivery or read report (multipart/report)"),
])
def test_auto_replies_and_bounces_are_never_answered(extra: str, reason: str) -> None:
    m = mail(BASIC + "\n" + extra)
    assert m.never_answer == reason


@pytest.mark.parametrize("sender", ["MAILER-DAEMON@mx.example.org", "postmaster@example.org"])
def test_mail_from_mailer_daemon_or_postmaster_is_a_bounce(sender: str) -> None:
    assert mail(f"From: {sender}\nSubject: Undelivered Mail").never_answer == f"bounce (from {sender.split('@')[0].lower()})"


def test_auto_submitted_no_is_a_person() -> None:
    assert mail(BASIC + "\nAuto-Submitted: no").never_answer is None


def test_the_bots_own_mail_is_never_answered() -> None:
    own = ("bot@example.org",)
    assert mail("From: Bot <BOT@example.org>", own_addresses=own).never_answer == "the bot's own mail (From)"
    assert mail("From: bot+k7qd2m9xw4ab@example.org", own_addresses=own).never_answer == "the bot's own mail (From)"
    m = mail("From: alice@example.org\nMessage-ID: <out.1.2@bot.example.org>", own_id_domains=("bot.example.org",))
    assert m.never_answer == "the bot's own mail (Message-ID)"
    assert mail(BASIC, envelope_from="").never_answer == "bounce (empty envelope sender)"
    assert mail(BASIC, own_addresses=own, own_id_domains=("bot.example.org",)).never_answer is None


def test_two_message_ids_give_no_key() -> None:
    m = mail("From: alice@example.org\nMessage-ID: <a@x>\nMessage-ID: <b@x>")
    assert m.message_id is None


# -- a trusted host's verdict ------------------------------------------------------------

TRUST = Trust.of("mx.example.org", ["example.org"])


def headers_of(raw_headers: str) -> Mail:
    return mail(raw_headers + "\nFrom: alice@example.org\nSubject: status 1")


def test_dmarc_pass_from_the_trusted_host_on_top_verifies() -> None:
    m = headers_of("Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=example.org;\n"
                   " dmarc=pass (p=reject) header.from=example.org")
    v = verify(m.auth_results, m.sender_domain, TRUST)
    assert v.ok and v.how == "dmarc=pass for example.org by mx.example.org"


def test_aligned_dkim_verifies_and_unaligned_does_not() -> None:
    good = headers_of("Authentication-Results: MX.example.org; dkim=pass header.d=example.org header.i=@example.org")
    assert verify(good.auth_results, "example.org", TRUST).how == "dkim=pass (header.d=example.org) by mx.example.org"
    for d in ("evil.test", "mail.example.org", "org"):
        bad = headers_of(f"Authentication-Results: mx.example.org; dkim=pass header.d={d}")
        assert not verify(bad.auth_results, "example.org", TRUST).ok


def test_several_topmost_trusted_headers_count_together() -> None:
    m = headers_of("Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=example.org\n"
                   "Authentication-Results: mx.example.org; dmarc=pass header.from=example.org\n"
                   "Received: from sender.example.org")
    assert verify(m.auth_results, "example.org", TRUST).ok


def test_a_trusted_id_lower_down_is_ignored() -> None:
    below_other = headers_of("Authentication-Results: relay.example.net; none\n"
                             "Authentication-Results: mx.example.org; dmarc=pass header.from=example.org")
    v = verify(below_other.auth_results, "example.org", TRUST)
    assert not v.ok and "topmost Authentication-Results is from 'relay.example.net'" in v.reason
    # the forged one sits below a Received line: the run of the real one is over
    forged = headers_of("Authentication-Results: mx.example.org; dmarc=none header.from=example.org\n"
                        "Received: from evil.test by mx.example.org\n"
                        "Authentication-Results: mx.example.org; dmarc=pass header.from=example.org")
    assert not verify(forged.auth_results, "example.org", TRUST).ok


def test_an_untrusted_host_never_counts() -> None:
    m = headers_of("Authentication-Results: mx.evil.test; dmarc=pass header.from=example.org")
    v = verify(m.auth_results, "example.org", TRUST)
    assert not v.ok and "not from mx.example.org" in v.reason
    assert "no trusted authserv-id" in verify(m.auth_results, "example.org", None).reason


def test_a_domain_the_host_may_not_vouch_for_is_refused() -> None:
    m = headers_of("Authentication-Results: mx.example.org; dmarc=pass header.from=other.example")
    v = verify(m.auth_results, "other.example", TRUST)
    assert not v.ok and v.reason == "mx.example.org may not vouch for other.example"


def test_dmarc_must_be_for_the_from_domain_and_a_fail_vetoes() -> None:
    other = headers_of("Authentication-Results: mx.example.org; dmarc=pass header.from=evil.test")
    assert not verify(other.auth_results, "example.org", TRUST).ok
    veto = headers_of("Authentication-Results: mx.example.org; dkim=pass header.d=example.org;\n"
                      " dmarc=fail header.from=example.org")
    assert verify(veto.auth_results, "example.org", TRUST).reason == "mx.example.org says dmarc=fail for example.org"


def test_unparsable_or_huge_headers_refuse_without_raising() -> None:
    for value in ("mx.example.org; dmarc=", ";;;", "mx.example.org; " + "dkim=pass " * 2000, "\x00\x01"):
        m = headers_of(f"Authentication-Results: {value}")
        assert not verify(m.auth_results, "example.org", TRUST).ok
    assert not verify((), "example.org", TRUST).ok
