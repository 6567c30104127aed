"""Store the SR into the Orthanc it came from (``POST /instances`` over loopback)."""

from __future__ import annotations

from typing import Any

from inference.errors import BadInput

from ..audit import Audit
from ..audit.messages import SERIOUS_FAILURE
from ..source import OrthancSource, orthanc_instance_id
from ..stores import InboxKind, JobStore
from . import Report


class OrthancStoreSink:
    """The SR lands in the source's study; re-storing it answers ``AlreadyStored``
    because its UIDs are derived from the source and the model version."""

    name = "orthanc"

    def __init__(self, source: OrthancSource, store: JobStore, audit: Audit | None = None
                 ) -> None:
        self.source = source
        self.store = store
        self.audit = audit or Audit()

    def deliver(self, report: Report) -> dict[str, Any]:
        sr = report.sr
        expected = orthanc_instance_id(str(sr.get("PatientID", "")), str(sr.StudyInstanceUID),
                                       str(sr.SeriesInstanceUID), str(sr.SOPInstanceUID))
        # Before the store: the stored-instance event it causes is then no work.
        self.store.mark_triaged([(InboxKind.INSTANCE, expected)])
        # Audited: we (the worker) send the SR to Orthanc, which creates it (action C).
        audit, classes = self.audit, {str(sr.SOPClassUID): 1}
        study_uid, patient = str(sr.StudyInstanceUID), str(sr.get("PatientID", ""))
        us, orthanc = audit.us(), audit.peer(audit.aet, "127.0.0.1")
        audit.begin_transfer(us, orthanc, study_uid, patient, sop_classes=classes,
                             description="AI SR stored into Orthanc")
        try:
            answer = self.source.store(report.sr_bytes)
        except Exception as exc:
            audit.transferred(us, orthanc, study_uid, patient, sop_classes=classes, action="C",
                              outcome=SERIOUS_FAILURE, description="AI SR not stored: "
                              f"{getattr(exc, 'reason', None) or type(exc).__name__}")
            raise
        audit.transferred(us, orthanc, study_uid, patient, sop_classes=classes, action="C",
                          description=f"AI SR stored into Orthanc ({answer.get('Status')})")
        if answer.get("ParentStudy") not in (None, report.study):
            raise BadInput("the SR was filed under another study than its source")
        if answer.get("ID") != expected:  # Orthanc hashed other values: triage will see it
            self.store.push_inbox([(InboxKind.INSTANCE, str(answer.get("ID")))])
        return {"sr_instance": answer.get("ID"), "sr_status": answer.get("Status")}
