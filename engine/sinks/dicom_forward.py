"""Forward each SR by C-STORE to the ``AI.Forward.Destinations`` (DicomModalities names).

The SR's companions (the GSPS and KOS that show its finding in viewers
without SR support, ``inference.presentation``) travel with it, on the same
association, in the same job. The sink only records one *forward job* per
(destination, SR) in the job store: durable, so nothing is lost across a
restart or a ``kill -9``, and keyed, so an SR made twice (a rerun, a
revision's second writer) is sent once. The job is run like any other:
claimed with a lease, retried with back-off while the destination is down
(``AI.Forward`` retry keys), and done once Orthanc's C-STORE was
acknowledged; a done job is never sent again. A worker killed between the
acknowledgement and the job's end sends it once more: the same SOP Instance
UIDs, which a PACS keeps once.

Priors fetched for comparison are never forwarded, nor are their SRs.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from inference.errors import SkipInput, TransientError

from ..deliveries import destination_of, forward_key
from ..source import InstanceGone
from ..stores import Job, JobKind, NewJob
from ..stores.base import iso
from . import Report

if TYPE_CHECKING:
    from ..context import Context


class DicomForwardSink:
    name = "forward"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def deliver(self, report: Report) -> dict[str, Any]:
        from ..priors import is_prior

        destinations = self.ctx.config.forward.destinations
        if not destinations:
            return {}
        if is_prior(self.ctx, report.study):
            return {"forward": "not forwarded: a prior fetched for comparison"}
        sr = report.sr
        sr_id = report.sr_instance
        queued = {}
        for destination in destinations:
            key = forward_key(destination, str(sr.SOPInstanceUID))
            job = self.ctx.ledger.record(NewJob(
                sr_id, report.study, report.series, model=report.card.id,
                version=report.card.version, kind=JobKind.FORWARD, key=key))
            queued[destination] = "queued" if job is not None else "already queued"
        return {"forward": queued}


def run(ctx: Context, job: Job) -> None:
    """Send one SR to one destination; done once the C-STORE is acknowledged."""
    destination, uid = destination_of(job)
    forward = ctx.config.forward
    with ctx.ledger.outcome(job, policy=forward) as done:
        if destination not in forward.destinations:
            raise SkipInput(f"{destination} is no longer in AI.Forward.Destinations")
        try:
            ctx.source.instance(job.instance)
        except InstanceGone as exc:
            raise SkipInput("the SR was deleted from Orthanc before it could be sent") from exc
        companions = companions_of(ctx, uid)
        answer = ctx.dimse.store(destination, [job.instance, *companions],
                                 forward.timeout_seconds)
        done({"destination": destination, "sr_instance": job.instance,
              "sr_sop_instance_uid": uid, "companions": companions,
              "remote_aet": answer.get("RemoteAet"), "delivered": iso(time.time())}, None)


def companions_of(ctx: Context, sr_sop_uid: str) -> list[str]:
    """Orthanc IDs of the SR's GSPS and KOS that Orthanc holds, in the order they were
    stored (their SOP Instance UIDs follow from the SR's: inference.presentation)."""
    from inference.presentation import companion_sop_uids

    found = []
    for sop_uid in companion_sop_uids(sr_sop_uid):
        status, answer = ctx.source.call("POST", "/tools/lookup", sop_uid)
        if status >= 400 or not isinstance(answer, list):
            raise TransientError(f"Orthanc could not look up the SR's companions "
                                 f"(HTTP {status})")
        found += [a["ID"] for a in answer if a.get("Type") == "Instance" and a.get("ID")]
    return found
