"""Prior studies: found by C-FIND, fetched by C-MOVE (or C-GET), compared with the current one.

A study's first analysis job brings a *priors job* (``priors:<study>``). It
runs before the analyses of its batch and is bounded by
``AI.Priors.DeadlineSeconds`` from the study's first job:

1. The current study's patient (PatientID, IssuerOfPatientID), date,
   modalities and body parts come from Orthanc's index.
2. Orthanc's own studies and each ``AI.Priors.Sources`` PACS (C-FIND, Study
   Root, STUDY level) are asked for earlier studies of that patient with
   the same modality, within ``MaxAgeDays``. Answers are checked here too
   (a PACS may ignore a matching key): another issuer, a later date, another
   modality or (``SameBodyPart``) another body part is not a prior.
3. The ``MaxPriors`` most recent are used where they are, or retrieved.
   Before a retrieval the study is marked (a *retention job*): what arrives
   is analysed for the comparison, never treated as a current study (no
   priors of its own, no forwarding), and is deleted from Orthanc after
   ``RetentionHours``.
4. The priors are analysed at once, by the same model versions (jobs that
   exist are reused: our SR of a prior is not made twice).

Each analysis of the current study then compares its finding with the
prior's (:mod:`inference.interval`). A result is never held back past the
deadline: its SR then says why there is no comparison, and once the
priors job succeeds (a retry, after the PACS came back) every such SR is
revised: a new SR that names the first one as its predecessor.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage

from inference.errors import SkipInput, TransientError
from inference.interval import Comparison, PriorFinding, PriorReference, compare
from inference.postprocess import Finding, Region

from .dimse import OrthancDimse, PeerError
from .source import InstanceGone, orthanc_study_id
from .stores import Job, JobKind, JobState, NewJob
from .stores.base import iso

if TYPE_CHECKING:
    from collections.abc import Callable

    from .context import Context

log = logging.getLogger("orthanc_ai")

NOT_IMAGES = frozenset({"SR", "PR", "KO", "DOC", "SEG", "REG", "RWV", "PLAN", "AU", "ECG"})
WILDCARDS = ("*", "?", "\\")


def priors_key(study: str) -> str:
    return f"priors:{study}"


def retention_key(study: str) -> str:
    return f"retention:{study}"


def enabled(ctx: Context) -> bool:
    return bool(ctx.config.priors.sources)


def is_prior(ctx: Context, study: str | None) -> bool:
    """Whether ``study`` was fetched only to be compared with another."""
    return bool(study) and ctx.store.by_key(retention_key(study or "")) is not None


def arrived_as_prior(ctx: Context, metadata: dict[str, str]) -> bool:
    """Whether an instance came the way priors come: a C-STORE from a priors
    source (its C-MOVE), or our own upload of what a C-GET brought."""
    p = ctx.config.priors
    origin = metadata.get("Origin", "")
    if origin == "DicomProtocol":
        return metadata.get("RemoteAET", "") in {ctx.dimse.peer_aet(s) for s in p.sources}
    return origin == "RestApi" and "C-GET" in p.retrieve_method.values()


def unmark_prior(ctx: Context, study: str) -> None:
    """The study is a current study after all (sent by a modality): no longer a prior."""
    job = ctx.store.by_key(retention_key(study))
    if job is not None and job.state != JobState.RUNNING:
        ctx.store.delete(job.id)
        log.warning("orthanc-ai: study %s, fetched as a prior, was then sent as a current "
                    "study: it is one now", study)


def new_priors_job(study: str) -> NewJob:
    return NewJob("", study, None, kind=JobKind.PRIORS, key=priors_key(study))


# -- what the studies are --------------------------------------------------------

@dataclass
class StudyFacts:
    uid: str
    date: str  # DA
    time: str  # TM, may be ""
    patient_id: str
    issuer: str
    modalities: set[str]
    body_parts: set[str]
    source: str = "local"  # or the PACS it was found on
    local_id: str | None = None

    @property
    def when(self) -> tuple[str, str]:
        return self.date, (self.time or "").split(".")[0].ljust(6, "0")[:6]


def _series_facts(series: list[dict[str, Any]]) -> tuple[set[str], set[str]]:
    modalities, parts = set(), set()
    for s in series:
        tags = s.get("MainDicomTags", {})
        if tags.get("Modality"):
            modalities.add(str(tags["Modality"]).strip().upper())
        if tags.get("BodyPartExamined"):
            parts.add(str(tags["BodyPartExamined"]).strip().upper())
    return modalities - NOT_IMAGES, parts


def _issuer(ctx: Context, study: dict[str, Any]) -> str:
    """IssuerOfPatientID of one of the study's instances ("" when none)."""
    for series_id in study.get("Series", [])[:1]:
        series = ctx.source.get_json(f"/series/{series_id}")
        for instance in series.get("Instances", [])[:1]:
            status, value = ctx.source.call("GET", f"/instances/{instance}/content/0010,0021")
            if status == 200 and isinstance(value, str):
                return value.strip("\x00 ").strip()
    return ""


def local_study(ctx: Context, study_id: str) -> StudyFacts:
    study = ctx.source.get_json(f"/studies/{study_id}")
    tags = study.get("MainDicomTags", {})
    modalities, parts = _series_facts(ctx.source.get_json(f"/studies/{study_id}/series"))
    return StudyFacts(
        uid=str(tags.get("StudyInstanceUID", "")),
        date=str(tags.get("StudyDate", "")).strip(),
        time=str(tags.get("StudyTime", "")).strip(),
        patient_id=str(study.get("PatientMainDicomTags", {}).get("PatientID", "")),
        issuer=_issuer(ctx, study),
        modalities=modalities,
        body_parts=parts,
        local_id=study_id,
    )


def _date(value: str) -> dt.date | None:
    try:
        return dt.datetime.strptime(value[:8], "%Y%m%d").date()
    except ValueError:
        return None


# -- the search ------------------------------------------------------------------

@dataclass
class Search:
    current: StudyFacts
    since: str  # DA: the oldest date within MaxAgeDays
    excluded: dict[str, int] = field(default_factory=dict)

    def exclude(self, why: str) -> None:
        self.excluded[why] = self.excluded.get(why, 0) + 1

    def relevant(self, c: StudyFacts, same_body_part: bool) -> bool:
        cur = self.current
        if c.uid == cur.uid or not c.uid:
            return False
        if cur.issuer and c.issuer and c.issuer != cur.issuer:
            self.exclude("another issuer of patient ID")
            return False
        if c.patient_id and c.patient_id != cur.patient_id:
            self.exclude("another patient ID")
            return False
        if not c.date or c.when >= cur.when or c.date < self.since:
            self.exclude("not earlier, or older than MaxAgeDays")
            return False
        if c.modalities and not c.modalities & cur.modalities:
            self.exclude("another modality")
            return False
        if same_body_part and cur.body_parts and c.body_parts \
                and not c.body_parts & cur.body_parts:
            self.exclude("another body part")
            return False
        return True


def _facts(answer: dict[str, str], source: str) -> StudyFacts:
    mods = {m.strip().upper() for m in answer.get("ModalitiesInStudy", "").split("\\")
            if m.strip()}
    return StudyFacts(uid=answer.get("StudyInstanceUID", "").strip(),
                      date=answer.get("StudyDate", "").strip(),
                      time=answer.get("StudyTime", "").strip(),
                      patient_id=answer.get("PatientID", "").strip(),
                      issuer=answer.get("IssuerOfPatientID", "").strip(),
                      modalities=mods - NOT_IMAGES, body_parts=set(), source=source)


def _local_candidates(ctx: Context, search: Search) -> list[StudyFacts]:
    cur = search.current
    found = ctx.source.call("POST", "/tools/find", {
        "Level": "Study", "Expand": True,
        "Query": {"PatientID": cur.patient_id, "StudyDate": f"{search.since}-{cur.date}"}})
    status, studies = found
    if status >= 400 or not isinstance(studies, list):
        raise TransientError(f"Orthanc's own index could not be searched (HTTP {status})")
    out = []
    for s in studies:
        if s.get("ID") == cur.local_id:
            continue
        try:
            out.append(local_study(ctx, s["ID"]))
        except InstanceGone:
            continue
    return out


def _remote_candidates(dimse: OrthancDimse, peer: str, search: Search,
                       timeout: float) -> list[StudyFacts]:
    cur = search.current
    query = {"PatientID": cur.patient_id, "StudyDate": f"{search.since}-{cur.date}",
             "ModalitiesInStudy": "\\".join(sorted(cur.modalities)),
             "StudyInstanceUID": "", "StudyTime": "", "AccessionNumber": "",
             "StudyDescription": "", "NumberOfStudyRelatedInstances": ""}
    # Matched where the study has one (another issuer: another patient); else
    # returned, so that what the PACS says can be checked here.
    query["IssuerOfPatientID"] = cur.issuer
    return [_facts(a, peer) for a in dimse.find(peer, "Study", query, timeout)]


def _body_parts(dimse: OrthancDimse, c: StudyFacts, timeout: float) -> set[str]:
    answers = dimse.find(c.source, "Series", {"StudyInstanceUID": c.uid, "Modality": "",
                                              "BodyPartExamined": ""}, timeout)
    return {a.get("BodyPartExamined", "").strip().upper() for a in answers} - {""}


class Deadline:
    """The first attempt ends at the study's deadline; later ones have their own time."""

    def __init__(self, ctx: Context, job: Job) -> None:
        p = ctx.config.priors
        deadline = job.created + p.deadline_seconds
        # The first attempt ends at the deadline (not one requeued by an operator
        # later). Later ones: the whole search stays well inside JobTimeoutSeconds,
        # past which the worker would be ended as hung.
        self.first = job.attempts <= 1 and time.time() < deadline
        later = min(p.retrieve_timeout_seconds, 0.8 * ctx.config.job_timeout_seconds)
        self.until = deadline if self.first else time.time() + later
        self.per_operation = later

    def left(self, doing: str) -> float:
        left = min(self.until - time.time(), self.per_operation)
        if left <= 0:
            raise TransientError(f"the deadline passed while {doing}; the comparison "
                                 "follows in a revised SR")
        return left


def search(ctx: Context, job: Job, dimse: OrthancDimse,
           analyse: Callable[[str, float], None]) -> dict[str, Any]:
    """The priors job's body; its result, or a JobOutcome / TransientError."""
    p = ctx.config.priors
    clock = Deadline(ctx, job)
    assert job.study is not None
    if is_prior(ctx, job.study):
        raise SkipInput("a study fetched for comparison has no priors of its own")
    cur = local_study(ctx, job.study)
    if not cur.patient_id.strip():
        raise SkipInput("the study has no PatientID: no prior can be matched")
    if any(w in cur.patient_id for w in WILDCARDS):
        raise SkipInput("the PatientID holds C-FIND wildcard characters: not queried")
    today = _date(cur.date)
    if today is None:
        raise SkipInput("the study has no valid StudyDate: priors cannot be ordered")
    if not cur.modalities:
        raise SkipInput("the study has no image series")
    since = (today - dt.timedelta(days=p.max_age_days)).strftime("%Y%m%d")
    found = Search(cur, since)
    candidates = _local_candidates(ctx, found)
    failed: dict[str, str] = {}
    for peer in p.sources:
        try:
            candidates += _remote_candidates(dimse, peer, found, clock.left(f"querying {peer}"))
        except PeerError as exc:
            failed[peer] = exc.reason
    candidates.sort(key=lambda c: (c.when, c.source == "local"), reverse=True)
    queried = ["local", *p.sources]
    priors: list[dict[str, Any]] = []
    seen: set[str] = set()
    retrievals = 0
    for c in candidates:
        if len(priors) >= p.max_priors or retrievals >= p.max_priors + 2:
            break
        if c.uid in seen or not found.relevant(c, p.same_body_part):
            continue
        seen.add(c.uid)
        if c.local_id is None:
            try:
                if p.same_body_part and cur.body_parts:
                    c.body_parts = _body_parts(dimse, c, clock.left(f"querying {c.source}"))
                    if not found.relevant(c, True):
                        continue
                retrievals += 1
                c.local_id = retrieve(ctx, dimse, c, job.study, clock)
            except PeerError as exc:
                failed[c.source] = exc.reason
                continue
            # A PACS may ignore or not return a key (dcmqrscp: ModalitiesInStudy,
            # BodyPartExamined): what arrived is checked like a local study.
            got = local_study(ctx, c.local_id)
            got.source = c.source
            if not found.relevant(got, p.same_body_part):
                continue
        elif is_prior(ctx, c.local_id):
            mark_prior(ctx, c.local_id, "local", job.study)  # used again: kept longer
        analyse(c.local_id, clock.until)
        priors.append({"study": c.local_id, "study_uid": c.uid, "study_date": c.date,
                       "source": c.source, "retrieved": c.source != "local"})
    if not priors:
        if failed:
            peer, reason = next(iter(failed.items()))
            raise PeerError(f"no prior found so far; {peer}: {reason}")
        return {"status": "none", "reason": "no earlier study of this patient with the "
                "same modality" + (" and body part" if p.same_body_part else "")
                + f" within {p.max_age_days} days", "queried": queried,
                "excluded": found.excluded}
    return {"status": "found", "priors": priors, "queried": queried,
            "failed_sources": failed or None, "excluded": found.excluded}


def retrieve(ctx: Context, dimse: OrthancDimse, c: StudyFacts, for_study: str,
             clock: Deadline) -> str:
    """Fetch a prior into Orthanc, marked as fetched for comparison; its Orthanc ID."""
    expected = orthanc_study_id(c.patient_id or "", c.uid)
    mark_prior(ctx, expected, c.source, for_study)
    method = ctx.config.priors.retrieve_method.get(c.source, "C-MOVE")

    def arrived() -> list[str]:
        status, found = ctx.source.call("POST", "/tools/lookup", c.uid)
        return [f["ID"] for f in found if f.get("Type") == "Study"] \
            if status == 200 and isinstance(found, list) else []

    try:
        dimse.retrieve_study(c.source, c.uid, method, clock.left(f"retrieving from {c.source}"))
    except PeerError:
        if not arrived():  # nothing came: no mark left behind
            unmark_prior(ctx, expected)
        raise
    ids = arrived()
    if not ids:
        unmark_prior(ctx, expected)
        hint = f" (does {c.source} know our AE title {dimse.own_aet()} as a move " \
            "destination?)" if method == "C-MOVE" else ""
        raise PeerError(f"the {method} from {c.source} ended but brought no instance{hint}")
    if ids[0] != expected:
        mark_prior(ctx, ids[0], c.source, for_study)
    return ids[0]


def mark_prior(ctx: Context, study: str, source: str, for_study: str) -> None:
    """Mark ``study`` as fetched for comparison (before it arrives), due for removal."""
    hours = ctx.config.priors.retention_hours
    due = time.time() + hours * 3600
    key = retention_key(study)
    job = ctx.store.by_key(key)
    if job is None:
        ctx.ledger.record(NewJob(
            "", study, None, kind=JobKind.RETENTION, key=key, not_before=due if hours else 0,
            state=JobState.QUEUED if hours else JobState.DONE,
            reason=f"fetched from {source} for comparison with study {for_study}"))
    elif hours and job.state != JobState.RUNNING:
        ctx.store.requeue(job.id, not_before=due)  # fetched again: kept longer


def run_retention(ctx: Context, job: Job) -> None:
    """A prior fetched only for comparison has been kept long enough: delete it."""
    with ctx.ledger.outcome(job, policy=ctx.config.priors) as done:
        try:
            ctx.source.delete(f"/studies/{job.study}")
            outcome = "deleted from Orthanc"
        except InstanceGone:
            outcome = "already gone"
        done({"removed": outcome, "at": iso(time.time())}, None)


# -- the comparison ----------------------------------------------------------------

@dataclass(frozen=True)
class Compared:
    """What an analysis learns about its comparison: for the SR and the job's result."""

    comparison: Comparison | None = None
    info: dict[str, Any] | None = None  # the job result's "comparison"
    note: str | None = None  # for the SR when there is no comparison

    @property
    def awaited(self) -> bool:
        """A revised SR may follow."""
        return awaits({"comparison": self.info})


NOTHING = Compared()


def comparison_for(ctx: Context, study: str | None, card: Any, finding: Finding, *,
                   wait: bool = True) -> Compared:
    """The interval change of ``finding`` (by ``card``) in ``study``, or why there is none."""
    if not enabled(ctx) or not study:
        return NOTHING
    if is_prior(ctx, study):
        return Compared(info={"state": "prior"},
                        note="a prior study, analysed for comparison with a later one")
    job = ctx.store.by_key(priors_key(study))
    if job is None:
        return NOTHING
    if wait:  # another worker is fetching the prior: wait for it, up to the deadline
        until = job.created + ctx.config.priors.deadline_seconds
        while job is not None and job.state == JobState.RUNNING and time.time() < until:
            time.sleep(0.2)
            job = ctx.store.by_key(priors_key(study))
        if job is None:
            return NOTHING
    if job.state != JobState.DONE:
        retrying = job.state in (JobState.QUEUED, JobState.RUNNING) or (
            job.state == JobState.FAILED and job.not_before > 0)
        reason = job.reason or "the prior search has not ended"
        if job.state in (JobState.QUEUED, JobState.RUNNING):
            reason = "the prior search has not ended within AI.Priors.DeadlineSeconds"
        state = "pending" if retrying else "unavailable"
        follow = "; a revised SR follows when it arrives" if retrying else ""
        return Compared(info={"state": state, "reason": reason},
                        note=f"no prior comparison: {reason}{follow}")
    result = job.result or {}
    if result.get("status") != "found":
        reason = str(result.get("reason") or "no prior study found")
        return Compared(info={"state": "none", "reason": reason},
                        note=f"no prior comparison: {reason}")
    for prior in result.get("priors", []):
        done = [j for j in ctx.store.list(study=prior["study"], model=card.id, state="done",
                                          limit=100000)
                if j.model_version == card.version and j.result
                and "probability" in j.result]
        latest: dict[str, Job] = {}  # a volume: its latest version (set of slices) only
        for j in done:
            if j.instance:
                latest[j.key] = j
            elif j.series and j.id > getattr(latest.get(j.series), "id", -1):
                latest[j.series] = j
        if not latest:
            continue
        best = max(latest.values(), key=lambda j: float(j.result["probability"]))  # type: ignore[index]
        r = best.result or {}
        before = PriorFinding(float(r["probability"]), float(r.get("threshold", card.threshold)),
                              r.get("volume_ml"))
        ref = None
        if r.get("sr_sop_instance_uid"):
            ref = PriorReference(str(Comprehensive3DSRStorage), r["sr_sop_instance_uid"],
                                 r["sr_series_instance_uid"], prior["study_uid"])
        cmp = compare(finding, before, prior_study_uid=prior["study_uid"],
                      prior_study_date=prior.get("study_date") or "", prior_sr=ref)
        return Compared(cmp, {
            "state": "compared", "change": cmp.change.value, "text": cmp.describe(),
            "prior_study": prior["study"], "prior_study_uid": prior["study_uid"],
            "prior_study_date": prior.get("study_date"), "prior_source": prior.get("source"),
            "prior_probability": before.probability, "prior_volume_ml": before.volume_ml,
            "probability_difference": cmp.probability_difference,
            "volume_difference_ml": cmp.volume_difference_ml,
            "prior_sr": ref.sop_instance_uid if ref else None})
    reason = f"the prior study has no result of {card.id} {card.version}"
    return Compared(info={"state": "none", "reason": reason},
                    note=f"no prior comparison: {reason}")


def awaits(result: dict[str, Any] | None) -> bool:
    """Whether an analysis' SR was written without the comparison that may still come."""
    info = (result or {}).get("comparison") or {}
    return info.get("state") in ("pending", "unavailable")


def queue_revision(ctx: Context, job: Job) -> bool:
    """A durable revise job for one analysis' SR (once per SR, whoever asks)."""
    sop = (job.result or {}).get("sr_sop_instance_uid", "")
    return ctx.ledger.record(NewJob(
        job.instance, job.study, job.series, model=job.model, version=job.model_version,
        kind=JobKind.REVISE, key=f"revise:{job.id}:{sop}")) is not None


def revise_study(ctx: Context, study: str) -> int:
    """A revise job for each result of ``study`` that awaits its prior."""
    return sum(queue_revision(ctx, job) for job in ctx.store.list(study=study, state="done",
                                                                    limit=100000)
               if awaits(job.result))


def revise_if_due(ctx: Context, job: Job, result: dict[str, Any] | None) -> None:
    """After an analysis ended awaiting its prior: if the prior search succeeded
    meanwhile (after it looked for results to revise), queue the revision now.
    Both sides look after their own write, so one of them sees the other's."""
    if not awaits(result) or not job.study:
        return
    search = ctx.store.by_key(priors_key(job.study))
    ended = ctx.store.get(job.id)
    if search is not None and search.state == JobState.DONE and ended is not None \
            and ended.state == JobState.DONE and awaits(ended.result):
        queue_revision(ctx, ended)


def run_revision(ctx: Context, job: Job) -> None:
    """Run one claimed revise job: the analysis' SR again, with its comparison."""
    with ctx.ledger.outcome(job, policy=ctx.config.priors) as done:
        _, analysis_id, sop = job.key.split(":", 2)
        target = ctx.store.get(int(analysis_id))
        if target is None or target.state != JobState.DONE or not awaits(target.result) \
                or (target.result or {}).get("sr_sop_instance_uid") != sop:
            done({"revised": False, "why": "the result no longer awaits this comparison"},
                 None)
            return
        search = ctx.store.by_key(priors_key(target.study or ""))
        if search is None or search.state != JobState.DONE:
            raise TransientError("the prior search has not ended yet")
        done(revise(ctx, target), None)


def _predecessor(result: dict[str, Any], study_uid: str) -> Dataset:
    pre = Dataset()
    pre.SOPClassUID = Comprehensive3DSRStorage
    pre.SOPInstanceUID = result["sr_sop_instance_uid"]
    pre.SeriesInstanceUID = result["sr_series_instance_uid"]
    pre.StudyInstanceUID = study_uid
    return pre


def revise(ctx: Context, job: Job) -> dict[str, Any]:
    """Rebuild one analysis' SR with its comparison, from its recorded finding."""
    from .fetch import SeriesCache, fetch, locate
    from .instance_job import report

    card = ctx.registry.cards.get(job.model)
    result = dict(job.result or {})
    if card is None or card.version != job.model_version or "probability" not in result:
        return {"revised": False, "why": f"model {job.model} {job.model_version} is not loaded"}
    source_instance = job.instance or result.get("key_instance")
    if not source_instance:
        return {"revised": False, "why": "the result names no source image"}
    region = result.get("region")
    finding = Finding(float(result["probability"]), float(result["threshold"]),
                      Region(region[1], region[0], region[3], region[2]) if region else None,
                      result.get("volume_ml"))
    compared = comparison_for(ctx, job.study, card, finding, wait=False)
    if compared.comparison is None:
        # The search ended without anything to compare: say so; the SR stays.
        result["comparison"] = compared.info
        ctx.store.finish(job.id, JobState.DONE, result=result)
        return {"revised": False, "why": (compared.info or {}).get("reason")}
    stored = fetch(ctx, locate(ctx, SeriesCache(), source_instance), source_instance,
                   job.created)
    new = report(ctx, card, stored, finding, missing=result.get("missing_inputs", ()),
                 notes=result.get("notes", ()),
                 uids=(result["sr_series_instance_uid"], result["sr_sop_instance_uid"]),
                 predecessor=_predecessor(result, str(stored.dataset.StudyInstanceUID)),
                 instance=job.instance or None, compared=compared)
    revises = result.get("sr_sop_instance_uid")
    result.update(new)
    result["revises"] = revises
    ctx.store.finish(job.id, JobState.DONE, result=result)
    log.warning("orthanc-ai: job %d: revised SR with the prior comparison", job.id)
    return {"revised": True, "analysis": job.id, "revises": revises,
            "sr_sop_instance_uid": new["sr_sop_instance_uid"], "change": compared.info}


def run(ctx: Context, job: Job, dimse: OrthancDimse,
        analyse: Callable[[str, float], None]) -> None:
    """Run one claimed priors job; then queue the revision of what waited for it
    (before it ends, so that a kill cannot lose them, and once more after)."""
    with ctx.ledger.outcome(job, policy=ctx.config.priors) as done:
        result = search(ctx, job, dimse, analyse)
        if job.study:
            revise_study(ctx, job.study)
        done(result, None)
    if job.study:
        current = ctx.store.by_key(priors_key(job.study))
        if current is not None and current.state == JobState.DONE:
            revise_study(ctx, job.study)
