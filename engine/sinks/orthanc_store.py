"""Store the SR, then its companions (GSPS, KOS), into the Orthanc it came from
(``POST /instances`` over loopback)."""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset

from inference.errors import BadInput

from ..audit import Audit
from ..audit.messages import SERIOUS_FAILURE
from ..source import OrthancSource, orthanc_instance_id
from ..stores import InboxKind, JobStore
from . import Report


class OrthancStoreSink:
    """The SR and its companions land in the source's study; re-storing them answers
    ``AlreadyStored`` because their UIDs are derived from the source and the model
    version. Each is marked triaged before, and audited like the SR."""

    name = "orthanc"

    def __init__(self, source: OrthancSource, store: JobStore, audit: Audit | None = None
                 ) -> None:
        self.source = source
        self.store = store
        self.audit = audit or Audit()

    def deliver(self, report: Report) -> dict[str, Any]:
        answer = self._store(report, report.sr, report.sr_bytes, "AI SR")
        result = {"sr_instance": answer.get("ID"), "sr_status": answer.get("Status")}
        if report.companions:  # after the SR, which the KOS references; the GSPS first
            result["companions"] = []
            for companion in report.companions:
                what = _WHAT.get(str(companion.dataset.get("Modality")), "AI object")
                answer = self._store(report, companion.dataset, companion.data, what)
                result["companions"].append(answer.get("ID"))
        return result

    def _store(self, report: Report, ds: Dataset, data: bytes, what: str) -> dict[str, Any]:
        expected = orthanc_instance_id(str(ds.get("PatientID", "")), str(ds.StudyInstanceUID),
                                       str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        # Before the store: the stored-instance event it causes is then no work.
        self.store.mark_triaged([(InboxKind.INSTANCE, expected)])
        # Audited: we (the worker) send it to Orthanc, which creates it (action C).
        audit, classes = self.audit, {str(ds.SOPClassUID): 1}
        study_uid, patient = str(ds.StudyInstanceUID), str(ds.get("PatientID", ""))
        us, orthanc = audit.us(), audit.peer(audit.aet, "127.0.0.1")
        audit.begin_transfer(us, orthanc, study_uid, patient, sop_classes=classes,
                             description=f"{what} stored into Orthanc")
        try:
            answer = self.source.store(data)
        except Exception as exc:
            audit.transferred(us, orthanc, study_uid, patient, sop_classes=classes, action="C",
                              outcome=SERIOUS_FAILURE, description=f"{what} not stored: "
                              f"{getattr(exc, 'reason', None) or type(exc).__name__}")
            raise
        audit.transferred(us, orthanc, study_uid, patient, sop_classes=classes, action="C",
                          description=f"{what} stored into Orthanc ({answer.get('Status')})")
        if answer.get("ParentStudy") not in (None, report.study):
            raise BadInput(f"the {what} was filed under another study than its source")
        if answer.get("ID") != expected:  # Orthanc hashed other values: triage will see it
            self.store.push_inbox([(InboxKind.INSTANCE, str(answer.get("ID")))])
        return answer


_WHAT = {"PR": "AI presentation state", "KO": "AI key object selection"}
