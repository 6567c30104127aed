"""No patient data in logs: no patient's name, ID or birth date in any log or job reason.

The demo runs as `make run` runs it; then a server is sent studies of a
recognisable patient, valid and broken ones (truncated, undecodable, an
unsupported transfer syntax, a non-image object, invalid patient and image
attributes), so that every kind of reason is written. Neither the logs in
the data folders (Orthanc's, the workers', the demo PACS's) nor the JSON of
``/ai/jobs``, ``/ai/health`` and ``/ai/deliveries`` may hold a name, an ID
or a birth date. The SRs and Orthanc's database hold them, by design.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from tests.harness import OrthancAI, free_port

NAME = "ZQXWIDOW^JOSEPHINE"
PATIENT_ID = "ZQX-9431-ID"
BIRTH = "19310317"
# Name parts, the ID (and its halves), the birth date as DICOM and ISO write it.
FORBIDDEN = ("ZQXWIDOW", "JOSEPHINE", PATIENT_ID, "ZQX-9431", "9431-ID", BIRTH, "1931-03-17")


def _logs(folder: Path) -> list[Path]:
    """Every log under ``folder``; not the audit trail (engine/audit), whose
    messages identify the patient by design (PS3.15 A.5, ParticipantObjectID)."""
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not p.name.startswith("audit") and (
                      p.suffix == ".log" or ".log." in p.name
                      or p.parent.name == "orthanc-ai" and p.suffix in ("", ".txt", ".err")))


def _hits(text: str, forbidden: tuple[str, ...] | set[str]) -> list[str]:
    upper = text.upper()
    return [s for s in forbidden if s.upper() in upper]


def _assert_clean(folder: Path, forbidden, extra: dict[str, str] | None = None) -> None:
    logs = _logs(folder)
    assert any(p.name == "orthanc.log" for p in logs), logs
    assert any(p.name.startswith("worker-") for p in logs), logs
    found = []
    for path in logs:
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if _hits(line, forbidden):
                found.append(f"{path.relative_to(folder)}:{n}: {line[:300]}")
    for name, text in (extra or {}).items():
        if _hits(text, forbidden):
            found.append(f"{name}: {_hits(text, forbidden)}")
    assert not found, "patient data in logs or job reasons:\n" + "\n".join(found[:40])


def _patient_strings(files: list[Path]) -> set[str]:
    """Names, IDs and birth dates (both forms) of the patients in these files."""
    out: set[str] = set()
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out |= {str(ds.PatientName), str(ds.PatientID)}
        birth = str(ds.get("PatientBirthDate", "") or "")
        if len(birth) == 8:
            out |= {birth, f"{birth[:4]}-{birth[4:6]}-{birth[6:]}"}
    return {s for s in out if len(s) >= 6}


def test_the_demo_logs_no_patient_data(tmp_path):
    cli = str(Path(sys.executable).parent / "orthanc-ai")
    data = tmp_path / "demo"
    proc = subprocess.run(
        [cli, "demo", "--data", str(data), "--http-port", str(free_port()),
         "--dicom-port", str(free_port()), "--exit", "--patients", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    forbidden = _patient_strings(sorted(data.glob("demo-dicom/*/*.dcm"))
                                 + sorted(data.glob("demo-ct/*/*.dcm"))[:1])
    assert {"PHANTOM^CHILD", "PHANTOM^ADULT", "PHANTOM^HEADCT"} <= forbidden
    _assert_clean(data, forbidden)


# -- hostile studies of one recognisable patient -------------------------------

def _patient(k: int, **dx: object) -> pydicom.Dataset:
    from inference.uids import derived_uid
    from tests.factories import synthetic_dx

    return synthetic_dx(
        7300 + k, fracture=bool(k % 2), age=None, spacing_mm=1.0, patient_id=PATIENT_ID,
        patient_name=NAME, birth_date=BIRTH, study_date="20260110",
        study_uid=derived_uid("npd-study", str(k)),
        series_uid=derived_uid("npd-series", str(k)),
        sop_uid=derived_uid("npd-instance", str(k)),
        **dx,
    )


def _raw(ds: pydicom.Dataset, keyword: str, vr: str, value: bytes) -> None:
    """Put ``value`` as it is into the file: no validation, no conversion."""
    tag = Tag(keyword)
    if len(value) % 2:
        value += b" "
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)  # type: ignore


def hostile(folder: Path) -> dict[str, Path]:
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG2MPML, JPEGBaseline8Bit

    folder.mkdir(parents=True, exist_ok=True)
    cases: dict[str, pydicom.Dataset | bytes] = {}
    cases["valid"] = _patient(0)
    # Attributes of the patient module not valid as DICOM: the SR normalises
    # or leaves them out, with a note naming the keyword.
    bad_birth = _patient(1)
    _raw(bad_birth, "PatientBirthDate", "DA", b"1931-03-17")
    cases["invalid PatientBirthDate"] = bad_birth
    two_ids = _patient(10)
    _raw(two_ids, "PatientID", "LO", f"{PATIENT_ID}\\{PATIENT_ID}".encode())
    cases["PatientID with a backslash"] = two_ids
    long_id = _patient(2)
    _raw(long_id, "PatientID", "LO", (PATIENT_ID + "-" + "9" * 70).encode())
    _raw(long_id, "PatientName", "PN", f"{NAME}^^^^^{NAME}".encode())
    cases["over-long PatientID"] = long_id
    truncated = _patient(3)
    truncated.PixelData = truncated.PixelData[: len(truncated.PixelData) // 2 // 2 * 2]
    cases["truncated pixel data"] = truncated
    garbage = _patient(4)
    garbage.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + NAME.encode() * 40 + b"\xff\xd9"])
    garbage["PixelData"].VR = "OB"
    garbage.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    cases["undecodable JPEG"] = garbage
    mpeg = _patient(5)
    mpeg.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 64])
    mpeg["PixelData"].VR = "OB"
    mpeg.file_meta.TransferSyntaxUID = MPEG2MPML
    cases["unsupported transfer syntax"] = mpeg
    no_pixels = _patient(6)
    del no_pixels.PixelData
    cases["no pixel data"] = no_pixels
    kos = _patient(7)
    del kos.PixelData
    kos.SOPClassUID = kos.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.59"
    cases["non-image object"] = kos
    bad_module = _patient(8)
    _raw(bad_module, "NumberOfFrames", "IS", PATIENT_ID.encode())
    _raw(bad_module, "WindowCenter", "DS", NAME.encode())
    cases["invalid image attributes"] = bad_module
    colour = _patient(11)
    _raw(colour, "PhotometricInterpretation", "CS", b"ZQXWIDOW")
    cases["unknown PhotometricInterpretation"] = colour
    bad_dates = _patient(9)
    _raw(bad_dates, "StudyDate", "DA", BIRTH.encode() + b"X")
    _raw(bad_dates, "PatientAge", "AS", b"ZQX-9431")
    _raw(bad_dates, "PatientSex", "CS", b"ZQXWIDOW")
    cases["invalid dates and age"] = bad_dates

    paths: dict[str, Path] = {}
    for k, (what, ds) in enumerate(cases.items()):
        path = folder / f"{k:02d}.dcm"
        with pydicom.config.disable_value_validation():
            ds.save_as(path, enforce_file_format=True)  # type: ignore[union-attr]
        paths[what] = path
    # A file cut in its header's middle: Orthanc may keep or refuse it.
    whole = paths["valid"].read_bytes()
    cut = folder / "cut.dcm"
    cut.write_bytes(whole[: 132 + 400])
    paths["truncated file"] = cut
    return paths


def _send(server: OrthancAI, path: Path) -> str | None:
    r = server.http.post(server.url + "/instances", data=path.read_bytes(),
                         headers={"Content-Type": "application/dicom"}, timeout=60)
    if r.status_code != 200:
        return None  # Orthanc refused it: no job, nothing to check
    return r.json()["ID"]


def test_hostile_studies_leave_no_patient_data_in_logs_or_jobs(tmp_path):
    paths = hostile(tmp_path / "dicom")
    server = OrthancAI(tmp_path / "srv").start()
    try:
        sent = {what: _send(server, path) for what, path in paths.items()}
        ids = [i for i in sent.values() if i is not None]
        assert len(ids) >= 10, sent
        jobs = server.wait_jobs(ids, timeout=300)
        api = {
            "/ai/jobs": server.http.get(server.url + "/ai/jobs?kind=all&limit=10000",
                                        timeout=30).text,
            "/ai/health": server.http.get(server.url + "/ai/health", timeout=30).text,
            "/ai/deliveries": server.http.get(server.url + "/ai/deliveries", timeout=30).text,
            "/ai/": server.http.get(server.url + "/ai/", timeout=30).text,
        }
        for study in {j["study"] for j in jobs if j["study"]}:
            api[f"/ai/studies/{study}"] = server.http.get(
                server.url + f"/ai/studies/{study}", timeout=30).text
    finally:
        server.stop()
    by_instance = {j["instance"]: j for j in jobs}
    states = {what: by_instance[i]["state"] for what, i in sent.items() if i in by_instance}
    # Reasons were written: the broken inputs failed or were skipped, with one.
    assert states["valid"] == "done", states
    assert {"failed", "skipped"} <= set(states.values()), states
    for what, i in sent.items():
        job = by_instance.get(i)
        if job is not None and job["state"] in ("failed", "skipped"):
            assert job["reason"], (what, job)
    assert json.loads(api["/ai/jobs"])  # the listing is there, and is checked
    _assert_clean(server.data, FORBIDDEN, api)


def test_the_forbidden_strings_would_be_found(tmp_path):
    """The check itself: a log line with a birth date in ISO form is caught."""
    (tmp_path / "orthanc-ai").mkdir()
    (tmp_path / "orthanc.log").write_text("ok\n")
    (tmp_path / "orthanc-ai" / "worker-0.log").write_text(
        f"born {dt.date(1931, 3, 17).isoformat()}\n")
    with pytest.raises(AssertionError, match="worker-0.log:1"):
        _assert_clean(tmp_path, FORBIDDEN)
