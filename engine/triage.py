"""Triage: which jobs exist for an inbox item. It decides and never runs them.

Whatever happens, an instance ends with a job in a visible state, except
our own SRs (and their GSPS and KOS) and the slices of a volume, whose series
job reports on them.
Triage is idempotent: an item seen before (a resend, a replayed change)
creates nothing new.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field

import pydicom

from inference.errors import BadInput, JobOutcome, SkipInput, TransientError
from inference.routing import is_own_output, may_be_own_output, non_image_reason, sop_class_name

from . import priors
from .context import Context
from .fetch import SeriesCache, Stored, fetch, locate
from .series_job import list_slices, series_key
from .source import InstanceGone
from .stores import InboxItem, InboxKind, JobKind, JobState, NewJob

log = logging.getLogger("orthanc_ai")


@dataclass
class Decision:
    jobs: list[NewJob] = field(default_factory=list)
    stored: Stored | None = None  # the instance, already fetched for its jobs


def _outcome(exc: JobOutcome, **where: str | None) -> NewJob:
    state = JobState.SKIPPED if isinstance(exc, SkipInput) else JobState.FAILED
    return NewJob(where.get("instance") or "", where.get("study"), where.get("series"),
                  state=state, reason=exc.reason, key=where.get("key"))


class Triage:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.series_cache = SeriesCache()

    def __call__(self, item: InboxItem) -> Decision:
        if item.kind == InboxKind.SERIES:
            return self.series(item.resource)
        if item.kind == InboxKind.STUDY:
            self.reopen_study(item.resource)
            return Decision()
        return self.instance(item.resource, item.queued_at,
                             force=item.kind == InboxKind.REPROCESS)

    # -- instances -----------------------------------------------------------

    def instance(self, instance_id: str, queued_at: float, force: bool = False) -> Decision:
        ctx = self.ctx
        if not force and ctx.store.for_instance(instance_id):
            return Decision()  # seen before: handled or in progress
        try:
            located = locate(ctx, self.series_cache, instance_id)
            meta = ctx.source.instance_metadata(instance_id)
        except InstanceGone:
            return Decision([NewJob(instance_id, None, None, state=JobState.SKIPPED,
                                    reason="instance deleted before it could be processed")])
        study, series = located.study, located.series
        sop_class = meta.get("SopClassUid", "")
        if not force and priors.enabled(ctx) and not may_be_own_output(sop_class) \
                and priors.is_prior(ctx, study) and not priors.arrived_as_prior(ctx, meta):
            priors.unmark_prior(ctx, study)  # a modality sent it: a current study now
        try:
            reason = non_image_reason(sop_class)
            if reason is not None:
                if may_be_own_output(sop_class) and self._own(instance_id, sop_class):
                    return Decision()
                raise SkipInput(reason)
            if not ctx.router.wants(located.modality, "instance"):
                if ctx.router.wants(located.modality, "series"):
                    return Decision()  # a slice of a volume: its series job reports on it
                raise SkipInput(f"no rule matched (Modality {located.modality or 'missing'})")
            stored = fetch(ctx, located, instance_id, queued_at)
            if "PixelData" not in stored.dataset:
                raise SkipInput(f"non-image object ({sop_class_name(sop_class)})")
            cards = ctx.router.route(stored.dataset)
        except TransientError:
            raise
        except JobOutcome as exc:
            return Decision([_outcome(exc, instance=instance_id, study=study, series=series)])
        return Decision([NewJob(instance_id, study, series, model=card.id, version=card.version)
                         for card in cards], stored)

    def _own(self, instance_id: str, sop_class: str) -> bool:
        try:
            tags = self.ctx.source.get_json(f"/instances/{instance_id}/simplified-tags")
        except TransientError:
            raise
        except JobOutcome:
            return False
        return is_own_output(sop_class, tags.get("Manufacturer"))

    # -- series --------------------------------------------------------------

    def series(self, series_id: str) -> Decision:
        """The series jobs of a stable series (once per set of slices)."""
        ctx = self.ctx
        try:
            series = ctx.source.get_json(f"/series/{series_id}")
        except InstanceGone:
            return Decision()  # deleted meanwhile: its instances said so
        modality = str(series["MainDicomTags"].get("Modality", "")).upper()
        if not ctx.router.wants(modality, "series"):
            return Decision()  # radiographs and the like: their instance jobs report on them
        study = series["ParentStudy"]
        instances = series.get("Instances", [])
        if not instances:
            return Decision()

        def outcome(exc: JobOutcome) -> Decision:
            # Once per version of the series (its size, before ordering).
            key = f"series:{series_id}@{len(instances)} instances||"
            return Decision([_outcome(exc, study=study, series=series_id, key=key)])

        try:
            # Route first, on one slice's header: a series no rule wants says
            # so, whatever its geometry.
            header = pydicom.dcmread(io.BytesIO(ctx.source.instance_file(instances[0])),
                                     stop_before_pixels=True)
            cards = ctx.router.route(header, level="series")
            ordered = list_slices(ctx, series_id)
        except TransientError:
            raise
        except JobOutcome as exc:
            return outcome(exc)
        except Exception as exc:  # an unreadable first slice, an odd index entry
            log.exception("orthanc-ai: a series cannot be triaged")
            return outcome(BadInput(f"the series cannot be read: {type(exc).__name__}"))
        prefix = f"series:{series_id}@{ordered.fingerprint}|"
        if any(j.key.startswith(prefix) for j in ctx.store.list(series=series_id, limit=10000)):
            return Decision()  # this set of slices was already seen (a replayed change)
        return Decision([NewJob("", study, series_id, model=card.id, version=card.version,
                                key=series_key(series_id, ordered.fingerprint, card))
                         for card in cards])

    # -- operators -----------------------------------------------------------

    def reopen_study(self, study_id: str) -> None:
        """Decide again for every instance and series of a study.

        Jobs done by the current model versions stay done (same SR); failed
        and dead ones run again; a new model version gets its own jobs.
        """
        store = self.ctx.store
        try:
            instances = self.ctx.source.get_json(f"/studies/{study_id}/instances")
        except InstanceGone:
            return
        for instance in instances:
            store.forget_instance_outcomes(instance["ID"])
        for state in (JobState.FAILED, JobState.DEAD):  # analyses, priors and deliveries
            for job in store.list(study=study_id, state=state.value, kind=None, limit=100000):
                if job.kind != JobKind.RETENTION:  # that one runs at its due time
                    store.requeue(job.id)
        series = sorted({i["ParentSeries"] for i in instances})
        # Durable, so a stop before triage loses nothing; after the outcomes
        # are forgotten, so that triage may record new ones.
        store.push_inbox([(InboxKind.REPROCESS, i["ID"]) for i in instances]
                         + [(InboxKind.SERIES, s) for s in series], again=True)


DIED_IN_TRIAGE = "the worker died while triaging this input; not retried automatically"


def triage_failed(item: InboxItem, reason: str) -> NewJob:
    """The outcome of an item that could not be triaged: failed, for good."""
    if item.kind == InboxKind.SERIES:
        return NewJob("", None, item.resource, state=JobState.FAILED, reason=reason,
                      key=f"series:{item.resource}@triage||")
    return NewJob(item.resource, None, None, state=JobState.FAILED, reason=reason,
                  key=f"{item.kind}:{item.resource}@triage||")
