"""The worker's own C-GET (engine.dicom_get): the peer's address, the contexts, and a
retrieval from a pynetdicom Q/R SCP on loopback standing in for the PACS."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, evt, sop_class

from engine import dicom_get
from engine.dicom_get import (
    GET_MODEL,
    MAX_CONTEXTS,
    PeerAddress,
    get_study,
    peer_address,
    requested_contexts,
    storage_roles,
)
from engine.dimse import OrthancDimse, PeerError
from inference.errors import TransientError

# -- DicomModalities ----------------------------------------------------------------


def test_object_form():
    config = {"DicomAet": "OURS", "DicomModalities": {
        "PACS": {"AET": "HOSPPACS", "Host": "127.0.0.1", "Port": 11112,
                 "Manufacturer": "Generic", "AllowGet": True}}}
    assert peer_address(config, "PACS") == PeerAddress("HOSPPACS", "127.0.0.1", 11112, "OURS")


def test_list_form_and_default_aet():
    config = {"DicomModalities": {"PACS": ["HOSPPACS", "127.0.0.1", 4242, "Generic"]}}
    assert peer_address(config, "PACS") == PeerAddress("HOSPPACS", "127.0.0.1", 4242, "ORTHANC")


def test_port_as_a_string_and_local_aet():
    config = {"DicomAet": "OURS", "DicomModalities": {
        "A": ["AAA", "127.0.0.1", "104"],
        "B": {"AET": "BBB", "Host": "127.0.0.1", "Port": "11112", "LocalAet": "FORB"}}}
    assert peer_address(config, "A").port == 104
    assert peer_address(config, "B") == PeerAddress("BBB", "127.0.0.1", 11112, "FORB")


def test_the_object_forms_default_port():
    config = {"DicomModalities": {"P": {"AET": "P", "Host": "127.0.0.1"}}}
    assert peer_address(config, "P").port == 104


def test_unknown_peer_is_a_peer_error_naming_it():
    config = {"DicomModalities": {"PACS": ["HOSPPACS", "127.0.0.1", 4242]}}
    with pytest.raises(PeerError) as err:
        peer_address(config, "ELSEWHERE")
    assert "ELSEWHERE" in err.value.reason and "DicomModalities" in err.value.reason
    assert isinstance(err.value, TransientError)
    with pytest.raises(PeerError, match="NOWHERE"):
        peer_address({}, "NOWHERE")


@pytest.mark.parametrize("entry, what", [
    (["ONLY", "127.0.0.1"], "neither an object nor a list"),
    ("HOSPPACS@127.0.0.1:104", "neither an object nor a list"),
    (["", "127.0.0.1", 104], "no AET"),
    ({"AET": "X", "Port": 104}, "no Host"),
    (["X", "127.0.0.1", 0], "no valid Port"),
    (["X", "127.0.0.1", 70000], "no valid Port"),
    (["X", "127.0.0.1", "port"], "no valid Port"),
    (["X", "127.0.0.1", True], "no valid Port"),
    ({"AET": "X", "Host": "127.0.0.1", "Port": 104, "UseDicomTls": True}, "TLS"),
])
def test_a_broken_entry_is_a_peer_error(entry, what):
    with pytest.raises(PeerError) as err:
        peer_address({"DicomModalities": {"PACS": entry}}, "PACS")
    assert "PACS" in err.value.reason and what in err.value.reason


# -- the contexts -------------------------------------------------------------------

MUST = (
    sop_class.DigitalXRayImageStorageForPresentation,
    sop_class.DigitalXRayImageStorageForProcessing,
    sop_class.ComputedRadiographyImageStorage,
    sop_class.CTImageStorage,
    sop_class.MRImageStorage,
    sop_class.SecondaryCaptureImageStorage,
    sop_class.EnhancedSRStorage,
    sop_class.ComprehensiveSRStorage,
    sop_class.Comprehensive3DSRStorage,
)


def test_the_contexts_fit_one_association_and_hold_the_sop_classes():
    contexts = requested_contexts()
    assert len(contexts) <= MAX_CONTEXTS == 128
    assert contexts[0].abstract_syntax == GET_MODEL
    assert [c.abstract_syntax for c in contexts].count(GET_MODEL) == 1
    offered: dict[str, set[str]] = {}
    for c in contexts[1:]:
        offered.setdefault(c.abstract_syntax, set()).update(c.transfer_syntax)
    for uid in MUST:
        assert uid in offered, uid.name
        assert {ExplicitVRLittleEndian, ImplicitVRLittleEndian} <= offered[uid]
    for uid in MUST[:6]:  # images: as the PACS holds them
        assert {JPEGBaseline8Bit, JPEGLosslessSV1, JPEG2000Lossless, RLELossless} \
            <= offered[uid], uid.name
    # an acceptor picks one transfer syntax a context: each compressed one is its own
    dx = [c for c in contexts if c.abstract_syntax == MUST[0]]
    assert sum(len(c.transfer_syntax) == 1 for c in dx) >= 4


def test_we_ask_to_be_the_storage_scp_of_each_storage_class():
    roles = {r.sop_class_uid: (r.scu_role, r.scp_role) for r in storage_roles()}
    storage = {c.abstract_syntax for c in requested_contexts()[1:]}
    assert set(roles) == storage
    assert set(roles.values()) == {(False, True)}


# -- a retrieval, from a pynetdicom Q/R SCP on loopback -------------------------------


def instance(study: str, ts: str = ExplicitVRLittleEndian,
             sop: str = sop_class.DigitalXRayImageStorageForPresentation) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "SECRET-PATIENT-ID"
    ds.PatientName = "Secret^Name"
    ds.Modality = "DX"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if ts == ExplicitVRLittleEndian:
        ds.PixelData = bytes(range(16))
    else:  # not a real codestream: it is never decoded on the way
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(12)])
        ds["PixelData"].VR = "OB"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    return ds


class FakePacs:
    """A Q/R SCP answering C-GET with ``self.datasets`` (or ``self.status``)."""

    def __init__(self, aet: str = "FAKEPACS", *, get: bool = True) -> None:
        self.datasets: list[Dataset] = []
        self.status: int | None = None  # a final failure instead of sub-operations
        self.stall = threading.Event()  # set: the C-GET waits until released
        self.release = threading.Event()
        self.statuses: list[int] = []
        self.identifiers: list[Dataset] = []
        self.callers: list[str] = []
        ae = AE(aet)
        if get:
            ae.add_supported_context(GET_MODEL)
        else:  # a Q/R SCP without C-GET
            ae.add_supported_context(sop_class.StudyRootQueryRetrieveInformationModelFind)
        everything = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless,
                      JPEGBaseline8Bit, JPEGLosslessSV1, RLELossless]
        for uid in {c.abstract_syntax for c in requested_contexts()[1:]}:
            ae.add_supported_context(uid, everything, scu_role=True, scp_role=True)
        self.ae = ae
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_GET, self._on_get)])
        self.port = self.server.server_address[1]

    def _on_get(self, event: Any) -> Iterator[Any]:
        self.identifiers.append(event.identifier)
        self.callers.append(event.assoc.requestor.ae_title)
        if self.stall.is_set():
            self.release.wait(20)
        if self.status is not None:
            yield 1
            yield self.status, None
            return
        yield len(self.datasets)
        for ds in self.datasets:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, ds

    def config(self, **entry: Any) -> dict[str, Any]:
        return {"DicomAet": "OURS", "DicomModalities": {
            "FAKE": {"AET": "FAKEPACS", "Host": "127.0.0.1", "Port": self.port, **entry}}}

    def close(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.shutdown()
            self.server = None


@pytest.fixture
def pacs():
    fake = FakePacs()
    yield fake
    fake.close()


class Orthanc:
    """``source.store``: what POST /instances would have been given."""

    def __init__(self, fail: bool = False) -> None:
        self.stored: list[bytes] = []
        self.fail = fail

    def store(self, dicom: bytes) -> dict[str, Any]:
        if self.fail:
            raise TransientError("Orthanc REST POST /instances: HTTP 503")
        self.stored.append(dicom)
        return {"ID": f"id-{len(self.stored)}", "Status": "Success"}


def test_a_study_is_fetched_as_encoded_and_handed_to_orthanc(pacs):
    study = generate_uid()
    pacs.datasets = [instance(study), instance(study, JPEG2000Lossless),
                     instance(study, ImplicitVRLittleEndian, sop_class.ComprehensiveSRStorage)]
    pacs.datasets[2].PixelData = None
    del pacs.datasets[2].PixelData
    orthanc = Orthanc()
    assert get_study(pacs.config(), "FAKE", study, orthanc.store, timeout=10) == 3
    query = pacs.identifiers[0]
    assert query.QueryRetrieveLevel == "STUDY" and query.StudyInstanceUID == study
    got = {pydicom.dcmread(io.BytesIO(b)).SOPInstanceUID: pydicom.dcmread(io.BytesIO(b))
           for b in orthanc.stored}
    for sent in pacs.datasets:
        back = got[sent.SOPInstanceUID]
        # a Part 10 file, in the transfer syntax the PACS sent: JPEG 2000 stays JPEG 2000
        # (an uncompressed one the PACS may send in the context's uncompressed syntax)
        if sent.file_meta.TransferSyntaxUID.is_compressed:
            assert back.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        else:
            assert not back.file_meta.TransferSyntaxUID.is_compressed
        assert back.file_meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
        if "PixelData" in sent:
            assert back.PixelData == sent.PixelData


def test_the_calling_ae_title_is_ours(pacs):
    study = generate_uid()
    pacs.datasets = [instance(study)]
    get_study(pacs.config(LocalAet="FORFAKE"), "FAKE", study, Orthanc().store, timeout=10)
    get_study(pacs.config(), "FAKE", study, Orthanc().store, timeout=10)
    assert pacs.callers == ["FORFAKE", "OURS"]


def test_nothing_sent_for_a_study_is_a_peer_error(pacs):
    with pytest.raises(PeerError) as err:
        get_study(pacs.config(), "FAKE", generate_uid(), Orthanc().store, timeout=10)
    assert "FAKE" in err.value.reason and "sent no instance" in err.value.reason


def test_what_orthanc_did_not_store_fails_the_retrieval(pacs):
    study = generate_uid()
    pacs.datasets = [instance(study), instance(study)]
    with pytest.raises(PeerError) as err:
        get_study(pacs.config(), "FAKE", study, Orthanc(fail=True).store, timeout=10)
    reason = err.value.reason
    assert "FAKE" in reason and "2 failed" in reason and "HTTP 503" in reason, reason
    assert "SECRET" not in reason and study not in reason


def test_an_instance_of_another_study_is_refused_and_the_rest_used(pacs, caplog):
    """A partial prior still compares: what was stored is used, the rest logged."""
    study = generate_uid()
    pacs.datasets = [instance(study), instance(generate_uid())]
    orthanc = Orthanc()
    get_study(pacs.config(), "FAKE", study, orthanc.store, timeout=10)
    assert len(orthanc.stored) == 1
    assert "1 failed" in caplog.text and "another study" in caplog.text


def test_a_failure_status_is_a_peer_error(pacs):
    pacs.status = 0xA702
    with pytest.raises(PeerError) as err:
        get_study(pacs.config(), "FAKE", generate_uid(), Orthanc().store, timeout=10)
    assert "0xA702" in err.value.reason and "FAKE" in err.value.reason


def test_the_whole_retrieval_is_bounded_by_the_timeout(pacs):
    pacs.stall.set()
    study = generate_uid()
    pacs.datasets = [instance(study)]
    t0 = time.monotonic()
    with pytest.raises(PeerError) as err:
        get_study(pacs.config(), "FAKE", study, Orthanc().store, timeout=1.5)
    assert time.monotonic() - t0 < 5
    assert "FAKE" in err.value.reason and "did not end within" in err.value.reason


def test_a_rejected_association_names_the_peer(pacs):
    config = pacs.config()
    config["DicomModalities"]["FAKE"]["AET"] = "NOTFAKE"
    pacs.ae.require_called_aet = True
    with pytest.raises(PeerError) as err:
        get_study(config, "FAKE", generate_uid(), Orthanc().store, timeout=5)
    assert "FAKE" in err.value.reason
    assert "rejected" in err.value.reason or "no association" in err.value.reason


def test_a_peer_that_is_down(pacs):
    config = pacs.config()
    pacs.close()
    with pytest.raises(PeerError, match="FAKE.*no association"):
        get_study(config, "FAKE", generate_uid(), Orthanc().store, timeout=5)


def test_a_peer_without_c_get():
    pacs = FakePacs(get=False)
    try:
        with pytest.raises(PeerError, match="FAKE.*does not accept Study Root C-GET"):
            get_study(pacs.config(), "FAKE", generate_uid(), Orthanc().store, timeout=5)
    finally:
        pacs.close()


def test_orthanc_dimse_retrieves_by_c_get_through_its_source(pacs):
    study = generate_uid()
    pacs.datasets = [instance(study)]
    orthanc = Orthanc()
    dimse = OrthancDimse(orthanc, pacs.config())  # type: ignore[arg-type]
    assert dimse.retrieve_study("FAKE", study, "C-GET", timeout=10) is None
    assert len(orthanc.stored) == 1
    with pytest.raises(PeerError, match="OTHER"):
        dimse.retrieve_study("OTHER", study, "C-GET", timeout=10)


def test_pynetdicom_does_not_log_identifiers():
    assert dicom_get._config.LOG_REQUEST_IDENTIFIERS is False
    assert dicom_get._config.LOG_RESPONSE_IDENTIFIERS is False
