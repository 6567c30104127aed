"""In-memory stand-ins for the pipeline's ports: an Orthanc source and a back end.

They behave like the real ones where the pipeline can tell (IDs as Orthanc
computes them, 404 as ``InstanceGone``, our SR filed in its study), and
count what was asked of them, so tests can say what did not happen.
"""

from __future__ import annotations

import io
from collections import Counter
from typing import Any

import numpy as np
import pydicom

from engine.source import InstanceGone, orthanc_instance_id
from inference.backend import Batch, RawOutput
from inference.card import ModelCard
from inference.errors import TransientError


class FakeOrthanc:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.headers: dict[str, pydicom.Dataset] = {}
        self.calls: Counter[str] = Counter()
        self.fail_stores = 0  # the next N stores answer like an overloaded Orthanc

    @staticmethod
    def _ids(ds: pydicom.Dataset) -> tuple[str, str, str]:
        pid = str(ds.get("PatientID", ""))
        study = orthanc_instance_id(pid, str(ds.StudyInstanceUID), "", "")
        series = orthanc_instance_id(pid, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                     "")
        instance = orthanc_instance_id(pid, str(ds.StudyInstanceUID),
                                       str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        return study, series, instance

    def add(self, ds: pydicom.Dataset) -> str:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return self._add(buffer.getvalue())

    def _add(self, data: bytes) -> str:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        _, _, instance = self._ids(ds)
        self.files[instance] = data
        self.headers[instance] = ds
        return instance

    def _header(self, instance_id: str) -> pydicom.Dataset:
        if instance_id not in self.headers:
            raise InstanceGone(f"404 on /instances/{instance_id}")
        return self.headers[instance_id]

    # -- the OrthancSource protocol ----------------------------------------------

    def instance(self, instance_id: str) -> dict[str, Any]:
        self.calls["instance"] += 1
        _, series, _ = self._ids(self._header(instance_id))
        return {"ID": instance_id, "ParentSeries": series,
                "FileSize": len(self.files[instance_id])}

    def instance_metadata(self, instance_id: str) -> dict[str, str]:
        self.calls["metadata"] += 1
        return {"SopClassUid": str(self._header(instance_id).SOPClassUID)}

    def instance_file(self, instance_id: str) -> bytes:
        self.calls["file"] += 1
        self._header(instance_id)
        return self.files[instance_id]

    def get_json(self, path: str) -> Any:
        self.calls["get_json"] += 1
        parts = path.strip("/").split("/")
        if parts[0] == "series":
            members = [i for i, ds in self.headers.items() if self._ids(ds)[1] == parts[1]]
            if not members:
                raise InstanceGone(f"404 on {path}")
            first = self.headers[members[0]]
            if len(parts) == 2:
                return {"ParentStudy": self._ids(first)[0], "Instances": members,
                        "MainDicomTags": {"Modality": str(first.get("Modality", ""))}}
            return [{"ID": i, "FileSize": len(self.files[i]),
                     "MainDicomTags": {"SOPInstanceUID": str(self.headers[i].SOPInstanceUID)}}
                    for i in members]
        if parts[0] == "instances" and parts[2] == "simplified-tags":
            return {"Manufacturer": str(self._header(parts[1]).get("Manufacturer", ""))}
        if parts[0] == "studies":
            return [{"ID": i, "ParentSeries": self._ids(ds)[1]}
                    for i, ds in self.headers.items() if self._ids(ds)[0] == parts[1]]
        raise AssertionError(f"unexpected GET {path}")

    def store(self, dicom: bytes) -> dict[str, Any]:
        self.calls["store"] += 1
        if self.fail_stores:
            self.fail_stores -= 1
            raise TransientError("Orthanc REST POST /instances: HTTP 503")
        ds = pydicom.dcmread(io.BytesIO(dicom), stop_before_pixels=True)
        study, _, instance = self._ids(ds)
        status = "AlreadyStored" if instance in self.files else "Success"
        self._add(dicom)
        return {"ID": instance, "ParentStudy": study, "Status": status}

    def changes(self, since: int, limit: int = 100) -> dict[str, Any]:
        return {"Changes": [], "Last": since, "Done": True}

    def srs(self) -> list[pydicom.Dataset]:
        return [ds for ds in self.headers.values() if ds.Modality == "SR"]


class FakeBackend:
    """Every image gets ``probability`` and a heat map with one hot cell."""

    def __init__(self, probability: float = 0.9) -> None:
        self.probability = probability
        self.batches: list[int] = []

    def load(self, card: ModelCard) -> None:
        pass

    def predict(self, card: ModelCard, batch: Batch) -> list[RawOutput]:
        self.batches.append(len(batch.images))
        rows, cols = card.image.shape[0] // card.heatmap_stride, \
            card.image.shape[1] // card.heatmap_stride
        heat = np.zeros((rows, cols), np.float32)
        heat[rows // 2, cols // 2] = 1.0
        return [RawOutput(self.probability, heat) for _ in range(len(batch.images))]
