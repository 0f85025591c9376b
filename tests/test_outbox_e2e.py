"""The outbox in the deployed bot (real ``run_bot.py``), delivering mail to a
real SMTP server (aiosmtpd on 127.0.0.1): mail queued while the server is
down arrives once it is back; a refused recipient fails with the server's
words; and a bot SIGKILLed between a commit and its delivery, or in the
middle of a batch, delivers every message after a restart, with repeats
within the stated bound (per destination, the one message in flight),
counted by Message-ID on the receiving side."""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from tests.botproc import Bot, make_home
from tests.serverkit.smtp import SmtpSink

NOTE = """
name: note
inputs: {n: int}
steps:
  - participant: notify
    params:
      to: ["email:team@example.org"]
      message: "note {{ n }}"
      subject: "note {{ n }}"
"""
FANOUT = """
name: fanout
inputs: {n: int}
steps:
  - participant: notify
    params:
      to: ["email:a@example.org", "email:b@example.org", "email:c@example.org"]
      message: "fanout {{ n }}"
"""
BOUNCE = """
name: bounce
steps:
  - participant: notify
    params: {to: ["email:nobody@refused.test"], message: "to nobody"}
"""


def home(tmp_path: Path, sink: SmtpSink) -> Path:
    return make_home(tmp_path, {"note": NOTE, "fanout": FANOUT, "bounce": BOUNCE}, bot_extra=f"""
        outbox: {{retry_min: 0.2s, retry_max: 1s}}
        networks:
          - protocol: email
            name: mail
            smtp_host: 127.0.0.1
            smtp_port: {sink.port}
            security: plaintext
            from: "Release Bot <bot@example.org>"
            idle_timeout: 1s
    """)


def wait_until(check, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def drain(bot: Bot) -> None:
    """Forget the replies to commands sent without waiting."""
    while not bot.lines.empty():
        bot.lines.get_nowait()


def notes(sink: SmtpSink) -> Counter[str]:
    """Message-ID -> how many times it arrived."""
    return Counter(r.message_id for r in list(sink.received))


@pytest.fixture
def sink(smtp_sinks):  # type: ignore[no-untyped-def]
    return smtp_sinks()


def test_mail_waits_while_the_server_is_down_and_arrives_once(tmp_path: Path, sink: SmtpSink) -> None:
    bot = Bot(home(tmp_path, sink)).start()
    try:
        sink.stop()
        for n in range(5):
            bot.send(f"launch note n={n}")
        wait_until(lambda: bot.db().execute("SELECT COUNT(*) FROM outbox_messages WHERE attempts > 0").fetchone()[0] >= 1)
        assert bot.db().execute("SELECT COUNT(*) FROM outbox_messages WHERE state = 'queued'").fetchone()[0] == 5
        sink.start()
        got = sink.wait_for(5, timeout=15)
        assert sorted(r.message["Subject"] for r in got) == [f"note {n}" for n in range(5)]
        assert [r.message["Subject"] for r in got] == [f"note {n}" for n in range(5)]     # in order
        assert set(notes(sink).values()) == {1}
        bot.send("launch bounce")
        wait_until(lambda: bot.db().execute("SELECT COUNT(*) FROM outbox_messages WHERE state = 'failed'")
                   .fetchone()[0] == 1)
        time.sleep(0.3)
        drain(bot)
        lines = bot.ask("outbox failed")
        assert len(lines) == 1 and "550 5.1.1 no such user" in lines[0] and "to nobody" in lines[0], lines
        summary = bot.ask("outbox")
        assert summary[0] == "mail: 0 queued, 1 failed, 5 delivered", summary
    finally:
        assert bot.stop() == 0


def test_sigkill_between_commit_and_delivery_loses_nothing(tmp_path: Path, sink: SmtpSink) -> None:
    bot = Bot(home(tmp_path, sink)).start()
    sink.stop()
    for n in range(3):
        bot.send(f"launch note n={n}")
    wait_until(lambda: bot.db().execute("SELECT COUNT(*) FROM outbox_messages").fetchone()[0] == 3)
    bot.kill()                                   # committed, never delivered
    sink.start()
    bot = Bot(bot.home).start()
    try:
        sink.wait_for(3, timeout=15)
        time.sleep(0.5)
        assert sorted(notes(sink).values()) == [1, 1, 1]
    finally:
        assert bot.stop() == 0


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_batch_repeats_at_most_the_messages_in_flight(tmp_path: Path) -> None:
    sink = SmtpSink(data_delay=0.03).start()
    try:
        bot = Bot(home(tmp_path, sink)).start()
        total = 20
        for n in range(total):
            bot.send(f"launch fanout n={n}")         # 3 destinations each: 60 mails
        sink.wait_for(15, timeout=20)
        bot.kill()
        at_kill = len(sink.received)
        assert at_kill < 3 * total, "the batch finished before the kill: nothing tested"
        bot = Bot(bot.home).start()
        try:
            wait_until(lambda: len(notes(sink)) == 3 * total, timeout=30)
            time.sleep(0.5)
            counts = notes(sink)
            repeats = sum(c - 1 for c in counts.values())
            # the bound: per destination, the message in flight when the bot died (3 destinations)
            assert repeats <= 3, counts.most_common(5)
            for dest in ("a@example.org", "b@example.org", "c@example.org"):
                order = [r.message["Subject"] for r in sink.received if r.rcpt_tos == (dest,)]
                first_seen = list(dict.fromkeys(order))
                assert first_seen == sorted(first_seen, key=lambda s: int(s.split()[-1])), first_seen
            assert bot.db().execute("SELECT COUNT(*) FROM outbox_messages WHERE state != 'delivered'"
                                    ).fetchone()[0] == 0
        finally:
            assert bot.stop() == 0
    finally:
        sink.cleanup()
