"""The OHIF files the plugin serves (plugin/viewer.py) and their installation (engine/ohif.py)."""

import json
import re

import pytest

from engine import ohif
from plugin.viewer import Viewer


@pytest.fixture
def dist(tmp_path):
    root = tmp_path / "dist"
    (root / "assets").mkdir(parents=True)
    (root / "index.html").write_text("<html>ohif</html>")
    (root / "app.bundle.0f6159c501addfe9.js").write_text("app")
    (root / "1602.css").write_text("css")
    (root / "0ddf166f7a343eda.wasm").write_bytes(b"\0asm")
    (root / "assets" / "favicon.ico").write_bytes(b"ico")
    (tmp_path / "secret.txt").write_text("outside")
    return root


def test_files_are_served_with_their_type_and_caching(dist):
    viewer = Viewer(dist)
    status, ctype, body, headers = viewer.answer("app.bundle.0f6159c501addfe9.js")
    assert (status, ctype, body) == (200, "text/javascript; charset=utf-8", b"app")
    assert "immutable" in headers["Cache-Control"]  # content-hashed name
    status, ctype, _, headers = viewer.answer("0ddf166f7a343eda.wasm")
    assert (status, ctype) == (200, "application/wasm")  # streaming compilation needs it
    assert viewer.answer("1602.css")[3]["Cache-Control"] == "no-cache"  # no hash in the name
    assert viewer.answer("")[2] == b"<html>ohif</html>"


def test_ohif_routes_get_the_start_page_and_missing_files_a_404(dist):
    viewer = Viewer(dist)
    for route in ("viewer", "viewer/dicomweb", "local", "viewer?StudyInstanceUIDs=1.2"):
        status, ctype, body, headers = viewer.answer(route.split("?")[0])
        assert (status, body, headers["Cache-Control"]) == (200, b"<html>ohif</html>",
                                                            "no-cache"), route
    assert viewer.answer("nothere.bundle.abc.js")[0] == 404


def test_nothing_outside_the_folder_is_served(dist):
    (dist / "link.txt").symlink_to(dist.parent / "secret.txt")
    viewer = Viewer(dist)
    for path in ("../secret.txt", "assets/../../secret.txt", "link.txt", "/etc/passwd",
                 "..\\secret.txt", "a\0b.txt"):
        status, _, body, _ = viewer.answer(path)
        # the start page (an OHIF route) or a 404: never the file outside
        assert (status, body) in ((200, b"<html>ohif</html>"), (404, b"not found")), path


def test_a_viewer_not_installed_says_so(tmp_path):
    status, _, body, _ = Viewer(tmp_path / "none").answer("")
    assert status == 404 and b"make ohif" in body


def test_study_link_opens_our_sr():
    assert ohif.study_link("1.2.3") == "ohif/viewer?StudyInstanceUIDs=1.2.3"
    assert ohif.study_link("1.2.3", "4.5") == \
        "ohif/viewer?StudyInstanceUIDs=1.2.3&initialSeriesInstanceUID=4.5"


# -- the installed viewer (make setup installs it) -----------------------------

DIST = ohif.DEFAULT_DIR / "dist"


def test_the_installed_viewer_is_the_pinned_one_rewritten_for_its_sub_path():
    assert ohif.installed(), "OHIF is not installed: make ohif"
    stamp = json.loads((ohif.DEFAULT_DIR / "installed.json").read_text())
    assert stamp["version"] == "3.13.2" and stamp["prefix"] == "/ohif/"
    index = (DIST / "index.html").read_text()
    assert index.count('window.PUBLIC_URL="/ohif/"') == 2
    assert not re.search(r'(href|src)="/(?!ohif/)', index)  # every absolute path rewritten
    assert "init-service-worker" not in index  # no Workbox from Google's CDN
    app = next(DIST.glob("app.bundle.*.js")).read_text()
    assert '__webpack_require__.p = "/ohif/";' in app
    assert "Array.isArray(voiLutModule.voiLUTFunction)" in app  # VOI LUT Function fix
    sr = next(DIST.glob("7248.bundle.*.js")).read_text()
    assert "measurement.coords[0]?.ReferencedSOPSequence" in sr
    assert "label: 'Finding site'" in sr and "label: 'Finding', value: comment.TextValue" in sr
    for worker in DIST.glob("*.js"):
        assert '__webpack_require__.p = "/";' not in worker.read_text(), worker.name
    config = (DIST / "app-config.js").read_text()
    assert "const prefix = '/ohif/'" in config and "@@PREFIX@@" not in config


def test_a_rewrite_that_finds_nothing_fails_loudly(tmp_path):
    (tmp_path / "index.html").write_text("<html>another version</html>")
    with pytest.raises(ohif.InstallError, match="window.PUBLIC_URL"):
        ohif.rewrite(tmp_path)
