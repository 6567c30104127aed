"""OHIF, Orthanc Explorer and the AI status page as a radiologist and an admin see them.

Each test opens what the demo printed or links to, in Chromium, and checks
what is on the screen: the finding's words in OHIF's DOM, the region drawn
where our SR says (read back from the SR itself and placed on the canvas by
cornerstone's own image-to-canvas transform, then looked for in a
screenshot), the measurement in OHIF's measurement service, the CT's key
slice, the Explorer panel and the status page.
"""

from __future__ import annotations

import io
import time

import numpy as np
import pydicom
import pytest
from PIL import Image

from engine.cli import viewer_link
from tests.browser.conftest import screenshot

pytestmark = pytest.mark.browser

OHIF_WAIT_MS = 60_000  # software WebGL on 2 cores: the first image can take a while


def _done_jobs(demo, finding: str) -> list[dict]:
    jobs = demo.get("/ai/jobs?state=done")
    return [j for j in jobs if (j.get("result") or {}).get("finding") == finding
            and j["result"].get("positive")]


def _sr(demo, sr_instance: str) -> pydicom.Dataset:
    answer = demo.http.get(f"{demo.url}/instances/{sr_instance}/file", timeout=30)
    answer.raise_for_status()
    return pydicom.dcmread(io.BytesIO(answer.content))


def _region(sr: pydicom.Dataset) -> tuple[list[tuple[float, float]], str]:
    """The first group's Image Region: (column, row) points and the image it is on."""
    container = next(i for i in sr.ContentSequence
                     if i.ConceptNameCodeSequence[0].CodeValue == "126010")  # Imaging Meas.
    group = container.ContentSequence[0]
    scoord = next(i for i in group.ContentSequence if i.ValueType == "SCOORD")
    data = [float(v) for v in scoord.GraphicData]
    image = scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    return list(zip(data[0::2], data[1::2], strict=True)), str(image)


def _instance(demo, sop_uid: str) -> dict:
    found = demo.http.post(f"{demo.url}/tools/lookup", data=sop_uid, timeout=30).json()
    instance = next(f["ID"] for f in found if f["Type"] == "Instance")
    return demo.get(f"/instances/{instance}/simplified-tags")


def _link_for(demo, words: str, sr_instance: str) -> str:
    """The link the demo printed for this result: the one viewer_link makes."""
    expected = f"{demo.url}/{viewer_link(demo.url, sr_instance)}"
    printed = [link for text, link in demo.ohif_links() if text.startswith(words)]
    assert expected in printed, (expected, demo.ohif_links())
    return expected


def _wait_for_text(page, text: str) -> None:
    try:
        page.wait_for_function("t => document.body.innerText.includes(t)", arg=text,
                               timeout=OHIF_WAIT_MS)
    except Exception:
        raise AssertionError(f"{text!r} not on the page; console:\n"
                             + "\n".join(page.console[-30:])) from None


def _on_canvas(page, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Image pixel (column, row) -> page coordinates, by cornerstone's own transforms."""
    return page.evaluate("""points => {
        const vp = cornerstone.getRenderingEngines()[0].getViewports()[0];
        const imageId = vp.getCurrentImageId();
        const box = vp.canvas.getBoundingClientRect();
        return points.map(([c, r]) => {
            const world = cornerstone.utilities.imageToWorldCoords(imageId, [c, r]);
            const [x, y] = vp.worldToCanvas(world);
            return [box.left + x, box.top + y];
        });
    }""", [list(p) for p in points])


def _drawn_along(shot: np.ndarray, corners: list[tuple[float, float]]) -> float:
    """Share of points along the polygon's edges where the SR's green line is drawn
    (within 3 px): OHIF draws our SR's annotations in rgb(0, 255, 0)."""
    rgb = shot[..., :3].astype(int)
    green = (rgb[..., 1] > 180) & (rgb[..., 0] < 120) & (rgb[..., 2] < 120)
    hits = total = 0
    for (x0, y0), (x1, y1) in zip(corners, corners[1:], strict=False):
        for t in np.linspace(0.05, 0.95, 20):
            x, y = int(round(x0 + t * (x1 - x0))), int(round(y0 + t * (y1 - y0)))
            window = green[max(y - 3, 0):y + 4, max(x - 3, 0):x + 4]
            total += 1
            hits += bool(window.any())
    return hits / total


def _screen(page) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"))


def _shifted(corners: list[tuple[float, float]], dx: float) -> list[tuple[float, float]]:
    return [(x + dx, y) for x, y in corners]


def _canvas_levels(page) -> tuple[float, float]:
    """Mean and spread of the grey levels the viewport shows."""
    png = page.locator("canvas.cornerstone-canvas").first.screenshot()
    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"), float)
    return grey.mean(), grey.std()


def _wait_for_image(page, timeout_s: float = 60) -> tuple[float, float]:
    """Until the viewport shows an image (not a black or a flat canvas)."""
    deadline = time.time() + timeout_s
    while True:
        mean, std = _canvas_levels(page)
        if (20 < mean < 235 and std > 15) or time.time() > deadline:
            return mean, std
        page.wait_for_timeout(500)


def test_dx_fracture_is_drawn_where_the_sr_says_in_ohif(demo, page):
    job = _done_jobs(demo, "Fracture")[0]
    sr = _sr(demo, job["result"]["sr_instance"])
    points, image_uid = _region(sr)
    source = _instance(demo, image_uid)
    # The demo's radiographs carry VOI LUT Function LINEAR, as real DX often do.
    assert source.get("VOILUTFunction") == "LINEAR"
    link = _link_for(demo, "Fracture PRESENT", job["result"]["sr_instance"])

    page.goto(link)
    _wait_for_text(page, "Finding: Fracture present, probability 0.")
    # The image itself is visible: neither black nor blown out (OHIF 3.13.2 as
    # published shows such a radiograph black: engine/ohif.py fixes it).
    mean, std = _wait_for_image(page)
    assert 20 < mean < 235 and std > 15, (mean, std)
    page.wait_for_timeout(1000)  # the annotation layer is drawn after the image
    shot_path = screenshot(page, "ohif-dx-fracture")
    corners = _on_canvas(page, points)
    screen = _screen(page)
    share = _drawn_along(screen, corners)
    assert share >= 0.8, f"the region is not drawn where the SR says ({share:.0%}); " \
                         f"see {shot_path}"
    assert _drawn_along(screen, _shifted(corners, 40)) < 0.5  # the check tells places apart
    text = page.locator("body").inner_text()
    assert "Finding site: Limb structure" in text
    assert "new since" in text  # the demo patient's prior, compared


def test_the_finding_loads_into_the_measurement_panel(demo, page):
    job = _done_jobs(demo, "Fracture")[0]
    page.goto(_link_for(demo, "Fracture PRESENT", job["result"]["sr_instance"]))
    _wait_for_text(page, "Do you want to continue tracking measurements")
    # Answered once the image is on the screen, as a reader would: OHIF 3.13.2
    # answered before that left the viewport black, the rectangle at its corner.
    _wait_for_image(page)
    page.wait_for_timeout(1000)
    page.get_by_role("button", name="Yes").click()
    _wait_for_text(page, "Area: ")  # the region, now OHIF's own rectangle with its statistics
    page.wait_for_function("() => services.measurementService.getMeasurements().length > 0")
    _wait_for_image(page)
    page.locator('[data-cy="trackedMeasurements-btn"]').click()
    _wait_for_text(page, "Measurements (1)")
    page.wait_for_timeout(1000)  # the viewport is laid out again beside the panel
    mean, std = _wait_for_image(page)
    assert 20 < mean < 235 and std > 15, (mean, std)
    measurements = page.evaluate(
        "() => services.measurementService.getMeasurements().map("
        "m => ({label: m.label, tool: m.toolName, sop: m.SOPInstanceUID}))")
    assert len(measurements) == 1, measurements
    assert measurements[0]["label"].startswith("Fracture present, probability 0.")
    assert measurements[0]["tool"] == "RectangleROI"
    _, image_uid = _region(_sr(demo, job["result"]["sr_instance"]))
    assert measurements[0]["sop"] == image_uid
    assert measurements[0]["label"] in page.locator("body").inner_text()
    screenshot(page, "ohif-measurement-panel")


def test_head_ct_opens_on_its_key_slice_with_the_finding(demo, page):
    job = _done_jobs(demo, "Hemorrhage")[0]
    sr = _sr(demo, job["result"]["sr_instance"])
    points, key_uid = _region(sr)
    key = _instance(demo, key_uid)
    page.goto(_link_for(demo, "Hemorrhage PRESENT", job["result"]["sr_instance"]))
    _wait_for_text(page, "Finding: Hemorrhage present, probability 0.")
    assert " mL" in page.locator("body").inner_text()  # the volume
    _wait_for_image(page)
    page.wait_for_timeout(1000)
    shot_path = screenshot(page, "ohif-head-ct")
    shown = page.evaluate(
        "() => cornerstone.getRenderingEngines()[0].getViewports()[0].getCurrentImageId()")
    assert key_uid in shown  # the key slice, not the first or last of the stack
    assert f"I:{int(key['InstanceNumber'])} (" in page.locator("body").inner_text()
    corners, screen = _on_canvas(page, points), _screen(page)
    share = _drawn_along(screen, corners)
    assert share >= 0.8, f"the region is not drawn where the SR says ({share:.0%}); " \
                         f"see {shot_path}"
    assert _drawn_along(screen, _shifted(corners, 40)) < 0.5


def test_orthanc_explorer_shows_the_ai_panel_and_opens_ohif(demo, page):
    job = _done_jobs(demo, "Fracture")[0]
    page.goto(f"{demo.url}/app/explorer.html#study?uuid={job['study']}")
    page.wait_for_selector("#orthanc-ai-panel[data-state=loaded]", timeout=30_000)
    panel = page.locator("#orthanc-ai-panel")
    words = panel.locator(".orthanc-ai-finding").first.inner_text()
    assert words.startswith("Fracture present, probability 0.") and "new since" in words
    row = panel.locator(f"table.orthanc-ai-jobs tr[data-job-id='{job['id']}']")
    assert row.get_attribute("data-state") == "done"
    study_uid = job["result"]["study_instance_uid"]
    assert f"StudyInstanceUIDs={study_uid}" in page.locator("#orthanc-ai-ohif").get_attribute(
        "href")
    screenshot(page, "explorer-study")
    # The finding's own link opens OHIF on our SR, as the demo's printed link does.
    with page.context.expect_page() as opened:
        panel.locator(".orthanc-ai-finding-ohif").first.click()
    viewer = opened.value
    viewer.console = []
    _wait_for_text(viewer, "Finding: Fracture present, probability 0.")
    assert viewer.url == _link_for(demo, "Fracture PRESENT", job["result"]["sr_instance"])
    # On a series page too.
    page.goto(f"{demo.url}/app/explorer.html#series?uuid={job['series']}")
    page.wait_for_selector("#orthanc-ai-panel[data-state=loaded]", timeout=30_000)
    assert "this series" in page.locator("#orthanc-ai-panel").inner_text()


def test_the_status_page_shows_queue_workers_jobs_and_deliveries(demo, page):
    page.goto(f"{demo.url}/ai/")
    jobs = page.locator("#ai-jobs tr[data-job-id]")
    assert jobs.count() >= 7  # the demo's radiographs and its CT
    assert page.locator("#ai-jobs tr[data-state=done]").count() >= 7
    text = page.locator("body").inner_text()
    for words in ("Fracture present, probability 0.", "Hemorrhage present, probability 0.",
                  "limb-fracture-xr", "head-ct-haemorrhage", "DEMO_PACS"):
        assert words in text, words
    assert page.locator("button.ai-retry").count() == 0  # nothing failed in the demo
    screenshot(page, "status-page")
    # Its OHIF links are the demo's.
    job = _done_jobs(demo, "Hemorrhage")[0]
    href = page.locator(f"#ai-jobs tr[data-job-id='{job['id']}'] a.ai-ohif").get_attribute(
        "href")
    assert f"{demo.url}/ai/{href}".replace("/ai/../", "/") == _link_for(
        demo, "Hemorrhage PRESENT", job["result"]["sr_instance"])
