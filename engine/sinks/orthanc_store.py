"""Store the SR into the Orthanc it came from (``POST /instances`` over loopback)."""

from __future__ import annotations

from typing import Any

from inference.errors import BadInput

from ..source import OrthancSource
from . import Report


class OrthancStoreSink:
    """The SR lands in the source's study; re-storing it answers ``AlreadyStored``
    because its UIDs are derived from the source and the model version."""

    name = "orthanc"

    def __init__(self, source: OrthancSource) -> None:
        self.source = source

    def deliver(self, report: Report) -> dict[str, Any]:
        answer = self.source.store(report.sr_bytes)
        if answer.get("ParentStudy") not in (None, report.study):
            raise BadInput("the SR was filed under another study than its source")
        return {"sr_instance": answer.get("ID"), "sr_status": answer.get("Status")}
