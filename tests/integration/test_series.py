"""Volumes: a head CT series analysed when stable, late images revise the report."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from inference.uids import derived_uid
from tests.dicom_tools import dciodvfy_errors
from tests.harness import OrthancAI, write_config
from training.synthetic.ct import write_ct_series
from training.synthetic.headct import sample_head, true_volume_ml

MODEL = "head-ct-haemorrhage"


@pytest.fixture(scope="module")
def ct_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("ct")
    server = OrthancAI(work / "srv", config=write_config(work / "c.json", StableAge=2)).start()
    yield server
    server.stop()


def ct_series(folder, seed: int, haemorrhage: bool) -> tuple[list, float]:
    rng = np.random.default_rng(seed)
    head = sample_head(rng, haemorrhage=haemorrhage, age_years=70.0, sex="M",
                       lesion_kind="iph" if haemorrhage else None,
                       volume_ml=20.0 if haemorrhage else None)
    files = list(write_ct_series(
        head, folder, slice_thickness_mm=5.0, pixel_spacing_mm=0.9, rows=256, cols=256,
        patient_id=f"CT{seed}", patient_name=f"HEAD^CT{seed}", patient_sex="M",
        patient_age_years=70.0, study_uid=derived_uid("ct-study", str(seed)),
        series_uid=derived_uid("ct-series", str(seed)),
    ))
    return files, true_volume_ml(head) if haemorrhage else 0.0


def series_jobs(server: OrthancAI, series: str, n: int, timeout: float = 300) -> list[dict]:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        jobs = [j for j in server.jobs(series=series) if j["level"] == "series"]
        if len(jobs) >= n and all(j["state"] in ("done", "skipped", "failed", "dead")
                                  for j in jobs):
            return jobs
        time.sleep(0.5)
    raise TimeoutError(f"{server.jobs(series=series)}\n{server.log_tail()}")


def test_haemorrhage_series_reported_with_volume_then_revised_by_a_late_slice(
    ct_server, tmp_path
):
    files, truth_ml = ct_series(tmp_path / "bleed", 51, haemorrhage=True)
    ct_server.storescu(files[:-1])
    first_slice = ct_server.lookup(str(pydicom.dcmread(files[0]).SOPInstanceUID))
    series = ct_server.get(f"/instances/{first_slice}")["ParentSeries"]
    (job,) = series_jobs(ct_server, series, 1)
    assert job["state"] == "done", job
    assert job["model"] == MODEL
    result = job["result"]
    assert result["positive"] is True
    assert result["slices"] == len(files) - 1
    assert result["volume_ml"] == pytest.approx(truth_ml, rel=0.6, abs=3.0)
    assert result["summary"] == (f"{result['finding']} present, probability "
                                 f"{result['probability']:.2f}, volume "
                                 f"{result['volume_ml']:.1f} mL")
    # CT slices have no jobs of their own: the series job speaks for them.
    assert not ct_server.jobs(instance=first_slice)

    sr_path = tmp_path / "sr1.dcm"
    sr_path.write_bytes(ct_server.get_bytes(f"/instances/{result['sr_instance']}/file"))
    assert dciodvfy_errors(sr_path) == []
    sr = pydicom.dcmread(sr_path)
    text = str(sr)
    assert "Volume" in text and "mL" in text and "50960005" in text  # SNOMED Hemorrhage
    key_uid = ct_server.get(f"/instances/{result['key_instance']}")["MainDicomTags"][
        "SOPInstanceUID"]
    assert key_uid in text  # the region is drawn on the key slice

    ct_server.storescu(files[-1:])  # a late image
    jobs = series_jobs(ct_server, series, 2)
    revised = next(j for j in jobs if j["id"] != job["id"])
    assert revised["state"] == "done"
    assert revised["result"]["slices"] == len(files)
    assert revised["result"]["predecessor_sr"] == result["sr_sop_instance_uid"]
    new_sr = pydicom.dcmread(io.BytesIO(
        ct_server.get_bytes(f"/instances/{revised['result']['sr_instance']}/file")))
    predecessor = new_sr.PredecessorDocumentsSequence[0]
    referenced = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == result["sr_sop_instance_uid"]
    assert new_sr.SOPInstanceUID != sr.SOPInstanceUID
    assert new_sr.SeriesInstanceUID == sr.SeriesInstanceUID  # revisions share a series
    assert ct_server.get_bytes(f"/instances/{result['sr_instance']}/file")  # first SR kept


def test_normal_head_is_reported_negative(ct_server, tmp_path):
    files, _ = ct_series(tmp_path / "normal", 52, haemorrhage=False)
    ct_server.storescu(files)
    instance = ct_server.lookup(str(pydicom.dcmread(files[0]).SOPInstanceUID))
    series = ct_server.get(f"/instances/{instance}")["ParentSeries"]
    (job,) = series_jobs(ct_server, series, 1)
    assert job["state"] == "done"
    assert job["result"]["positive"] is False
    assert job["result"]["volume_ml"] is None


def test_a_two_slice_series_is_skipped_with_a_reason(ct_server, tmp_path):
    files, _ = ct_series(tmp_path / "short", 53, haemorrhage=False)
    ct_server.storescu(files[:2])
    instance = ct_server.lookup(str(pydicom.dcmread(files[0]).SOPInstanceUID))
    series = ct_server.get(f"/instances/{instance}")["ParentSeries"]
    (job,) = series_jobs(ct_server, series, 1)
    assert job["state"] == "skipped"
    assert "a volume needs 3" in job["reason"]
