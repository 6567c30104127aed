"""The real-world corpus: every file of pydicom's test data and of pydicom-data.

Each file is sent by C-STORE (dcmtk's storescu, proposing its own SOP class
and transfer syntax), or uploaded over REST when C-STORE cannot carry it.
Every file Orthanc accepts must end in a visible state (its own job, or the
job of its series for volumes), never crash or hang Orthanc, and never get
an SR unless it is an image a model accepts. The expected outcome of each
file is in ``corpus_expected.json``, so a regression shows by name.

Regenerate the table after a deliberate change with
``ORTHANC_AI_CORPUS_WRITE=1 pytest tests/integration/test_corpus.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_files

from tests.harness import CURRENT, STORESCU, OrthancAI, write_config

EXPECTED = Path(__file__).with_name("corpus_expected.json")
# Where Orthanc 1.13.0 ends a file otherwise than 1.10.1 (and why, in the file).
EXPECTED_CURRENT = Path(__file__).with_name("corpus_expected_current.json")


def corpus_files() -> list[Path]:
    files = []
    for name in sorted(get_testdata_files()):
        path = Path(name)
        if path.suffix.lower() in (".dcm", "") and path.is_file() and path.name != "DICOMDIR":
            files.append(path)
    return files


def file_key(path: Path) -> str:
    """``pydicom/<path>`` for pydicom's own files, ``pydicom-data/<path>`` for the package's."""
    parts = path.parts
    if "test_files" in parts:
        return "pydicom/" + "/".join(parts[parts.index("test_files") + 1 :])
    return "pydicom-data/" + "/".join(parts[parts.index("data_store") + 2 :])


def _sop_uid(path: Path) -> str | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            return str(ds.SOPInstanceUID) if "SOPInstanceUID" in ds else None
        except Exception:
            return None


def send(server: OrthancAI, path: Path) -> str | None:
    """Orthanc's instance ID, or None when Orthanc refuses the file both ways."""
    proc = subprocess.run(
        [STORESCU, "-R", "-aec", "ORTHANC", "127.0.0.1", str(server.dicom_port), str(path)],
        capture_output=True, timeout=120,
    )
    uid = _sop_uid(path)
    if proc.returncode == 0 and uid and (found := server.lookup(uid)):
        return found
    r = server.http.post(server.url + "/instances", data=path.read_bytes(), timeout=120)
    if r.status_code == 200:
        return r.json()["ID"]
    return None


def outcome(server: OrthancAI, instance: str) -> str:
    """``state: reason`` of the instance's job, or of its series' job for volumes."""
    jobs = server.jobs(instance=instance)
    if not jobs:
        series = server.get(f"/instances/{instance}")["ParentSeries"]
        jobs = server.jobs(series=series)
    if not jobs:
        return "no job"
    job = jobs[0]
    if job["state"] == "done":
        return f"done ({job['model']})"
    reason = (job["reason"] or "").split(":")[0]
    return f"{job['state']}: {reason}"


@pytest.fixture(scope="module")
def corpus_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("corpus")
    config = write_config(work / "corpus.json", StableAge=2)
    server = OrthancAI(work / "srv", config=config).start()
    yield server
    server.stop()


def test_every_file_ends_in_a_visible_state(corpus_server):
    server = corpus_server
    sent: dict[str, str] = {}
    refused: list[str] = []
    for path in corpus_files():
        instance = send(server, path)
        if instance is None:
            refused.append(file_key(path))
        else:
            sent[file_key(path)] = instance
    assert server.get("/system")["Version"]  # Orthanc kept serving through all of it
    # Volumes are reported at series level once Orthanc calls them stable.
    import time

    deadline = time.time() + 600
    while time.time() < deadline:
        results = {key: outcome(server, instance) for key, instance in sent.items()}
        pending = [k for k, v in results.items() if v == "no job"
                   or v.startswith(("queued", "running"))]
        if not pending:
            break
        time.sleep(2)
    results = {key: outcome(server, instance) for key, instance in sent.items()}
    results.update({key: "refused by Orthanc" for key in refused})
    if os.environ.get("ORTHANC_AI_CORPUS_WRITE"):
        EXPECTED.write_text(json.dumps(dict(sorted(results.items())), indent=1) + "\n")
    expected = json.loads(EXPECTED.read_text())
    if CURRENT:
        expected.update(json.loads(EXPECTED_CURRENT.read_text())["outcomes"])
    assert results == expected
    assert not [k for k, v in results.items() if v == "no job"]
    # No SR for anything but images a model analysed.
    srs = [j for j in server.jobs(state="done")]
    assert all(j["model"] for j in srs)
