"""Where results leave the pipeline: the ``ResultSink`` protocol.

The pipeline hands every finished report to each sink in order and merges
what a sink returns into the job's result; it knows nothing else about
them. Storing the SR back into Orthanc is the first sink; forwarding by
C-STORE (``dicom_forward.py``) the second; HL7 ORU and the audit trail
plug in beside them. A report's companions (the GSPS and KOS that show its
finding in any viewer) are stored and forwarded with its SR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from pydicom.dataset import Dataset

from inference.card import ModelCard
from inference.postprocess import Finding


@dataclass(frozen=True)
class Companion:
    """An object that shows the SR's finding where the SR is not rendered: a GSPS or a
    KOS (inference.presentation), stored and forwarded with the SR."""

    dataset: Dataset
    data: bytes  # as a DICOM file (Part 10)


@dataclass(frozen=True)
class Report:
    """One SR the pipeline made, with what sinks may need to describe it."""

    card: ModelCard
    source: Dataset  # the source image's header (or the key slice's, for a volume)
    sr: Dataset
    sr_bytes: bytes  # the SR as a DICOM file (Part 10)
    findings: tuple[Finding, ...]
    study: str  # Orthanc ID of the source study
    series: str | None  # Orthanc ID of the source series
    instance: str | None  # Orthanc ID of the source instance; None for a volume
    extra: dict[str, Any] = field(default_factory=dict)
    companions: tuple[Companion, ...] = ()  # stored after the SR, in this order

    @property
    def sr_instance(self) -> str:
        """The SR's Orthanc ID: as the store sink answered, else as Orthanc computes it."""
        from ..source import orthanc_instance_id

        sr = self.sr
        return self.extra.get("sr_instance") or orthanc_instance_id(
            str(sr.get("PatientID", "")), str(sr.StudyInstanceUID), str(sr.SeriesInstanceUID),
            str(sr.SOPInstanceUID))


class ResultSink(Protocol):
    """A destination for reports; raises ``JobOutcome`` errors like any stage."""

    name: str

    def deliver(self, report: Report) -> dict[str, Any]:
        """Deliver one report; what it returns is added to the job's result."""
