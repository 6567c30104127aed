"""Which studies are priors, and what an analysis learns about its comparison."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from engine import priors
from engine.config import ConfigError, check_peers, parse_ai_section
from engine.stores import JobKind, JobState, NewJob
from engine.stores.sqlite import SqliteJobStore
from inference.postprocess import Finding


def facts(**kw) -> priors.StudyFacts:
    base = dict(uid="1.2.3", date="20251001", time="093000", patient_id="P1", issuer="HOSP_A",
                modalities={"DX"}, body_parts={"FOREARM"})
    return priors.StudyFacts(**{**base, **kw})


@pytest.fixture
def search():
    return priors.Search(facts(), since="20151001")


@pytest.mark.parametrize(("candidate", "why"), [
    (dict(uid="1.2.3"), None),  # the current study itself
    (dict(issuer="HOSP_B"), "another issuer of patient ID"),
    (dict(patient_id="P2"), "another patient ID"),
    (dict(date="20251001", time="100000"), "not earlier, or older than MaxAgeDays"),
    (dict(date="20140101"), "not earlier, or older than MaxAgeDays"),
    (dict(date=""), "not earlier, or older than MaxAgeDays"),
    (dict(modalities={"CT"}), "another modality"),
    (dict(body_parts={"LEG"}), "another body part"),
])
def test_what_is_not_a_prior(search, candidate, why):
    assert not search.relevant(facts(**{"uid": "9.9", "date": "20240110", **candidate}),
                               same_body_part=True)
    assert search.excluded == ({why: 1} if why else {})


def test_what_a_pacs_does_not_say_does_not_exclude(search):
    unknown = facts(uid="9.9", date="20240110", issuer="", modalities=set(), body_parts=set())
    assert search.relevant(unknown, same_body_part=True)
    assert search.relevant(facts(uid="9.8", date="20251001", time="080000"), True)  # same day
    assert search.relevant(facts(uid="9.7", date="20240110", body_parts={"LEG"}), False)


def test_sources_and_destinations_must_be_dicom_modalities():
    ai = parse_ai_section({"Priors": {"Sources": ["PACS"]}, "Forward": {"Destinations": ["X"]}})
    with pytest.raises(ConfigError, match="AI.Forward.Destinations: 'X' is not in"):
        check_peers(ai, {"DicomModalities": {"PACS": ["PACS", "127.0.0.1", 104]}})
    check_peers(ai, {"DicomModalities": {"PACS": {}, "X": {}}})
    with pytest.raises(ConfigError, match="Priors.MaxPriors"):
        parse_ai_section({"Priors": {"MaxPriors": 0}})


@pytest.fixture
def ctx():
    store = SqliteJobStore(":memory:")
    config = parse_ai_section({"Priors": {"Sources": ["PACS"], "DeadlineSeconds": 30}})
    return SimpleNamespace(config=config, store=store)


CARD = SimpleNamespace(id="m", version="1", threshold=0.5)


def priors_job(ctx, state: JobState, **finish) -> None:
    job = ctx.store.add(priors.new_priors_job("CUR"))
    if state != JobState.QUEUED:
        ctx.store.claim(job.id, "n/1", 30)
    if state not in (JobState.QUEUED, JobState.RUNNING):
        ctx.store.finish(job.id, state, **finish)


def test_no_priors_configured_or_no_search_means_no_comparison(ctx):
    finding = Finding(0.9, 0.5, None)
    assert priors.comparison_for(ctx, "CUR", CARD, finding) == priors.NOTHING
    off = SimpleNamespace(config=parse_ai_section({}), store=ctx.store)
    priors_job(ctx, JobState.DONE, result={"status": "none"})
    assert priors.comparison_for(off, "CUR", CARD, finding) == priors.NOTHING


def test_a_search_still_running_after_the_deadline_is_pending(ctx):
    priors_job(ctx, JobState.RUNNING)
    ctx.config = parse_ai_section({"Priors": {"Sources": ["PACS"], "DeadlineSeconds": 1}})
    t0 = time.time()
    got = priors.comparison_for(ctx, "CUR", CARD, Finding(0.9, 0.5, None))
    assert time.time() - t0 < 3  # waited for the deadline, not more
    assert got.comparison is None and got.info["state"] == "pending" and got.awaited
    assert "DeadlineSeconds" in got.note and "revised SR follows" in got.note


def test_a_failed_search_says_why(ctx):
    priors_job(ctx, JobState.FAILED, reason="will retry in 10 s: PACS: refused",
               retry_at=time.time() + 10)
    got = priors.comparison_for(ctx, "CUR", CARD, Finding(0.9, 0.5, None))
    assert got.info == {"state": "pending", "reason": "will retry in 10 s: PACS: refused"}
    ctx.store.finish(ctx.store.by_key("priors:CUR").id, JobState.DEAD, reason="gave up")
    got = priors.comparison_for(ctx, "CUR", CARD, Finding(0.9, 0.5, None))
    assert got.info["state"] == "unavailable" and "revised" not in got.note


def test_a_found_prior_is_compared_with_the_same_model_version(ctx):
    priors_job(ctx, JobState.DONE, result={"status": "found", "priors": [
        {"study": "PRI", "study_uid": "1.2.9", "study_date": "20240110", "source": "PACS"}]})
    got = priors.comparison_for(ctx, "CUR", CARD, Finding(0.9, 0.5, None))
    assert got.info["state"] == "none" and "no result of m 1" in got.info["reason"]
    for version, probability in (("0", 0.95), ("1", 0.2), ("1", 0.3)):
        job = ctx.store.add(NewJob(f"i{version}{probability}", "PRI", "S", "m", version))
        ctx.store.finish(job.id, JobState.DONE, result={
            "probability": probability, "threshold": 0.5, "sr_sop_instance_uid": "2.25.1",
            "sr_series_instance_uid": "2.25.2"})
    got = priors.comparison_for(ctx, "CUR", CARD, Finding(0.9, 0.5, None))
    assert got.comparison is not None and got.comparison.change == "new"
    assert got.info["prior_probability"] == 0.3  # the most suspicious of version 1
    assert got.comparison.prior_sr.sop_instance_uid == "2.25.1"
    assert got.comparison.prior_study_uid == "1.2.9"


def test_a_prior_itself_gets_no_comparison(ctx):
    ctx.store.add(NewJob("", "PRI", None, kind=JobKind.RETENTION, key="retention:PRI"))
    assert priors.is_prior(ctx, "PRI") and not priors.is_prior(ctx, "CUR")
    got = priors.comparison_for(ctx, "PRI", CARD, Finding(0.9, 0.5, None))
    assert got.comparison is None and got.info == {"state": "prior"}


def test_a_fetched_prior_is_deleted_when_its_retention_is_due(ctx):
    from engine.ledger import Ledger

    deleted = []
    ctx.source = SimpleNamespace(delete=deleted.append)
    ctx.ledger = Ledger(ctx.store, SimpleNamespace(finished=SimpleNamespace(
        labels=lambda *_: SimpleNamespace(inc=lambda: None))), ctx.config, "n/1", time.time)
    ctx.config = parse_ai_section({"Priors": {"Sources": ["PACS"], "RetentionHours": 1}})
    priors.mark_prior(ctx, "PRI", "PACS", "CUR")
    job = ctx.store.by_key("retention:PRI")
    assert job.state == "queued" and job.not_before == pytest.approx(time.time() + 3600, abs=5)
    assert ctx.store.claim_next("n/1", 30, 3) is None  # not due yet
    priors.mark_prior(ctx, "PRI", "PACS", "CUR2")  # used again later: kept longer
    assert ctx.store.by_key("retention:PRI").not_before >= job.not_before
    ctx.store.requeue(job.id, not_before=time.time() - 1)  # the hour has passed
    due = ctx.store.claim_next("n/1", 30, 3)
    assert due.id == job.id
    priors.run_retention(ctx, due)
    assert deleted == ["/studies/PRI"]
    assert ctx.store.get(job.id).state == "done" and priors.is_prior(ctx, "PRI")
    ctx.config = parse_ai_section({"Priors": {"Sources": ["PACS"], "RetentionHours": 0}})
    priors.mark_prior(ctx, "KEEP", "PACS", "CUR")
    assert ctx.store.by_key("retention:KEEP").state == "done"  # marked, never removed
