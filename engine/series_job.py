"""Series-level jobs: a volume analysed slice by slice once Orthanc calls it stable.

Slices are listed from Orthanc's index (positions and orientations without
downloading anything), ordered along the slice normal, then downloaded,
preprocessed and predicted in small batches: memory holds one batch and the
best slice so far, whatever the series length. A series that changes after
it was reported (late images) gets a new SR that names its predecessor.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any

import pydicom

from inference.backend import RawOutput, batch_of
from inference.card import ModelCard
from inference.errors import BadInput, JobOutcome, SkipInput
from inference.preprocess import Geometry, ct_slice_input
from inference.report import sr_uids
from inference.uids import derived_uid
from inference.volume import (
    OrderedSeries,
    SeriesAccumulator,
    SliceRef,
    order_slices,
    parse_vector,
    series_finding,
    slice_area_mm2,
)

from . import priors
from .context import Context
from .fetch import Located, Stored, fetch
from .instance_job import accessed, card_for, report
from .stores import Job

log = logging.getLogger("orthanc_ai")
MAX_BAD_SLICE_FRACTION = 0.1


def series_key(series_id: str, fingerprint: str, card: ModelCard) -> str:
    return f"series:{series_id}@{fingerprint}|{card.id}|{card.version}"


@dataclass
class KeySlice:
    header: pydicom.Dataset
    raw: RawOutput
    geometry: Geometry
    missing: tuple[str, ...]


def list_slices(ctx: Context, series_id: str) -> OrderedSeries:
    instances = ctx.source.get_json(f"/series/{series_id}/instances")
    refs = [
        SliceRef(
            instance=i["ID"],
            sop_instance_uid=i["MainDicomTags"].get("SOPInstanceUID", i["ID"]),
            position=parse_vector(i["MainDicomTags"].get("ImagePositionPatient"), 3),
            orientation=parse_vector(i["MainDicomTags"].get("ImageOrientationPatient"), 6),
            file_size=int(i.get("FileSize", 0) or 0),
        )
        for i in instances
    ]
    return order_slices(refs)


def run(ctx: Context, job: Job) -> None:
    """Run one claimed series job; it ends in a state, whatever happens."""
    result = None
    with ctx.ledger.outcome(job) as done:
        result = analyse(ctx, job, card_for(ctx, job))
        done(result, job.created)
    priors.revise_if_due(ctx, job, result)


def analyse(ctx: Context, job: Job, card: ModelCard) -> dict[str, Any]:
    """Stream the slices of a series through the model, report one SR."""
    assert job.series is not None
    ordered = list_slices(ctx, job.series)
    if series_key(job.series, ordered.fingerprint, card) != job.key:
        raise SkipInput("the series changed before this job ran; its new version is analysed")
    acc = SeriesAccumulator()
    bad: list[str] = []
    read: list[Any] = []  # the first slice's identifiers and how many were read (audit)
    batch_size = max(1, ctx.config.batch_size)
    slices = list(enumerate(ordered.slices))
    for start in range(0, len(slices), batch_size):
        chunk, prepared = [], []
        for index, ref in slices[start : start + batch_size]:
            try:
                # Study, series and file size are known from the listing: no
                # per-slice lookup before the download.
                located = Located({"FileSize": ref.file_size}, job.study or "", job.series,
                                  "")
                stored = fetch(ctx, located, ref.instance, job.created)
                if not read:  # its identifiers only: no slice is held for this
                    read[:] = [{k: str(stored.dataset.get(k, "")) for k in
                                ("StudyInstanceUID", "PatientID", "SOPClassUID")}, 0]
                read[1] += 1
                with ctx.stage("decode"):
                    prepared.append(ct_slice_input(
                        card, stored.dataset, max_pixel_bytes=ctx.config.max_pixel_bytes))
                chunk.append((index, stored.dataset))
            except (BadInput, SkipInput) as exc:
                bad.append(f"slice {index + 1}: {exc.reason}")
        if not chunk:
            continue
        with ctx.stage("infer"):
            outputs = ctx.backend.predict(card, batch_of(card, prepared))
        for (index, ds), prep, raw in zip(chunk, prepared, outputs, strict=True):
            area = slice_area_mm2(card, raw)
            if raw.probability > acc.best_probability:
                ds.PixelData = b""  # the key slice's header is all the report needs
                keep = KeySlice(ds, raw, prep.image.geometry, prep.missing_inputs)
            else:
                keep = None
            acc.add(index, raw.probability, area, ordered.slab_mm[index], keep)
    if read:  # once for the series, not per slice
        accessed(ctx, read[0], read[1], card)
    if len(bad) > MAX_BAD_SLICE_FRACTION * len(ordered.slices) or acc.n == 0:
        raise BadInput(f"{len(bad)} of {len(ordered.slices)} slices unusable: {bad[0]}")
    key: KeySlice = acc.best  # type: ignore[assignment]
    finding = series_finding(card, acc, key.raw, key.geometry)
    notes = list(ordered.notes) + bad[:5]
    source_series_uid = str(key.header.SeriesInstanceUID)
    uids = (
        sr_uids(key.header, card)[0],  # the same SR series as the instance results
        derived_uid("orthanc-ai/sr-volume", source_series_uid, ordered.fingerprint,
                    card.id, card.version),
    )
    predecessor = _predecessor(ctx, job, card)
    key_stored = Stored(ordered.slices[acc.best_index].instance, job.study or "", job.series,
                        key.header, job.created)
    result = report(ctx, card, key_stored, finding, missing=key.missing, notes=notes,
                    uids=uids, predecessor=predecessor)
    result.update({
        "volume_ml": finding.volume_ml,
        "key_slice": acc.best_index + 1,
        "key_instance": ordered.slices[acc.best_index].instance,
        "slices": len(ordered.slices),
        "slices_analysed": acc.n,
        "fingerprint": ordered.fingerprint,
        "predecessor_sr": None if predecessor is None else str(predecessor.SOPInstanceUID),
    })
    return result


def _predecessor(ctx: Context, job: Job, card: ModelCard) -> pydicom.Dataset | None:
    """The SR of the latest earlier version of this series by this model, if any."""
    earlier = [j for j in ctx.store.list(series=job.series, model=card.id, state="done",
                                         limit=100000)
               if j.id != job.id and j.result and j.result.get("sr_instance")]
    if not earlier:
        return None
    previous = earlier[-1].result["sr_instance"]  # type: ignore[index]
    try:
        return pydicom.dcmread(io.BytesIO(ctx.source.instance_file(previous)))
    except JobOutcome:
        return None  # the earlier SR was deleted: nothing to refer to
