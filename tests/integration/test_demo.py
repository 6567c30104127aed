"""`make run`'s main job, as a script would run it: `orthanc-ai demo --exit`."""

import subprocess
import sys
from pathlib import Path

from tests.harness import free_port


def test_demo_prints_a_finding_for_every_demo_image(tmp_path):
    cli = str(Path(sys.executable).parent / "orthanc-ai")
    proc = subprocess.run(
        [cli, "demo", "--data", str(tmp_path / "demo"), "--http-port", str(free_port()),
         "--dicom-port", str(free_port()), "--exit", "--patients", "3"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if "explorer.html#study" in line]
    assert len(rows) >= 4  # one row per radiograph (some patients have two views) + the CT
    for row in rows:
        assert "Fracture" in row or "Hemorrhage" in row  # PRESENT or absent
        assert "2.25." in row  # the SR's SOP Instance UID
    assert any("Hemorrhage" in row and " mL" in row for row in rows)  # the volume
    # Two demo patients have a prior on the demo PACS: fetched by C-MOVE, compared.
    compared = [line for line in proc.stdout.splitlines() if " since 20" in line]
    assert len(compared) >= 2 and all("prior from DEMO_PACS" in line for line in compared)
    assert "done to DEMO_PACS" in proc.stdout  # every SR forwarded
    ris = [line for line in proc.stdout.splitlines() if "ORU^R01^ORU_R01" in line]
    assert len(ris) == len(rows) and all("Probability=0." in line for line in ris)
    assert "110100 Application Activity" in proc.stdout  # the audit repository's count
    assert "110103 DICOM Instances Accessed" in proc.stdout
    assert not list(tmp_path.glob("demo/orthanc-db/*.lock"))
