"""C-GET of a study from a PACS with pynetdicom, each instance stored into Orthanc.

Orthanc 1.10 (Debian 12) has no C-GET client (``POST /modalities/{id}/get``
came with 1.12), so for the sources whose ``AI.Priors.RetrieveMethod`` is
``"C-GET"`` the worker opens the association itself. It uses what Orthanc
uses: the peer's AE title, host and port from Orthanc's ``DicomModalities``
(object or list form), and Orthanc's ``DicomAet`` (or the entry's
``LocalAet``) as the calling AE title. A C-GET needs no C-MOVE destination:
the PACS sends the images back as C-STORE sub-operations on the same
association, which is why it works with a PACS that does not know our AE.

Each instance is posted to Orthanc (``POST /instances``) as it was encoded
on the wire (the file meta information added, nothing decoded or
re-encoded), and only then answered: 0x0000 when Orthanc stored it, 0xA700
otherwise, so the PACS counts what we could not keep as failed.

Every failure is a :class:`engine.dimse.PeerError` naming the peer and what
went wrong (rejection, abort, time-out, the final status, how many
sub-operations failed); never a value of a dataset.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread
from pydicom import uid as tsuid
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, build_context, build_role, evt, sop_class
from pynetdicom.presentation import PresentationContext

from .dimse import PeerError

log = logging.getLogger("orthanc_ai")

# pynetdicom logs each request identifier (a study UID here) at INFO; a worker's
# log holds reasons, not identifiers.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
if logging.getLogger("pynetdicom").level == logging.NOTSET:
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)

GET_MODEL = sop_class.StudyRootQueryRetrieveInformationModelGet

UNCOMPRESSED = (tsuid.ExplicitVRLittleEndian, tsuid.ImplicitVRLittleEndian,
                tsuid.ExplicitVRBigEndian)
# Each in a context of its own: an acceptor picks one transfer syntax per
# context, so a PACS holding JPEG 2000 and JPEG lossless images can send
# each as it is stored (or, where it cannot, decompressed in the first one).
COMPRESSED = (tsuid.JPEGBaseline8Bit, tsuid.JPEGExtended12Bit, tsuid.JPEGLosslessSV1,
              tsuid.JPEGLossless, tsuid.JPEGLSLossless, tsuid.JPEG2000Lossless,
              tsuid.JPEG2000, tsuid.RLELossless)
NOT_IMAGES_TS = (*UNCOMPRESSED, tsuid.DeflatedExplicitVRLittleEndian)

# What a prior of our models' inputs may hold: the images, and what a PACS
# keeps beside them (our own SRs among them).
IMAGE_STORAGE = (
    sop_class.ComputedRadiographyImageStorage,
    sop_class.DigitalXRayImageStorageForPresentation,
    sop_class.DigitalXRayImageStorageForProcessing,
    sop_class.CTImageStorage,
    sop_class.EnhancedCTImageStorage,
    sop_class.MRImageStorage,
    sop_class.EnhancedMRImageStorage,
    sop_class.SecondaryCaptureImageStorage,
    sop_class.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    sop_class.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    sop_class.MultiFrameTrueColorSecondaryCaptureImageStorage,
)
OTHER_STORAGE = (
    sop_class.BasicTextSRStorage,
    sop_class.EnhancedSRStorage,
    sop_class.ComprehensiveSRStorage,
    sop_class.Comprehensive3DSRStorage,
    sop_class.XRayRadiationDoseSRStorage,
    sop_class.KeyObjectSelectionDocumentStorage,
    sop_class.GrayscaleSoftcopyPresentationStateStorage,
    sop_class.EncapsulatedPDFStorage,
)
MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are the odd numbers 1..255

# Our answer to a C-STORE sub-operation Orthanc did not store: Refused, out of resources.
STORE_FAILED = 0xA700

_FINAL = {
    0xA701: "refused: out of resources (number of matches)",
    0xA702: "refused: out of resources (sub-operations)",
    0xA900: "identifier does not match SOP class",
    0xAA00: "none of the frames requested were found",
    0xFE00: "cancelled",
    0xB000: "sub-operations complete, one or more failures or warnings",
}


@dataclass(frozen=True)
class PeerAddress:
    aet: str
    host: str
    port: int
    calling_aet: str  # ours: the entry's LocalAet, else Orthanc's DicomAet


def peer_address(configuration: Mapping[str, Any], peer: str) -> PeerAddress:
    """``DicomModalities[peer]`` of Orthanc's configuration: ``{"AET", "Host",
    "Port", ...}`` or ``[aet, host, port, (manufacturer)]``, as Orthanc reads it."""
    modalities = configuration.get("DicomModalities") or {}
    entry = modalities.get(peer) if isinstance(modalities, Mapping) else None
    if entry is None:
        raise PeerError(f"C-GET from {peer}: not a DicomModalities entry of this "
                          "Orthanc's configuration")
    local = ""
    if isinstance(entry, Mapping):
        if entry.get("UseDicomTls"):
            raise PeerError(f"C-GET from {peer}: its DicomModalities entry asks for DICOM "
                              "TLS, which the worker's C-GET does not do")
        aet, host, port = entry.get("AET"), entry.get("Host"), entry.get("Port", 104)
        local = str(entry.get("LocalAet") or "")
    elif isinstance(entry, list | tuple) and len(entry) >= 3:
        aet, host, port = entry[0], entry[1], entry[2]
    else:
        raise PeerError(f"C-GET from {peer}: its DicomModalities entry is neither an "
                          "object nor a list [AET, host, port]")
    if not isinstance(aet, str) or not aet.strip():
        raise PeerError(f"C-GET from {peer}: its DicomModalities entry has no AET")
    if not isinstance(host, str) or not host.strip():
        raise PeerError(f"C-GET from {peer}: its DicomModalities entry has no Host")
    if isinstance(port, str) and port.strip().isdigit():
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise PeerError(f"C-GET from {peer}: its DicomModalities entry has no valid Port")
    calling = local or str(configuration.get("DicomAet") or "ORTHANC")
    return PeerAddress(aet.strip(), host.strip(), port, calling.strip())


def requested_contexts() -> list[PresentationContext]:
    """The Study Root C-GET context, then the storage contexts we are the SCP of."""
    contexts = [build_context(GET_MODEL, [tsuid.ExplicitVRLittleEndian,
                                          tsuid.ImplicitVRLittleEndian])]
    for abstract in IMAGE_STORAGE:
        contexts.append(build_context(abstract, list(UNCOMPRESSED)))
        contexts += [build_context(abstract, ts) for ts in COMPRESSED]
    contexts += [build_context(abstract, list(NOT_IMAGES_TS)) for abstract in OTHER_STORAGE]
    assert len(contexts) <= MAX_CONTEXTS
    return contexts


def storage_roles() -> list[Any]:
    """SCP/SCU role selection: the PACS is the storage SCU, we are its SCP."""
    return [build_role(abstract, scp_role=True, scu_role=False)
            for abstract in (*IMAGE_STORAGE, *OTHER_STORAGE)]


@dataclass
class _Received:
    stored: int = 0
    refused: int = 0
    first_refusal: str = ""


def _stored(answer: Any) -> bool:
    if not isinstance(answer, Mapping):
        return False
    status = answer.get("Status")
    return status in ("Success", "AlreadyStored") or (status is None and bool(answer.get("ID")))


def _why(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return " ".join(str(reason).split())[:160] if reason else type(exc).__name__


def _study_of(data: bytes) -> str:
    """The StudyInstanceUID of an encoded instance, read without its pixel data."""
    ds = dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
    return str(ds.get("StudyInstanceUID", "")).strip("\x00 ")


def get_study(configuration: Mapping[str, Any], peer: str, study_uid: str,
              store: Callable[[bytes], Any], timeout: float) -> int:
    """C-GET one study (Study Root, STUDY level) from ``peer``; each instance goes
    to ``store`` (Orthanc's ``POST /instances``). The number stored; PeerError else."""
    address = peer_address(configuration, peer)
    where = f"{peer} ({address.aet}@{address.host}:{address.port})"
    deadline = time.monotonic() + timeout
    got = _Received()

    def on_store(event: Any) -> int:
        try:
            data = event.encoded_dataset()
            if _study_of(data) != study_uid.strip():  # it would be taken for a current study
                got.refused += 1
                got.first_refusal = got.first_refusal or "an instance of another study"
                return STORE_FAILED
            answer = store(data)
        except Exception as exc:  # Orthanc refused or is away: the PACS counts it failed
            got.refused += 1
            got.first_refusal = got.first_refusal or _why(exc)
            return STORE_FAILED
        if not _stored(answer):
            got.refused += 1
            got.first_refusal = got.first_refusal or "Orthanc did not store it"
            return STORE_FAILED
        got.stored += 1
        return 0x0000

    ae = AE(ae_title=address.calling_aet)
    limit = max(1.0, timeout)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = limit
    ae.connection_timeout = min(limit, 30.0)
    ae.maximum_pdu_size = 0  # no limit: the PACS sends PDUs as large as it likes
    try:
        assoc = ae.associate(address.host, address.port, contexts=requested_contexts(),
                             ae_title=address.aet, ext_neg=storage_roles(),
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    except Exception as exc:  # e.g. a host name that does not resolve
        raise PeerError(f"C-GET from {where}: no association ({type(exc).__name__})") from exc
    if not assoc.is_established:
        raise PeerError(f"C-GET from {where}: {_not_established(assoc)}")
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        if assoc.is_established:
            assoc.abort()
        assoc.dimse.msg_queue.put((None, None))  # wake the wait for the next response

    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), expire)
    watchdog.daemon = True
    try:
        _check_contexts(assoc, where)
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        watchdog.start()
        final: Dataset | None = None
        for status, _identifier in assoc.send_c_get(query, GET_MODEL):
            final = status
            if expired.is_set():
                break
        if expired.is_set():
            raise PeerError(f"C-GET from {where} did not end within {timeout:.3g} s "
                            f"({got.stored} instance(s) stored so far); aborted")
        _check_final(final, got, where, assoc)
    finally:
        watchdog.cancel()
        if assoc.is_established:
            try:
                assoc.release()
            except Exception:  # the peer went away as we left: nothing to release
                assoc.abort()
    log.info("orthanc-ai: C-GET from %s: %d instance(s) stored", peer, got.stored)
    return got.stored


def _not_established(assoc: Any) -> str:
    if assoc.is_rejected:
        primitive = getattr(assoc.acceptor, "primitive", None)
        why = ""
        if primitive is not None:
            try:
                why = f" by the {primitive.source_str.lower()}: {primitive.reason_str}"
            except Exception:  # an unlisted reason code
                why = f" (reason {getattr(primitive, 'diagnostic', '?')})"
        return f"association rejected{why}"
    # pynetdicom reports a refused or timed-out connection as an abort too
    return "no association (the connection was refused, not answered in time, or aborted)"


def _check_contexts(assoc: Any, where: str) -> None:
    accepted = assoc.accepted_contexts
    if not any(c.abstract_syntax == GET_MODEL for c in accepted):
        raise PeerError(f"C-GET from {where}: the peer does not accept Study Root "
                          "C-GET (presentation context refused)")
    if not any(c.as_scp and c.abstract_syntax != GET_MODEL for c in accepted):
        raise PeerError(f"C-GET from {where}: the peer accepted no storage presentation "
                          "context with us as its SCP, so it cannot send the images back")


def _count(status: Dataset, keyword: str) -> int:
    value = status.get(keyword)
    try:
        return int(value) if value is not None else 0
    except (TypeError, ValueError):
        return 0


def _check_final(final: Dataset | None, got: _Received, where: str, assoc: Any) -> None:
    if final is None or "Status" not in final:
        what = "the association was aborted" if assoc.is_aborted else \
            "the peer did not answer in time, or answered something invalid"
        raise PeerError(f"C-GET from {where}: {what} ({got.stored} instance(s) stored)")
    code = int(final.Status)
    completed = _count(final, "NumberOfCompletedSuboperations")
    failed = _count(final, "NumberOfFailedSuboperations")
    warning = _count(final, "NumberOfWarningSuboperations")
    ours = f"; Orthanc did not store {got.refused}: {got.first_refusal}" if got.refused else ""
    if got.stored and code in (0x0000, 0xB000):
        if failed or warning or got.refused:  # a partial prior still compares
            log.warning("orthanc-ai: C-GET from %s: %d stored, %d failed, %d warning "
                        "sub-operation(s)%s", where, got.stored, failed, warning, ours)
        return
    if code != 0x0000 or failed or warning or got.refused:
        meaning = _FINAL.get(code) or ("unable to process" if 0xC000 <= code <= 0xCFFF
                                       else "failure" if code else "success")
        raise PeerError(f"C-GET from {where} ended with status 0x{code:04X} ({meaning}): "
                          f"{completed} completed, {failed} failed, {warning} warning "
                          f"sub-operation(s){ours}")
    if got.stored == 0:
        raise PeerError(f"C-GET from {where}: the peer answered success but sent no "
                          f"instance ({completed} completed sub-operation(s))")

