"""What radiologists and admins see, in a real browser: Debian's Chromium driven by
Playwright, against the demo as `make run` starts it (Orthanc, the plugin, OHIF)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from engine.demo import free_port

ROOT = Path(__file__).resolve().parent.parent.parent
CHROMIUM = "/usr/bin/chromium"
# Where the tests leave their screenshots; `make screenshots` copies them into docs/.
SCREENSHOTS = Path(os.environ.get("ORTHANC_AI_SCREENSHOTS", ROOT / "build" / "screenshots"))


def pytest_collection_modifyitems(items):
    for item in items:
        if "browser" in str(item.fspath):
            item.add_marker(pytest.mark.browser)


class Demo:
    """`orthanc-ai demo` in the background; what it printed, parsed."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.out = data / "demo.out"
        self.proc: subprocess.Popen | None = None
        self.http = requests.Session()
        self.http.trust_env = False

    def start(self, timeout: float = 600) -> Demo:
        cli = str(Path(sys.executable).parent / "orthanc-ai")
        self.data.mkdir(parents=True, exist_ok=True)
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                [cli, "demo", "--data", str(self.data / "demo"), "--http-port",
                 str(self.http_port), "--dicom-port", str(self.dicom_port)],
                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if "Ctrl-C stops it" in self.text():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"the demo exited ({self.proc.returncode}):\n{self.text()}")
            time.sleep(1)
        raise RuntimeError(f"the demo did not finish in {timeout} s:\n{self.text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def text(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def ohif_links(self) -> list[tuple[str, str]]:
        """(finding words, link) of each result, as the demo printed them."""
        links = []
        for line in self.text().splitlines():
            m = re.match(r"^\s+.*\)\s+(.+?)\s+(http://\S+/ohif/viewer\?\S+)$", line)
            if m:
                links.append((m.group(1), m.group(2)))
        return links

    def get(self, path: str) -> dict | list:
        answer = self.http.get(self.url + path, timeout=30)
        answer.raise_for_status()
        return answer.json()


@pytest.fixture(scope="module")  # stopped once its tests ran
def demo(tmp_path_factory):
    d = Demo(tmp_path_factory.mktemp("browser-demo"))
    try:
        d.start()
    except Exception:
        d.stop()
        raise
    yield d
    d.stop()


@pytest.fixture(scope="module")
def chromium():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is required (scripts/install-debian.sh)"
    with sync_playwright() as p:
        # No GPU here: WebGL through SwiftShader, as on a thin client without one.
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--use-gl=swiftshader", "--enable-unsafe-swiftshader",
            "--ignore-gpu-blocklist"])
        yield browser
        browser.close()


@pytest.fixture
def page(chromium):
    context = chromium.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.console = []  # what the page logged, for failure messages
    page.on("console", lambda m: page.console.append(f"{m.type}: {m.text[:300]}"))
    page.on("pageerror", lambda e: page.console.append(f"pageerror: {e}"))
    yield page
    context.close()


def screenshot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path
