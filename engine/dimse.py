"""The DICOM network port: C-FIND, C-MOVE and C-STORE through Orthanc's own client; C-GET.

Orthanc already is the hospital's DICOM application: its ``DicomModalities``
name the peers (AE title, host, port, what they allow), its AE title is the
one the PACS knows, and what a C-MOVE brings arrives through its own
C-STORE server. So the worker asks Orthanc (``/modalities/{peer}/query``,
``/move``, ``/store`` over loopback) instead of opening associations of its
own: one configuration, one AE title, every association in Orthanc's log,
and the same on every node.

C-GET is the exception: Orthanc 1.10 (Debian 12) has no C-GET client, so
:mod:`engine.dicom_get` opens that association with pynetdicom, from the
same ``DicomModalities`` entry and with Orthanc's AE title, and posts each
instance it receives to Orthanc.

Every failure is a :class:`PeerError` (transient: the job retries with
back-off) whose reason names the peer and Orthanc's message, never a query
value (patient data).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from inference.errors import TransientError

from .source import OrthancSource

_POLL = 0.2


class PeerError(TransientError):
    """A peer that is down, refused, or answered with a failure."""


def _reason(status: int, body: Any) -> str:
    if isinstance(body, dict):
        parts = [str(body.get("Message") or ""), str(body.get("Details") or "")]
        text = ": ".join(p for p in parts if p)
    else:
        text = str(body or "")
    return f"HTTP {status}" + (f", {' '.join(text.split())[:200]}" if text else "")


class OrthancDimse:
    def __init__(self, source: OrthancSource,
                 configuration: Mapping[str, Any] | None = None) -> None:
        self.source = source
        # Orthanc's configuration (the worker's boot JSON): DicomModalities and
        # DicomAet, for the C-GET association the worker opens itself.
        self.configuration: Mapping[str, Any] = configuration or {}
        self._aet: str | None = None

    def peer_aet(self, peer: str) -> str:
        """The AE title of a DicomModalities entry ("" when unknown here)."""
        modalities = self.configuration.get("DicomModalities") or {}
        entry = modalities.get(peer) if isinstance(modalities, Mapping) else None
        if isinstance(entry, Mapping):
            return str(entry.get("AET") or "").strip()
        if isinstance(entry, list | tuple) and entry:
            return str(entry[0]).strip()
        return ""

    def own_aet(self) -> str:
        """Our Orthanc's AE title: the C-MOVE destination the PACS must know."""
        if self._aet is None:
            self._aet = str(self.source.get_json("/system")["DicomAet"])
        return self._aet

    def _post(self, peer: str, what: str, path: str, body: dict[str, Any],
              timeout: float) -> Any:
        # Orthanc's DICOM timeout is per message; the HTTP one bounds the whole call.
        status, answer = self.source.call("POST", path,
                                          {**body, "Timeout": max(1, round(timeout))},
                                          timeout=timeout + 10)
        if status == 404:
            raise PeerError(f"{what} {peer}: {_reason(status, answer)} (no such "
                            "DicomModalities entry, route or resource in this Orthanc)")
        if status >= 400:
            raise PeerError(f"{what} {peer} failed: {_reason(status, answer)}")
        return answer

    def find(self, peer: str, level: str, query: dict[str, str], timeout: float
             ) -> list[dict[str, str]]:
        """C-FIND (Study Root); the answers' tags by keyword."""
        created = self._post(peer, "C-FIND to", f"/modalities/{peer}/query",
                             {"Level": level, "Query": query, "Normalize": False}, timeout)
        qid = created.get("ID") if isinstance(created, dict) else None
        if not qid:
            raise PeerError(f"C-FIND to {peer}: Orthanc gave no query ID")
        try:
            status, answers = self.source.call("GET", f"/queries/{qid}/answers?expand&simplify")
            if status >= 400 or not isinstance(answers, list):
                raise PeerError(f"C-FIND to {peer}: answers unreadable "
                                f"({_reason(status, answers)})")
            return [{str(k): ("" if v is None else str(v) if not isinstance(v, list) else
                              "\\".join(str(x) for x in v)) for k, v in a.items()}
                    for a in answers if isinstance(a, dict)]
        finally:
            try:
                self.source.call("DELETE", f"/queries/{qid}")
            except TransientError:
                pass

    def retrieve_study(self, peer: str, study_uid: str, method: str, timeout: float) -> None:
        """C-MOVE the study to our own AE (or C-GET it); returns when it is stored."""
        if method == "C-GET":
            from .dicom_get import get_study  # pynetdicom: only where a source needs it

            get_study(self.configuration, peer, study_uid, self.source.store, timeout)
            return
        body: dict[str, Any] = {"Level": "Study", "Resources": [{"StudyInstanceUID": study_uid}],
                                "Asynchronous": True, "TargetAet": self.own_aet()}
        path, what = f"/modalities/{peer}/move", "C-MOVE from"
        started = self._post(peer, what, path, body, timeout)
        job = started.get("ID") if isinstance(started, dict) else None
        if not job:  # an Orthanc that ran it synchronously: it is over
            return
        self._wait_job(job, peer, what, time.monotonic() + timeout)

    def _wait_job(self, job: str, peer: str, what: str, until: float) -> None:
        while True:
            status, info = self.source.call("GET", f"/jobs/{job}")
            if status >= 400 or not isinstance(info, dict):
                raise PeerError(f"{what} {peer}: its Orthanc job vanished ({status})")
            state = info.get("State")
            if state == "Success":
                return
            if state == "Failure":
                details = info.get("ErrorDetails") or info.get("ErrorDescription") or ""
                raise PeerError(f"{what} {peer} failed: "
                                f"{' '.join(str(details).split())[:200] or 'no details'}")
            if time.monotonic() > until:
                self.source.call("POST", f"/jobs/{job}/cancel", {})
                raise PeerError(f"{what} {peer} did not end in time")
            time.sleep(_POLL)

    def store(self, peer: str, instances: list[str], timeout: float) -> dict[str, Any]:
        """C-STORE Orthanc's instances to the peer, synchronously."""
        answer = self._post(peer, "C-STORE to", f"/modalities/{peer}/store",
                            {"Resources": instances, "Synchronous": True}, timeout)
        if isinstance(answer, dict) and int(answer.get("FailedInstancesCount", 0) or 0):
            raise PeerError(f"C-STORE to {peer}: the peer refused "
                            f"{answer['FailedInstancesCount']} instance(s)")
        return answer if isinstance(answer, dict) else {}
