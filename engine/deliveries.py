"""Deliveries (forward and HL7 jobs) as the REST API shows them (light: Orthanc's
process imports it)."""

from __future__ import annotations

import hashlib
from typing import Any

from .stores import Job, JobKind


def forward_key(destination: str, sr_sop_uid: str) -> str:
    return f"forward:{destination}:{sr_sop_uid}"


def destination_of(job: Job) -> tuple[str, str]:
    """(destination, SR SOP Instance UID) of a forward job (UIDs hold no ':')."""
    destination, _, uid = job.key.removeprefix("forward:").rpartition(":")
    return destination, uid


def hl7_key(host: str, port: int, sr_sop_uid: str) -> str:
    return f"hl7:{host}:{port}:{sr_sop_uid}"


def hl7_destination_of(job: Job) -> tuple[str, int, str]:
    """(host, port, SR SOP Instance UID) of an HL7 job (the host may hold ':', IPv6)."""
    rest, _, uid = job.key.removeprefix("hl7:").rpartition(":")
    host, _, port = rest.rpartition(":")
    return host, int(port) if port.isdigit() else 0, uid


def hl7_control_id(sr_sop_uid: str) -> str:
    """MSH-10 of the ORU for an SR: the same for every resend of it (20 characters)."""
    return hashlib.sha256(sr_sop_uid.encode("ascii", "replace")).hexdigest()[:20].upper()


def deliveries(jobs: list[Job]) -> list[dict[str, Any]]:
    out = []
    for job in jobs:
        extra: dict[str, Any] = {}
        if job.kind == JobKind.HL7:
            host, port, uid = hl7_destination_of(job)
            destination = f"HL7 {host}:{port}"
            extra = {"control_id": hl7_control_id(uid), "ack": (job.result or {}).get("ack")}
        else:
            destination, uid = destination_of(job)
        j = job.as_json()
        out.append({"id": job.id, "kind": job.kind, "destination": destination,
                    "sr_sop_instance_uid": uid, "sr_instance": job.instance,
                    "study": job.study, "state": job.state, "attempts": job.attempts,
                    "next_attempt": j["next_attempt"], "reason": job.reason,
                    "created": j["created"], "updated": j["updated"],
                    "delivered": (job.result or {}).get("delivered"), **extra})
    return out
