"""Instance jobs: one image, one model, one SR; batched per model.

Decode and preprocess each image, one model call per model for the whole
batch, then a finding, an SR and the sinks for each image. Each job ends
through the ledger, whatever happens to the others of its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

from inference.backend import batch_of
from inference.card import ModelCard
from inference.errors import BadInput, JobOutcome
from inference.postprocess import Finding, to_finding
from inference.preprocess import ModelInput, radiograph_input
from inference.presentation import build_companions, file_bytes
from inference.report import build_sr, sr_uids
from inference.uids import derived_uid

from . import priors
from .context import Context, sr_file
from .fetch import SeriesCache, Stored, fetch, locate
from .sinks import Companion, Report
from .stores import Job
from .summary import result_summary


def card_for(ctx: Context, job: Job) -> ModelCard:
    card = ctx.registry.cards.get(job.model)
    if card is None or card.version != job.model_version:
        raise BadInput(f"model {job.model} {job.model_version} is not loaded")
    return card


def prepare(ctx: Context, card: ModelCard, stored: Stored) -> ModelInput:
    with ctx.stage("decode"):
        return radiograph_input(card, stored.dataset, max_pixel_bytes=ctx.config.max_pixel_bytes)


def accessed(ctx: Context, ds, count: int, card: ModelCard) -> None:
    """Audit: DICOM Instances Accessed, the pixels read for inference (once a job)."""
    ctx.audit.instances_accessed(str(ds.get("StudyInstanceUID", "")),
                                 str(ds.get("PatientID", "")),
                                 {str(ds.get("SOPClassUID", "")): count},
                                 description=f"read for inference by {card.id} {card.version}")


def run(ctx: Context, cache: SeriesCache, pending: Sequence[tuple[Job, Stored | None]]) -> None:
    """Run claimed instance jobs; every one of them ends in a state."""
    prepared: dict[str, list[tuple[Job, Stored, ModelInput]]] = {}
    for job, stored in pending:
        with ctx.ledger.outcome(job):
            card = card_for(ctx, job)
            if stored is None:
                stored = fetch(ctx, locate(ctx, cache, job.instance), job.instance, job.created)
            accessed(ctx, stored.dataset, 1, card)  # read, whether it decodes or not
            prepared.setdefault(card.id, []).append((job, stored, prepare(ctx, card, stored)))
    for model_id, items in prepared.items():
        card = ctx.registry.cards[model_id]
        try:
            with ctx.stage("infer"):
                outputs = ctx.backend.predict(card, batch_of(card, [i[2] for i in items]))
        except Exception as exc:
            for job, _, _ in items:
                with ctx.ledger.outcome(job):
                    raise exc
            continue
        for (job, stored, inputs), raw in zip(items, outputs, strict=True):
            result = None
            with ctx.ledger.outcome(job) as done:
                finding = to_finding(card, raw, inputs.image.geometry)
                result = report(ctx, card, stored, finding, missing=inputs.missing_inputs,
                                notes=inputs.image.notes)
                done(result, stored.queued_at)
            priors.revise_if_due(ctx, job, result)


def report(ctx: Context, card: ModelCard, stored: Stored, finding: Finding, *,
           missing: Sequence[str] = (), notes: Sequence[str] = (),
           uids: tuple[str, str] | None = None, predecessor=None,
           instance: str | None = None, compared: priors.Compared | None = None) -> dict:
    """Build the SR (compared with the prior where there is one), hand it to the
    sinks, and describe the result."""
    if compared is None:
        with ctx.stage("compare"):
            compared = priors.comparison_for(ctx, stored.study, card, finding)
    sr_notes = [*notes, compared.note] if compared.note else list(notes)
    extra = {}
    if compared.comparison is not None:
        # Its own UIDs: never the same SR as one made without the comparison.
        series_uid, sop_uid = uids or sr_uids(stored.dataset, card)
        uids = (series_uid, derived_uid("orthanc-ai/sr-compared", sop_uid,
                                        compared.comparison.prior_study_uid))
        extra["comparisons"] = [compared.comparison]
    with ctx.stage("report"):
        sr = build_sr(stored.dataset, card, [finding], missing_inputs=missing, notes=sr_notes,
                      uids=uids, predecessor=predecessor, **extra)
        data = sr_file(sr)
        made, not_made = companions(ctx, card, stored, finding, sr, extra.get("comparisons"))
    delivered = ctx.deliver(Report(card, stored.dataset, sr, data, (finding,), stored.study,
                                   stored.series, instance or stored.instance,
                                   companions=made))
    if not_made:
        delivered["companions_not_made"] = not_made
    region = finding.region
    result = {
        "finding": card.finding.meaning,
        "probability": round(finding.probability, 6),
        "positive": finding.positive,
        "threshold": finding.threshold,
        "region": None if region is None else [region.col0, region.row0,
                                                region.col1, region.row1],
        "missing_inputs": list(missing),
        "notes": list(notes),
        "sr_sop_instance_uid": str(sr.SOPInstanceUID),
        "sr_series_instance_uid": str(sr.SeriesInstanceUID),
        "comparison": compared.info,
        # For the study's links (OHIF opens a study by its UID, not by Orthanc's ID).
        "study_instance_uid": str(stored.dataset.get("StudyInstanceUID", "")),
        **delivered,
    }
    result["summary"] = result_summary({**result, "volume_ml": finding.volume_ml})
    return result


def companions(ctx: Context, card: ModelCard, stored: Stored, finding: Finding, sr,
               comparisons=None) -> tuple[tuple[Companion, ...], str | None]:
    """The GSPS and KOS that show a located finding in any viewer (AI.PresentationStates),
    and why there are none where they cannot be made: the SR stands without them."""
    if not ctx.config.presentation_states:
        return (), None
    try:
        made = build_companions(stored.dataset, card, [finding], sr, comparisons=comparisons)
    except JobOutcome as exc:
        return (), exc.reason
    return tuple(Companion(ds, file_bytes(ds)) for ds in made), None
