from datetime import UTC, datetime, timedelta
from pathlib import Path

from daemon.records import DecideRecord, Decision, Outcome
from journal.history import failures
from journal.logbook import Logbook
from tests.journal.test_logbook import make_record


def test_failures_listed_newest_first(tmp_path: Path):
    logbook = Logbook(tmp_path / "journal")
    logbook.commit_cycle(make_record(1))
    logbook.commit_cycle(make_record(2, Outcome.FAILED, text=""))
    logbook.commit_cycle(make_record(3, Outcome.ABORTED))
    logbook.commit_cycle(make_record(4))
    found = failures(logbook)
    assert [(f.cycle, f.kind) for f in found] == [(3, "aborted"), (2, "failed")]
    assert found[1].domains == ("geography",)
    assert found[1].reason == "1/1 answered"


def test_failures_filtered_by_domain_and_date(tmp_path: Path):
    logbook = Logbook(tmp_path / "journal")
    logbook.commit_cycle(make_record(1, Outcome.DEGRADED))
    assert failures(logbook, domain="code") == []
    assert len(failures(logbook, domain="geography")) == 1
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    assert failures(logbook, since=tomorrow) == []


def test_rejected_adapter_listed(tmp_path: Path):
    from dataclasses import replace

    logbook = Logbook(tmp_path / "journal")
    record = replace(
        make_record(1),
        decide=DecideRecord((Decision("code", "reject", "candidate worse on geography"),), "gate"),
    )
    logbook.commit_cycle(record)
    found = failures(logbook)
    assert [(f.kind, f.domains) for f in found] == [("rejected", ("code", "geography"))]
