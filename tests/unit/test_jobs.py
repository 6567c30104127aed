"""The SQLite job store: idempotent keys, claims, recovery, retry scheduling."""

import threading
import time

import pytest

from plugin.jobs import SqliteJobStore


@pytest.fixture
def store(tmp_path):
    return SqliteJobStore(tmp_path / "jobs.sqlite")


def test_same_key_is_created_once(store):
    a = store.add("i1", study="s", series="r", model="m", version="1")
    assert a is not None and a.state == "queued"
    assert store.add("i1", study="s", series="r", model="m", version="1") is None
    assert store.add("i1", study="s", series="r", model="m", version="2") is not None
    assert len(store.for_instance("i1")) == 2


def test_claims_are_exclusive_across_threads(store):
    for i in range(50):
        store.add(f"i{i}", study=None, series=None, model="m", version="1")
    claimed: list[int] = []
    lock = threading.Lock()

    def worker():
        while (job := store.claim_next()) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == list(range(1, 51))


def test_running_jobs_are_recovered_after_a_crash(tmp_path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    job = store.add("i1", study=None, series=None, model="m", version="1")
    assert store.claim(job.id).state == "running"
    reopened = SqliteJobStore(tmp_path / "jobs.sqlite")  # a new process after kill -9
    assert reopened.recover() == 1
    assert reopened.get(job.id).state == "queued"


def test_failed_with_retry_time_is_claimed_only_when_due(store):
    job = store.claim(store.add("i1", study=None, series=None, model="m", version="1").id)
    store.finish(job.id, "failed", reason="will retry", retry_at=time.time() + 3600)
    assert store.claim_next() is None
    store.finish(job.id, "failed", reason="will retry", retry_at=time.time() - 1)
    again = store.claim_next()
    assert again.id == job.id and again.attempts == 2


def test_permanent_failure_is_never_retried_automatically(store):
    job = store.claim(store.add("i1", study=None, series=None, model="m", version="1").id)
    store.finish(job.id, "failed", reason="pixel data truncated")
    assert store.claim_next() is None
    assert store.requeue(job.id).state == "queued"  # an operator may still retry it


def test_list_filters_and_counts(store):
    store.add("i1", study="s1", series=None, model="a", version="1")
    store.add("i2", study="s2", series=None, model="b", version="1", state="skipped",
              reason="non-image object")
    assert [j.instance for j in store.list(study="s2")] == ["i2"]
    assert [j.instance for j in store.list(model="a")] == ["i1"]
    assert store.counts()["skipped"] == 1 and store.counts()["queued"] == 1
    payload = store.list(state="skipped")[0].as_json()
    assert {"id", "state", "model", "study", "series", "attempts", "reason"} <= set(payload)


def test_inbox_rows_stay_until_acknowledged(store, monkeypatch, tmp_path):
    import plugin.jobs as jobs

    store.add_to_inbox([("instance", "i1", 5), ("series", "s1", 7)], cursor=7)
    assert store.get_value("changes_cursor") == "7"
    first = store.take_from_inbox()
    assert (first.kind, first.resource) == ("instance", "i1")
    second = store.take_from_inbox()
    assert (second.kind, second.resource) == ("series", "s1")
    assert store.take_from_inbox() is None  # both taken, neither acknowledged
    store.ack_inbox(first.row)
    assert store.inbox_size() == 1
    # A crash before the ack: after recovery the row is there again.
    reopened = SqliteJobStore(tmp_path / "jobs.sqlite")
    reopened.recover()
    again = reopened.take_from_inbox()
    assert (again.kind, again.resource) == ("series", "s1")
    # A triage that met a transient error: taken again after INBOX_RETAKE_SECONDS.
    monkeypatch.setattr(jobs, "INBOX_RETAKE_SECONDS", 0.0)
    time.sleep(0.01)
    assert reopened.take_from_inbox().resource == "s1"


def test_pushed_items_are_durable_and_come_first(store, tmp_path):
    store.add_to_inbox([("instance", "i1", 5)], cursor=5)
    store.push_inbox([("reprocess", "i9"), ("series", "s9")])
    reopened = SqliteJobStore(tmp_path / "jobs.sqlite")
    kinds = [(reopened.take_from_inbox().kind) for _ in range(3)]
    assert sorted(kinds[:2]) == ["reprocess", "series"] and kinds[2] == "instance"
    store.push_inbox([("series", "s9")])  # pushed again while taken: available again
    assert reopened.take_from_inbox().resource == "s9"
