"""The JobStore contract (engine/stores/base.py), checked on every store.

Each test gets an empty store; ``clock`` freezes the stores' ``time.time()``
so that leases and back-offs are tested without sleeping.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time

import pytest

from engine.stores import DIED_REASON, InboxKind, JobKind, JobState, NewJob, open_store
from engine.stores.base import INBOX_DONE_KEEP_SECONDS
from inference.errors import TransientError
from tests.harness import free_port

INST, SER = InboxKind.INSTANCE, InboxKind.SERIES


def new(instance: str, model: str = "m", version: str = "1", *, study: str | None = "ST1",
        series: str | None = "SE1", **kwargs) -> NewJob:
    return NewJob(instance, study, series, model, version, **kwargs)


def ids(jobs) -> list[int]:
    return [j.id for j in jobs]


def died(times: int) -> str:
    return f"{DIED_REASON} ({times} time(s)); not retried automatically"


# -- add, get, delete ---------------------------------------------------------

def test_add_creates_a_queued_job(store, clock):
    job = store.add(new("i1", study="st", series="se"))
    assert job is not None
    assert (job.key, job.instance, job.study, job.series, job.model, job.model_version) == \
        ("i1|m|1", "i1", "st", "se", "m", "1")
    assert (job.state, job.reason, job.attempts, job.deaths, job.node, job.result) == \
        ("queued", None, 0, 0, None, None)
    assert job.created == job.updated == clock.now
    assert job.not_before == 0.0
    assert store.get(job.id) == job


def test_a_key_is_unique(store):
    first = store.add(new("i1"))
    assert first is not None
    assert store.add(new("i1")) is None
    assert store.add(new("i1", state=JobState.SKIPPED, reason="other")) is None
    assert store.get(first.id) == first  # untouched by the second add
    second = store.add(new("i1", version="2"))
    assert second is not None and second.id > first.id
    custom = store.add(NewJob("", "st", "se", "vol", "1", key="series:se|vol|1"))
    assert custom is not None and custom.key == "series:se|vol|1" and custom.instance == ""
    assert store.add(NewJob("x", None, None, key="series:se|vol|1")) is None
    assert [j.key for j in store.list()] == ["i1|m|1", "i1|m|2", "series:se|vol|1"]


def test_an_outcome_is_a_job_with_an_empty_model(store):
    job = store.add(NewJob("i1", "st", "se", state=JobState.SKIPPED, reason="not an image"))
    assert job is not None
    assert (job.key, job.model, job.model_version, job.state, job.reason) == \
        ("i1||", "", "", "skipped", "not an image")
    assert store.claim_next("n/1", 30, 3) is None


def test_get_missing_and_delete(store):
    assert store.get(12345) is None
    job = store.add(new("i1"))
    store.delete(job.id)
    assert store.get(job.id) is None
    store.delete(job.id)  # twice is fine
    again = store.add(new("i1"))  # the key is free again
    assert again is not None and again.id > job.id


# -- claims ----------------------------------------------------------------------

def test_claim_takes_a_queued_job_once(store, clock):
    job = store.add(new("i1"))
    clock.advance(2)
    claimed = store.claim(job.id, "node-a/17", 30)
    assert claimed is not None
    assert (claimed.id, claimed.state, claimed.attempts, claimed.node) == \
        (job.id, "running", 1, "node-a")
    assert claimed.updated == clock.now and claimed.created == job.created
    assert store.claim(job.id, "node-b/3", 30) is None
    assert store.claim(999999, "node-b/3", 30) is None
    assert store.get(job.id).node == "node-a"
    store.finish(job.id, JobState.DONE)
    assert store.claim(job.id, "node-b/3", 30) is None


def test_claim_next_takes_the_oldest_due_job(store, clock):
    jobs = [store.add(new(f"i{n}")) for n in range(3)]
    got = [store.claim_next("n/1", 30, 3) for _ in range(3)]
    assert ids(got) == ids(jobs)
    assert [(j.state, j.attempts, j.node) for j in got] == [("running", 1, "n")] * 3
    assert store.claim_next("n/1", 30, 3) is None


def test_failed_with_a_retry_time_is_due_then(store, clock):
    first = store.add(new("i1"))
    assert store.claim_next("a/1", 30, 3).id == first.id
    retry_at = clock.now + 5
    assert store.finish(first.id, JobState.FAILED, reason="Orthanc busy", retry_at=retry_at,
                        owner="a/1")
    failed = store.get(first.id)
    assert (failed.state, failed.reason, failed.not_before, failed.attempts) == \
        ("failed", "Orthanc busy", retry_at, 1)
    assert store.claim_next("a/1", 30, 3) is None  # not due yet
    second = store.add(new("i2"))
    clock.advance(10)
    # Both due: the queued job (not_before 0) comes first, then the retry.
    assert store.claim_next("a/1", 30, 3).id == second.id
    retried = store.claim_next("a/1", 30, 3)
    assert (retried.id, retried.state, retried.attempts, retried.deaths) == \
        (first.id, "running", 2, 0)
    assert retried.not_before == 0.0  # only reported for failed jobs


def test_retry_is_due_exactly_at_its_time(store, clock):
    job = store.add(new("i1"))
    store.claim_next("a/1", 30, 3)
    store.finish(job.id, JobState.FAILED, retry_at=clock.now + 5)
    clock.advance(4.999)
    assert store.claim_next("a/1", 30, 3) is None
    clock.advance(0.001)
    assert store.claim_next("a/1", 30, 3).id == job.id


def test_ended_jobs_are_never_claimed(store, clock):
    for n, state in enumerate((JobState.DONE, JobState.SKIPPED, JobState.FAILED,
                               JobState.DEAD)):
        job = store.add(new(f"i{n}"))
        assert store.finish(job.id, state, reason=state.value)
    clock.advance(10**6)
    assert store.claim_next("a/1", 30, 3) is None
    assert store.counts() == {"queued": 0, "running": 0, "done": 1, "skipped": 1,
                              "failed": 1, "dead": 1}


# -- leases ----------------------------------------------------------------------

def test_an_expired_lease_makes_the_job_due_again(store, clock):
    job = store.add(new("i1"))
    assert store.claim_next("node-a/1", 30, 3).id == job.id
    clock.advance(29)
    assert store.claim_next("node-b/2", 30, 3) is None  # still leased
    clock.advance(2)
    taken = store.claim_next("node-b/2", 30, 3)
    assert (taken.id, taken.state, taken.attempts, taken.deaths, taken.node) == \
        (job.id, "running", 2, 1, "node-b")


def test_deaths_at_max_attempts_end_failed(store, clock):
    job = store.add(new("i1"))
    assert store.claim_next("a/1", 30, 2).id == job.id
    clock.advance(31)
    assert store.claim_next("b/1", 30, 2).id == job.id  # attempt 2, death 1
    clock.advance(31)
    other = store.add(new("i2"))
    assert store.claim_next("c/1", 30, 2).id == other.id  # not the dead one
    dead = store.get(job.id)
    assert (dead.state, dead.reason, dead.attempts, dead.deaths, dead.not_before) == \
        ("failed", died(2), 2, 2, 0.0)
    assert store.claim_next("d/1", 30, 2) is None
    clock.advance(10**5)
    again = store.claim_next("d/1", 30, 2)  # other's lease ran out: 1 attempt < 2
    assert (again.id, again.attempts, again.deaths) == (other.id, 2, 1)
    assert store.get(job.id).state == "failed"
    assert store.counts()["failed"] == 1


def test_a_death_at_max_attempts_is_not_returned(store, clock):
    job = store.add(new("i1"))
    store.claim_next("a/1", 30, 1)
    clock.advance(31)
    assert store.claim_next("b/1", 30, 1) is None
    assert (store.get(job.id).state, store.get(job.id).reason) == ("failed", died(1))


def test_renew_keeps_a_lease_alive(store, clock):
    job = store.add(new("i1"))
    store.add(new("i2"))
    assert store.claim(job.id, "a/1", 30) is not None
    clock.advance(20)
    assert store.renew("a/1", 30) == 1
    assert store.renew("nobody/1", 30) == 0
    clock.advance(20)  # past the first lease, within the renewed one
    assert store.claim_next("b/1", 30, 3).instance == "i2"
    assert store.claim_next("b/1", 30, 3) is None
    clock.advance(11)
    taken = store.claim_next("b/1", 30, 3)
    assert (taken.id, taken.deaths, taken.attempts) == (job.id, 1, 2)
    assert store.renew("a/1", 30) == 0  # not its job any more


def test_renew_extends_inbox_leases(store, clock):
    store.push_inbox([(INST, "a")])
    assert [i.resource for i in store.take_from_inbox("a/1", 10, 30)] == ["a"]
    clock.advance(20)
    store.renew("a/1", 30)
    clock.advance(20)
    assert store.take_from_inbox("b/1", 10, 30) == []
    clock.advance(11)
    taken = store.take_from_inbox("b/1", 10, 30)
    assert [(i.resource, i.attempts) for i in taken] == [("a", 2)]


def test_release_owner_makes_its_jobs_due_at_once(store, clock):
    j1, j2, j3 = (store.add(new(f"i{n}")) for n in range(3))
    store.claim_next("a/1", 300, 3)
    store.claim_next("a/1", 300, 3)
    store.claim_next("keep/1", 300, 3)
    store.push_inbox([(INST, "x"), (INST, "y")])
    store.take_from_inbox("a/1", 1, 300)
    assert store.release_owner("a/1") == 2
    first, second = store.claim_next("b/1", 30, 3), store.claim_next("b/1", 30, 3)
    assert [(j.id, j.attempts, j.deaths, j.node) for j in (first, second)] == \
        [(j1.id, 2, 1, "b"), (j2.id, 2, 1, "b")]
    assert store.claim_next("b/1", 30, 3) is None  # keep/1 still holds j3
    assert store.get(j3.id).node == "keep"
    taken = store.take_from_inbox("b/1", 10, 30)
    assert [(i.resource, i.attempts) for i in taken] == [("x", 2), ("y", 1)]


# -- finish, requeue -------------------------------------------------------------

def test_finish_records_the_outcome(store, clock):
    job = store.add(new("i1"))
    store.claim_next("a/1", 30, 3)
    clock.advance(3)
    result = {"findings": [{"label": "fracture", "p": 0.25}], "sr": "1.2.3", "ü": "ß"}
    assert store.finish(job.id, JobState.DONE, reason="ok", result=result, owner="a/1")
    done = store.get(job.id)
    assert (done.state, done.reason, done.result, done.attempts, done.updated) == \
        ("done", "ok", result, 1, clock.now)
    assert store.renew("a/1", 30) == 0  # the lease went with it
    assert not store.finish(job.id, JobState.FAILED, owner="a/1")  # not running any more
    assert store.finish(job.id, JobState.SKIPPED, reason="operator")  # no owner: always
    assert (store.get(job.id).state, store.get(job.id).result) == ("skipped", None)
    assert not store.finish(999999, JobState.DONE)


def test_finish_with_owner_only_while_it_holds_the_job(store, clock):
    job = store.add(new("i1"))
    store.claim_next("a/1", 30, 3)
    clock.advance(31)
    assert store.claim_next("b/1", 30, 3).id == job.id  # a's lease ran out
    assert not store.finish(job.id, JobState.DONE, result={"from": "a"}, owner="a/1")
    still = store.get(job.id)
    assert (still.state, still.node, still.result) == ("running", "b", None)
    assert store.renew("b/1", 30) == 1  # b still holds it
    assert store.finish(job.id, JobState.DONE, result={"from": "b"}, owner="b/1")
    assert store.get(job.id).result == {"from": "b"}


def test_requeue(store, clock):
    job = store.add(new("i1"))
    store.claim_next("a/1", 30, 1)
    clock.advance(31)
    assert store.claim_next("b/1", 30, 1) is None  # died for good
    assert store.get(job.id).state == "failed"
    clock.advance(1)
    back = store.requeue(job.id)
    assert (back.state, back.attempts, back.deaths, back.not_before, back.updated) == \
        ("queued", 0, 0, 0.0, clock.now)
    assert back.reason == died(1)  # kept: why it failed last time
    running = store.claim_next("b/1", 30, 1)
    assert (running.id, running.attempts) == (job.id, 1)
    assert store.requeue(job.id) is None  # running: not touched
    assert store.get(job.id).state == "running"
    assert store.requeue(999999) is None
    retry = store.add(new("i2"))
    store.finish(retry.id, JobState.FAILED, retry_at=clock.now + 1000)
    assert store.requeue(retry.id).not_before == 0.0
    assert store.claim_next("c/1", 30, 3).id == retry.id  # due at once


# -- queries ---------------------------------------------------------------------

def test_list_filters(store):
    j1 = store.add(new("i1", "a", study="S1", series="A"))
    j2 = store.add(new("i2", "b", study="S1", series="B"))
    j3 = store.add(new("i3", "a", study="S2", series="C"))
    j4 = store.add(new("i1", "b", study="S1", series="A"))
    store.claim(j2.id, "node-x/1", 30)
    store.claim(j3.id, "node-y/7", 30)
    assert ids(store.list()) == [j1.id, j2.id, j3.id, j4.id]
    assert ids(store.list(state="running")) == [j2.id, j3.id]
    assert ids(store.list(state="queued")) == [j1.id, j4.id]
    assert store.list(state="done") == []
    assert ids(store.list(study="S1")) == [j1.id, j2.id, j4.id]
    assert ids(store.list(model="a")) == [j1.id, j3.id]
    assert ids(store.list(instance="i1")) == [j1.id, j4.id]
    assert ids(store.list(series="A")) == [j1.id, j4.id]
    assert ids(store.list(node="node-x")) == [j2.id]
    assert ids(store.list(since_id=j2.id)) == [j3.id, j4.id]
    assert ids(store.list(limit=2)) == [j1.id, j2.id]
    assert ids(store.list(since_id=j1.id, limit=2)) == [j2.id, j3.id]
    assert ids(store.list(limit=2, newest_first=True)) == [j4.id, j3.id]  # the latest
    assert ids(store.list(study="S1", newest_first=True)) == [j4.id, j2.id, j1.id]
    assert ids(store.list(study="S1", model="b")) == [j2.id, j4.id]
    assert ids(store.list(study="S1", state="running", node="node-x")) == [j2.id]
    assert store.list(study="S3") == []
    assert ids(store.for_instance("i1")) == [j1.id, j4.id]
    assert store.for_instance("nothing") == []


def test_kinds_of_jobs(store, clock):
    """Priors, forward and retention jobs share the queue; queries default to analyses."""
    analysis = store.add(new("i1", study="S1"))
    priors = store.add(NewJob("", "S1", None, kind=JobKind.PRIORS, key="priors:S1"))
    forward = store.add(NewJob("sr1", "S1", "SE", "m", "1", kind=JobKind.FORWARD,
                               key="forward:PACS:1.2.3"))
    later = store.add(NewJob("", "S0", None, kind=JobKind.RETENTION, key="retention:S0",
                             not_before=clock.now + 100))
    assert (priors.kind, forward.kind, analysis.kind) == ("priors", "forward", "analysis")
    assert later.not_before == clock.now + 100
    assert ids(store.list()) == [analysis.id]
    assert ids(store.list(kind=None)) == [analysis.id, priors.id, forward.id, later.id]
    assert ids(store.list(kind="forward", instance="sr1")) == [forward.id]
    assert store.counts()["queued"] == 1 and store.counts(kind=None)["queued"] == 4
    assert store.by_key("priors:S1") == priors and store.by_key("nope") is None
    assert store.for_instance("sr1") == []  # a delivery is not an analysis of the SR
    store.add(NewJob("sr1", "S1", "SE", state=JobState.SKIPPED, reason="our own SR"))
    assert store.forget_instance_outcomes("sr1") == 1
    assert store.get(forward.id) is not None  # deliveries are never forgotten
    claimed = [store.claim_next("a/1", 30, 3) for _ in range(4)]
    assert [j.id if j else None for j in claimed] == [analysis.id, priors.id, forward.id, None]
    for job in claimed[:3]:
        store.finish(job.id, JobState.DONE)
    clock.now += 100
    assert store.claim_next("a/1", 30, 3).id == later.id  # due at its time
    store.finish(later.id, JobState.DONE)
    again = store.requeue(later.id, not_before=clock.now + 50)
    assert again.state == "queued" and again.not_before == clock.now + 50


def test_counts(store):
    assert store.counts() == {"queued": 0, "running": 0, "done": 0, "skipped": 0,
                              "failed": 0, "dead": 0}
    for n in range(4):
        store.add(new(f"i{n}"))
    store.add(new("x", state=JobState.SKIPPED))
    store.claim_next("a/1", 30, 3)
    done = store.claim_next("a/1", 30, 3)
    store.finish(done.id, JobState.DONE)
    assert store.counts() == {"queued": 2, "running": 1, "done": 1, "skipped": 1,
                              "failed": 0, "dead": 0}


def test_forget_instance_outcomes(store):
    outcome = store.add(NewJob("i9", "S", "SE", state=JobState.SKIPPED, reason="no rule"))
    probe = store.add(NewJob("i9", "S", "SE", key="i9|probe"))
    store.claim(probe.id, "a/1", 30)  # an outcome being decided: kept
    model_job = store.add(new("i9", "m"))
    store.finish(model_job.id, JobState.DONE)
    other = store.add(NewJob("i10", "S", "SE", state=JobState.SKIPPED))
    assert store.forget_instance_outcomes("i9") == 1
    assert ids(store.for_instance("i9")) == [probe.id, model_job.id]
    assert store.get(other.id) is not None
    assert store.forget_instance_outcomes("i9") == 0
    assert store.get(outcome.id) is None
    assert store.add(NewJob("i9", "S", "SE", state=JobState.SKIPPED)) is not None


# -- inbox -----------------------------------------------------------------------

def test_push_and_take(store, clock):
    assert store.inbox_size() == 0
    assert store.take_from_inbox("a/1", 10, 30) == []
    store.push_inbox([(INST, "a"), (SER, "b"), (INST, "a")])
    store.push_inbox([(INST, "a"), ("instance", "b")])  # kinds as strings too
    assert store.inbox_size() == 3
    items = store.take_from_inbox("a/1", 10, 30)
    assert [(i.kind, i.resource, i.attempts, i.queued_at) for i in items] == \
        [(INST, "a", 1, clock.now), (SER, "b", 1, clock.now), (INST, "b", 1, clock.now)]
    assert len({i.row for i in items}) == 3
    assert store.inbox_size() == 3  # taken is not triaged
    store.push_inbox([])
    store.ack_inbox([])
    store.release_inbox([], 5)
    assert store.inbox_size() == 3


def test_take_oldest_first_with_limit(store, clock):
    for name in ("a", "b", "c"):
        store.push_inbox([(INST, name)])
        clock.advance(1)
    store.push_inbox([(SER, "d"), (INST, "e")])
    first = store.take_from_inbox("a/1", 2, 30)
    assert [i.resource for i in first] == ["a", "b"]
    rest = store.take_from_inbox("b/1", 10, 30)
    assert [i.resource for i in rest] == ["c", "d", "e"]
    assert rest[0].queued_at < rest[1].queued_at == rest[2].queued_at
    assert rest[1].row < rest[2].row


def test_inbox_leases(store, clock):
    store.push_inbox([(INST, "a")])
    [item] = store.take_from_inbox("a/1", 10, 30)
    assert store.take_from_inbox("b/1", 10, 30) == []
    clock.advance(31)
    [again] = store.take_from_inbox("b/1", 10, 30)
    assert (again.row, again.resource, again.attempts) == (item.row, "a", 2)
    store.ack_inbox([again.row])
    assert store.inbox_size() == 0
    clock.advance(100)
    assert store.take_from_inbox("c/1", 10, 30) == []


def test_release_inbox_does_not_count_the_take(store, clock):
    store.push_inbox([(INST, "a"), (INST, "b")])
    items = store.take_from_inbox("a/1", 10, 30)
    store.release_inbox([items[0].row], 10)
    assert store.take_from_inbox("b/1", 10, 30) == []  # released, but after the delay
    clock.advance(10.5)
    [item] = store.take_from_inbox("b/1", 10, 30)
    assert (item.resource, item.attempts) == ("a", 1)
    store.release_inbox([item.row], 0)
    clock.advance(0.001)
    [item] = store.take_from_inbox("c/1", 10, 30)
    assert (item.resource, item.attempts) == ("a", 1)
    clock.advance(31)
    assert [(i.resource, i.attempts) for i in store.take_from_inbox("d/1", 10, 30)] == \
        [("a", 2), ("b", 2)]


def test_a_triaged_row_is_kept_an_hour_against_duplicates(store, clock):
    start = clock.now
    store.push_inbox([(INST, "a")])
    store.ack_inbox([i.row for i in store.take_from_inbox("a/1", 10, 30)])
    assert store.inbox_size() == 0
    clock.advance(10)
    store.push_inbox([(INST, "a")])  # the change log's copy of the callback's event
    store.add_changes([(INST, "a")], 1)
    assert store.inbox_size() == 0
    assert store.take_from_inbox("a/1", 10, 30) == []
    clock.now = start + INBOX_DONE_KEEP_SECONDS - 1
    store.add_changes([], 2)
    store.add_changes([(INST, "a")], 3)
    assert store.inbox_size() == 0  # still remembered
    clock.now = start + INBOX_DONE_KEEP_SECONDS + 1
    store.add_changes([], 4)  # forgets triaged rows older than an hour
    store.add_changes([(INST, "a")], 5)
    assert store.inbox_size() == 1
    [item] = store.take_from_inbox("a/1", 10, 30)
    assert (item.resource, item.attempts, item.queued_at) == ("a", 1, clock.now)


def test_old_untriaged_rows_are_kept(store, clock):
    store.push_inbox([(INST, "a")])
    clock.advance(INBOX_DONE_KEEP_SECONDS * 10)
    store.add_changes([], 1)
    assert store.inbox_size() == 1


def test_push_again_reopens(store, clock):
    store.push_inbox([(INST, "a"), (INST, "b")])
    taken = store.take_from_inbox("a/1", 10, 30)
    store.ack_inbox([taken[0].row])
    clock.advance(5)
    store.push_inbox([(INST, "a"), (INST, "b")], again=True)  # b: re-opened while still taken
    assert store.inbox_size() == 2
    items = store.take_from_inbox("b/1", 10, 30)
    assert [(i.resource, i.attempts, i.queued_at, i.row) for i in items] == \
        [("a", 1, clock.now, taken[0].row), ("b", 1, clock.now, taken[1].row)]
    store.push_inbox([(SER, "a")], again=True)  # a new row, like a plain push
    assert store.inbox_size() == 3


def test_ack(store):
    store.push_inbox([(INST, "a"), (INST, "b"), (INST, "c")])
    items = store.take_from_inbox("a/1", 10, 30)
    store.ack_inbox([items[0].row, items[2].row])
    assert store.inbox_size() == 1
    assert store.renew("a/1", 30) == 0  # renew counts jobs only
    store.release_owner("a/1")
    assert [i.resource for i in store.take_from_inbox("b/1", 10, 30)] == ["b"]


def test_add_changes_queues_and_moves_the_cursor_forward(store, clock):
    assert store.get_value("changes_cursor") is None
    store.add_changes([], 9)
    assert store.get_value("changes_cursor") == "9"
    store.add_changes([(INST, "x"), (SER, "y"), (INST, "x")], 10)
    assert store.get_value("changes_cursor") == "10"  # 10 > 9 as numbers, not strings
    assert store.inbox_size() == 2
    store.push_inbox([(INST, "z")])
    store.add_changes([(INST, "z"), (INST, "w")], 5)  # an older poll, late: cursor stays
    assert store.get_value("changes_cursor") == "10"
    assert store.inbox_size() == 4
    store.add_changes([], 100)
    assert store.get_value("changes_cursor") == "100"
    items = store.take_from_inbox("a/1", 10, 30)
    assert [(i.kind, i.resource) for i in items] == \
        [(INST, "x"), (SER, "y"), (INST, "z"), (INST, "w")]


def test_values(store):
    assert store.get_value("k") is None
    store.set_value("k", "1")
    store.set_value("other", "x")
    store.set_value("k", "two")
    assert (store.get_value("k"), store.get_value("other")) == ("two", "x")


# -- several nodes, threads and processes -------------------------------------------

def test_another_node_sees_the_same_store(store, open_another, clock):
    job = store.add(new("i1"))
    store.push_inbox([(INST, "a")])
    node_b = open_another()
    assert node_b.get(job.id) == job
    assert node_b.inbox_size() == 1
    assert node_b.claim_next("b/1", 30, 3).id == job.id
    assert store.get(job.id).node == "b"
    assert store.claim_next("a/1", 30, 3) is None


CLAIMS = 200


def _claim_all(store, owner: str) -> list[int]:
    got = []
    while (job := store.claim_next(owner, 300, 3)) is not None:
        got.append(job.id)
        time.sleep(0.001)  # some work, so that the claimers overlap
    return got


def test_threads_never_claim_the_same_job(store):
    added = [store.add(new(f"i{n}")).id for n in range(CLAIMS)]
    barrier = threading.Barrier(4)
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            barrier.wait(30)
            results[n] = _claim_all(store, f"node/{n}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            store.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    claimed = [i for got in results.values() for i in got]
    assert sorted(claimed) == sorted(added)  # every job, each once
    assert sum(1 for got in results.values() if got) >= 2
    assert store.counts()["running"] == CLAIMS
    assert {j.attempts for j in store.list(limit=CLAIMS)} == {1}
    owners = {j.id: j.node for j in store.list(limit=CLAIMS)}
    assert owners == {i: "node" for i in claimed}


def _claim_in_process(location: str, owner: str, ready, go, out) -> None:
    try:
        store = open_store(location)
        ready.put(owner)
        go.wait(60)
        out.put((owner, _claim_all(store, owner)))
        store.close()
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        out.put((owner, repr(e)))


def test_processes_never_claim_the_same_job(store, store_location):
    added = [store.add(new(f"i{n}")).id for n in range(CLAIMS)]
    ctx = multiprocessing.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_claim_in_process, args=(store_location, f"p{n}/1", ready,
                                                         go, out)) for n in range(2)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=120)
        go.set()
        results = dict(out.get(timeout=120) for _ in procs)
    except queue.Empty:
        pytest.fail("a claiming process did not answer")
    finally:
        for p in procs:
            p.join(30)
    for owner, got in results.items():
        assert isinstance(got, list), f"{owner}: {got}"
    claimed = [i for got in results.values() for i in got]
    assert sorted(claimed) == sorted(added)
    assert all(results.values()), {o: len(g) for o, g in results.items()}  # both claimed
    assert store.counts()["running"] == CLAIMS
    assert {j.attempts for j in store.list(limit=CLAIMS)} == {1}


# -- PostgreSQL only ---------------------------------------------------------------

def test_pg_url_has_no_password_and_a_broken_connection_is_transient(postgres_server, pg_url):
    secret = "s3cret-Pa55"
    with_password = pg_url.replace("postgres@", f"postgres:{secret}@")
    store = open_store(with_password + "?application_name=t&password=" + secret)
    assert secret not in store.url
    assert store.url == pg_url + "?application_name=t"
    job = store.add(new("i1"))
    assert postgres_server.terminate_sessions(pg_url.rsplit("/", 1)[1]) >= 1
    with pytest.raises(TransientError) as caught:
        store.get(job.id)
    assert secret not in str(caught.value) and secret not in caught.value.reason
    assert store.url in caught.value.reason
    assert store.get(job.id) == job  # connected again
    store.close()


def test_pg_survives_a_server_restart(postgres_server, pg_url):
    store = open_store(pg_url)
    job = store.add(new("i1"))
    postgres_server.restart()
    with pytest.raises(TransientError):
        store.claim_next("a/1", 30, 3)
    assert store.claim_next("a/1", 30, 3).id == job.id
    store.close()


def test_pg_unreachable_server_is_transient():
    url = f"postgresql://u:hunter2-pw@127.0.0.1:{free_port()}/db"
    with pytest.raises(TransientError) as caught:
        open_store(url, connect_timeout=2)
    assert "hunter2-pw" not in caught.value.reason
    assert "postgresql://u@127.0.0.1:" in caught.value.reason


def test_pg_fast_enqueue_does_not_wait_for_the_disk(pg_url):
    fast = open_store(pg_url, fast_enqueue=True)
    plain = open_store(pg_url)
    fast.push_inbox([(INST, "a")])
    assert plain.inbox_size() == 1

    def setting(store) -> str:
        return store._conn().execute("SHOW synchronous_commit").fetchone()["synchronous_commit"]

    assert (setting(fast), setting(plain)) == ("off", "on")
    fast.close()
    plain.close()


def test_pg_nodes_starting_together_create_the_schema_once(pg_url):
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []
    stores = []

    def start() -> None:
        try:
            barrier.wait(30)
            store = open_store(pg_url)
            stores.append(store)
            store.close()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(stores) == 6
    assert stores[0].add(new("i1")) is not None
    assert stores[1].add(new("i1")) is None
    stores[0].close()
    stores[1].close()


def test_pg_claims_skip_locked_rows_without_waiting(postgres_server, pg_url):
    store = open_store(pg_url, busy_timeout=2)
    first, second = store.add(new("i1")), store.add(new("i2"))
    store.push_inbox([(INST, "a"), (INST, "b")])
    with postgres_server.connect(pg_url.rsplit("/", 1)[1]) as other:
        other.autocommit = False  # another node, in the middle of its claim
        other.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (first.id,))
        other.execute("SELECT 1 FROM inbox WHERE resource = 'a' FOR UPDATE")
        started = time.monotonic()
        assert store.claim(first.id, "a/1", 30) is None
        assert store.claim_next("a/1", 30, 3).id == second.id
        assert store.claim_next("a/1", 30, 3) is None
        assert [i.resource for i in store.take_from_inbox("a/1", 10, 30)] == ["b"]
        assert time.monotonic() - started < 1.0
        other.rollback()
    assert store.claim_next("a/1", 30, 3).id == first.id
    assert [i.resource for i in store.take_from_inbox("a/1", 10, 30)] == ["a"]
    store.close()


def test_mark_triaged_makes_later_events_no_work(store, clock):
    store.mark_triaged([(INST, "our-sr")])
    store.push_inbox([(INST, "our-sr")])  # the callback's event for our own SR
    store.add_changes([(INST, "our-sr")], 7)  # and its change-log twin
    assert store.inbox_size() == 0 and store.take_from_inbox("a/1", 10, 30) == []
    store.push_inbox([(INST, "pending")])
    store.mark_triaged([(INST, "pending")])  # an event that came first is closed too
    assert store.inbox_size() == 0
    store.push_inbox([(INST, "our-sr")], again=True)  # an operator's reprocess re-opens
    assert [i.resource for i in store.take_from_inbox("a/1", 10, 30)] == ["our-sr"]


def test_a_series_event_reopens_its_row_and_a_stale_ack_is_ignored(store, clock):
    SERIES = InboxKind.SERIES
    store.push_inbox([(SERIES, "s")])
    [item] = store.take_from_inbox("a/1", 10, 30)
    store.ack_inbox([item.row], "a/1")
    store.add_changes([(SERIES, "s")], 3)  # stable again (late slices): to do again
    [again] = store.take_from_inbox("a/1", 10, 30)
    store.push_inbox([(SERIES, "s")], again=True)  # while a/1 triages it, it changes again
    store.ack_inbox([again.row], "a/1")  # a/1's ack is for the old version
    [latest] = store.take_from_inbox("b/1", 10, 30)
    assert latest.row == item.row and latest.attempts == 1
    store.ack_inbox([latest.row], "b/1")
    assert store.inbox_size() == 0
    store.add_changes([(INST, "i")], 4)
    [i] = store.take_from_inbox("a/1", 10, 30)
    store.ack_inbox([i.row], "a/1")
    store.add_changes([(INST, "i")], 5)  # an instance's replayed change stays done
    assert store.inbox_size() == 0


def test_release_node_frees_what_a_restarted_nodes_former_workers_held(store, clock):
    mine = [store.add(NewJob(f"i{k}", None, None, model="m", version="1")) for k in range(3)]
    store.claim(mine[0].id, "node-a/11", 30)
    store.claim(mine[1].id, "node-a/12", 30)
    store.claim(mine[2].id, "node-ab/13", 30)  # another node whose name starts alike
    store.push_inbox([(INST, "x"), (INST, "y")])
    store.take_from_inbox("node-a/11", 1, 30)
    store.take_from_inbox("node-ab/13", 1, 30)
    assert store.release_node("node-a") == 2
    due = {store.claim_next("node-a/20", 30, 3).instance for _ in range(2)}
    assert due == {"i0", "i1"} and store.claim_next("node-a/20", 30, 3) is None
    assert [i.resource for i in store.take_from_inbox("node-a/20", 10, 30)] == ["x"]


def test_deaths_of_a_retrying_delivery_count_deaths_not_retries(store, clock):
    """A forward job that retried while its destination was down is not failed
    for good by one worker death; three deaths in a row do fail it."""
    job = store.add(NewJob("sr", "S", "SE", kind=JobKind.FORWARD, key="forward:P:1.2"))
    for _ in range(3):  # three attempts that met a down destination
        store.claim_next("a/1", 30, 3)
        store.finish(job.id, JobState.FAILED, retry_at=clock.now, reason="down")
    assert store.claim_next("a/1", 30, 3).id == job.id  # the fourth attempt ...
    for deaths in range(1, 3):  # ... and its worker dies, twice: taken again
        clock.now += 31
        again = store.claim_next("b/2", 30, 3)
        assert again.id == job.id and again.deaths == deaths
    clock.now += 31
    assert store.claim_next("c/3", 30, 3) is None  # the third death ends it
    assert store.get(job.id).state == "failed" and store.get(job.id).reason == died(3)
