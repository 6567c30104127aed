"""Download and parse one instance from the Orthanc source."""

from __future__ import annotations

import io
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from inference.errors import BadInput

from .context import Context


@dataclass(frozen=True)
class Stored:
    """An instance as the pipeline knows it after fetching."""

    instance: str
    study: str
    series: str
    dataset: Dataset
    queued_at: float


@dataclass(frozen=True)
class Located:
    """Orthanc's record of an instance: its study and series IDs, the series' Modality."""

    info: dict[str, Any]
    study: str
    series: str
    modality: str


@dataclass
class SeriesCache:
    """A series' study and Modality never change: kept for the last few hundred
    series, as ``/series/{id}`` lists every instance (a 1,000-slice CT would
    otherwise cost 1,000 such lists)."""

    size: int = 512
    entries: OrderedDict[str, tuple[str, str]] = field(default_factory=OrderedDict)

    def get(self, ctx: Context, series_id: str) -> tuple[str, str]:
        known = self.entries.get(series_id)
        if known is None:
            series = ctx.source.get_json(f"/series/{series_id}")
            known = (series["ParentStudy"],
                     str(series.get("MainDicomTags", {}).get("Modality", "")))
            self.entries[series_id] = known
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return known


def locate(ctx: Context, cache: SeriesCache, instance_id: str) -> Located:
    info = ctx.source.instance(instance_id)
    study, modality = cache.get(ctx, info["ParentSeries"])
    return Located(info, study, info["ParentSeries"], modality)


def fetch(ctx: Context, located: Located, instance_id: str, queued_at: float) -> Stored:
    """Download and parse one instance, refusing oversized files first.

    Only the header is parsed here; pixels are decoded by the job.
    """
    with ctx.stage("fetch"):
        size = int(located.info.get("FileSize", 0) or 0)
        if size > ctx.config.max_instance_bytes:
            raise BadInput(
                f"instance file is {size / 2**20:.0f} MiB, over the "
                f"{ctx.config.max_instance_bytes / 2**20:.0f} MiB cap (MaxInstanceBytes)")
        data = ctx.source.instance_file(instance_id)
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
        except (InvalidDicomError, EOFError, ValueError, OSError, KeyError) as exc:
            raise BadInput(f"not a readable DICOM file: {type(exc).__name__}") from exc
        if "SOPClassUID" not in ds:
            # pydicom gives up silently on some truncated files (an empty dataset)
            raise BadInput("the file could not be parsed (truncated or corrupt)")
    return Stored(instance_id, located.study, located.series, ds, queued_at)
