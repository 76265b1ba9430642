"""The decide phase's retraining policy: streaks, schedule, requests, one at a time."""

from __future__ import annotations

from daemon.config import RetrainConfig
from daemon.phases import decide_phase
from daemon.records import PlannedTask, PlanRecord, Score, ScoreRecord
from daemon.state import DecisionRow

PLAN = PlanRecord(
    tasks=(PlannedTask("g1", "geography"), PlannedTask("s1", "science")),
    skipped_not_due=0,
    reason="test",
)
POLICY = RetrainConfig(regressed_cycles=3)


def scores(*fallen: str) -> ScoreRecord:
    return ScoreRecord(
        evaluators=("coherence",),
        scores=tuple(
            Score(
                "coherence",
                0.5,
                "ratio",
                "coherence",
                domain=domain,
                baseline={"verdict": "worse", "mean": 0.9},
            )
            for domain in fallen
        ),
    )


def row(domain: str, regressed: bool, action: str = "keep", comparable: bool = True):
    return DecisionRow(domain, action, regressed, comparable, "")


def actions(record) -> dict[str, str]:
    return {decision.domain: decision.action for decision in record.decisions}


def test_no_regression_keeps():
    record, rows = decide_phase(PLAN, scores(), POLICY, lambda d: [])

    assert actions(record) == {"geography": "keep", "science": "keep"}
    assert [r.regressed for r in rows] == [False, False]


def test_streak_of_three_retrains():
    history = {"geography": [row("geography", True), row("geography", True)]}
    record, _ = decide_phase(PLAN, scores("geography"), POLICY, lambda d: history.get(d, []))

    assert actions(record)["geography"] == "retrain"
    reason = next(d.reason for d in record.decisions if d.domain == "geography")
    assert "3 consecutive cycles" in reason


def test_streak_broken_by_good_cycle():
    history = [row("geography", True), row("geography", False), row("geography", True)]
    record, _ = decide_phase(PLAN, scores("geography"), POLICY, lambda d: history)

    assert actions(record)["geography"] == "keep"


def test_partial_cycles_do_not_count_or_break():
    history = [
        row("geography", False, comparable=False),
        row("geography", True),
        row("geography", True),
    ]
    record, _ = decide_phase(PLAN, scores("geography"), POLICY, lambda d: history)

    assert actions(record)["geography"] == "retrain"


def test_streak_restarts_after_retrain():
    history = [row("geography", True), row("geography", True, action="retrain")]
    record, _ = decide_phase(PLAN, scores("geography"), POLICY, lambda d: history)

    assert actions(record)["geography"] == "keep"


def test_one_domain_trains_per_cycle():
    history = [row("x", True), row("x", True)]
    record, _ = decide_phase(PLAN, scores("geography", "science"), POLICY, lambda d: history)

    assert sorted(actions(record).values()) == ["keep", "retrain"]
    deferred = next(d for d in record.decisions if d.action == "keep")
    assert "deferred" in deferred.reason


def test_request_wins_and_works_when_disabled():
    history = [row("x", True), row("x", True)]
    disabled = RetrainConfig(enabled=False)
    record, _ = decide_phase(
        PLAN, scores("geography"), disabled, lambda d: history, requested=("science",)
    )

    assert actions(record) == {"geography": "keep", "science": "retrain"}
    assert next(d.reason for d in record.decisions if d.domain == "science") == (
        "requested by the owner"
    )


def test_schedule_every_n_cycles():
    policy = RetrainConfig(every_cycles=3)
    due = [
        row("geography", False),
        row("geography", False),
        row("geography", False, action="retrain"),
    ]
    not_due = [row("geography", False, action="retrain")]

    record, _ = decide_phase(PLAN, scores(), policy, lambda d: due if d == "geography" else [])
    assert actions(record)["geography"] == "retrain"
    record, _ = decide_phase(PLAN, scores(), policy, lambda d: not_due if d == "geography" else [])
    assert actions(record)["geography"] == "keep"


def test_partial_cycle_regressions_ignored():
    history = [row("geography", True), row("geography", True)]
    record, rows = decide_phase(
        PLAN, scores("geography"), POLICY, lambda d: history, comparable=False
    )

    assert actions(record)["geography"] == "keep"
    assert not rows[0].comparable
