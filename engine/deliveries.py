"""Forward jobs as the REST API shows them (light: Orthanc's process imports it)."""

from __future__ import annotations

from typing import Any

from .stores import Job


def forward_key(destination: str, sr_sop_uid: str) -> str:
    return f"forward:{destination}:{sr_sop_uid}"


def destination_of(job: Job) -> tuple[str, str]:
    """(destination, SR SOP Instance UID) of a forward job (UIDs hold no ':')."""
    destination, _, uid = job.key.removeprefix("forward:").rpartition(":")
    return destination, uid


def deliveries(jobs: list[Job]) -> list[dict[str, Any]]:
    out = []
    for job in jobs:
        destination, uid = destination_of(job)
        j = job.as_json()
        out.append({"id": job.id, "destination": destination, "sr_sop_instance_uid": uid,
                    "sr_instance": job.instance, "study": job.study, "state": job.state,
                    "attempts": job.attempts, "next_attempt": j["next_attempt"],
                    "reason": job.reason, "created": j["created"], "updated": j["updated"],
                    "delivered": (job.result or {}).get("delivered")})
    return out
