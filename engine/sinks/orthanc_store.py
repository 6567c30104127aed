"""Store the SR into the Orthanc it came from (``POST /instances`` over loopback)."""

from __future__ import annotations

from typing import Any

from inference.errors import BadInput

from ..source import OrthancSource, orthanc_instance_id
from ..stores import InboxKind, JobStore
from . import Report


class OrthancStoreSink:
    """The SR lands in the source's study; re-storing it answers ``AlreadyStored``
    because its UIDs are derived from the source and the model version."""

    name = "orthanc"

    def __init__(self, source: OrthancSource, store: JobStore) -> None:
        self.source = source
        self.store = store

    def deliver(self, report: Report) -> dict[str, Any]:
        sr = report.sr
        expected = orthanc_instance_id(str(sr.get("PatientID", "")), str(sr.StudyInstanceUID),
                                       str(sr.SeriesInstanceUID), str(sr.SOPInstanceUID))
        # Before the store: the stored-instance event it causes is then no work.
        self.store.mark_triaged([(InboxKind.INSTANCE, expected)])
        answer = self.source.store(report.sr_bytes)
        if answer.get("ParentStudy") not in (None, report.study):
            raise BadInput("the SR was filed under another study than its source")
        if answer.get("ID") != expected:  # Orthanc hashed other values: triage will see it
            self.store.push_inbox([(InboxKind.INSTANCE, str(answer.get("ID")))])
        return {"sr_instance": answer.get("ID"), "sr_status": answer.get("Status")}
