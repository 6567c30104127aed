"""The wheel as a site installs it: built with ``python -m build`` (the sdist,
then the wheel from the sdist), installed into a fresh venv beside another
distribution's ``inference``, and served from outside the checkout.

The fresh venv gets our dependencies through a .pth line naming this venv's
site-packages (no download of TensorFlow again); ``pip check`` confirms that
they satisfy the wheel's requirements. Debian 12's Orthanc only: a wheel has
no forky root (``serve --orthanc current`` needs a checkout).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest
import requests

from engine.cli import ORTHANC, orthanc_config
from engine.config import PROJECT_ROOT, load_orthanc_json
from engine.demo import free_port
from inference.card import ModelCard
from inference.version import __version__
from tests.factories import synthetic_dx
from tests.harness import OrthancAI

SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's 3.11, the one Orthanc's plugin embeds
# Another distribution's top-level ``inference`` (Roboflow's on PyPI has one).
FOREIGN = 'WHOSE = "another distribution"\n'


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of what git tracks (and would track): not from build/ or .venv/."""
    tmp = tmp_path_factory.mktemp("wheel")
    files = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                 cwd=PROJECT_ROOT).stdout.split("\0")
    src = tmp / "src"
    for name in filter(None, files):
        if (PROJECT_ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((PROJECT_ROOT / name).read_bytes())
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp / "dist"),
          str(src)])
    (built,) = (tmp / "dist").glob("*.whl")
    assert built.name == f"orthanc_ai-{__version__}-py3-none-any.whl"
    assert len(list((tmp / "dist").glob("*.tar.gz"))) == 1
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    v = tmp_path_factory.mktemp("venv") / "v"
    _run([SYSTEM_PYTHON, "-m", "venv", str(v)])
    purelib = Path(_run([str(v / "bin" / "python"), "-c",
                         "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                        ).stdout.strip())
    foreign = purelib / "inference"
    foreign.mkdir()
    (foreign / "__init__.py").write_text(FOREIGN)
    _run([str(v / "bin" / "pip"), "install", "-q", "--no-deps", "--no-index", str(wheel)])
    (purelib / "orthanc-ai-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(v / "bin" / "pip"), "check"])
    return v


def test_the_wheel_installs_one_top_level_package_with_its_files(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"orthanc_ai",
                                                 f"orthanc_ai-{__version__}.dist-info"}
    for package in ("engine", "inference", "plugin", "training"):
        assert f"orthanc_ai/{package}/__init__.py" in names
    for needed in ("orthanc_ai/plugin/entry.py", "orthanc_ai/orthanc.json",
                   "orthanc_ai/orthanc/explorer.js", "orthanc_ai/orthanc/ohif-app-config.js",
                   "orthanc_ai/models/limb-fracture-xr/model.keras",
                   "orthanc_ai/models/head-ct-haemorrhage/model.json"):
        assert needed in names, needed
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_version_from_outside_the_checkout(venv, tmp_path):
    out = _run([str(venv / "bin" / "orthanc-ai"), "--version"], cwd=tmp_path,
               env={**os.environ, "PYTHONPATH": ""}).stdout
    assert out.strip() == f"orthanc-ai {__version__}"


def test_the_other_inference_is_left_alone(venv, tmp_path):
    out = _run([str(venv / "bin" / "python"), "-c", "import inference; print(inference.WHOSE)"],
               cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""}).stdout
    assert out.strip() == "another distribution"


def test_serves_and_reports_from_the_wheel(venv, tmp_path):
    installed = next((venv / "lib").glob("python3.*/site-packages")) / "orthanc_ai"
    server = OrthancAI(tmp_path / "data", program=str(venv / "bin" / "orthanc-ai"), cwd=tmp_path,
                       env={"PYTHONPATH": "", "ORTHANC_AI_ORTHANC": "debian"})
    with server:
        written = (tmp_path / "data" / "orthanc.json").read_text()
        assert str(installed / "plugin" / "entry.py") in written
        models = server.get("/ai/models")
        assert models["version"] == __version__
        assert {m["id"] for m in models["models"]} == {"limb-fracture-xr", "head-ct-haemorrhage"}
        (worker,) = server.get("/ai/health")["workers"]
        assert os.readlink(f"/proc/{worker['pid']}/cwd") == str(installed)
        argv = Path(f"/proc/{worker['pid']}/cmdline").read_bytes().split(b"\0")
        assert argv[0].decode() == str(venv / "bin" / "python")

        buf = io.BytesIO()
        synthetic_dx(5).save_as(buf, enforce_file_format=True)
        instance = server.upload(buf.getvalue())["ID"]
        (job,) = server.wait_jobs([instance], timeout=120)
        assert job["state"] == "done", job
        card = ModelCard.from_folder(installed / "models" / "limb-fracture-xr")
        versions = server.get_bytes(f"/instances/{job['result']['sr_instance']}"
                                    "/content/0018-1020").decode().strip("\0 ")
        assert versions.split("\\") == [__version__, card.version]


def test_an_orthanc_configured_by_hand_loads_the_installed_script(venv, tmp_path):
    """As in the Docker image: no `serve`, Orthanc's own configuration names the
    installed plugin/entry.py, and nothing tells it where the venv is."""
    installed = next((venv / "lib").glob("python3.*/site-packages")) / "orthanc_ai"
    http_port, dicom_port = free_port(), free_port()
    config = orthanc_config(load_orthanc_json(installed / "orthanc.json"), tmp_path / "data",
                            http_port, dicom_port)
    config["PythonScript"] = str(installed / "plugin" / "entry.py")
    config["AI"] = {**config.get("AI", {}), "ModelsDirectory": str(installed / "models"),
                    "OhifDirectory": ""}
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items()
           if k not in ("ORTHANC_AI_SITE_PACKAGES", "PYTHONPATH", "VIRTUAL_ENV")}
    with open(tmp_path / "orthanc.log", "wb") as log:
        proc = subprocess.Popen([ORTHANC, str(tmp_path / "orthanc.json")], cwd=tmp_path,
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        session = requests.Session()
        session.trust_env = False
        deadline, models = time.time() + 120, {}
        while time.time() < deadline and proc.poll() is None and not models.get("ready"):
            try:
                models = session.get(f"http://127.0.0.1:{http_port}/ai/models", timeout=5).json()
            except (requests.RequestException, ValueError):
                time.sleep(0.5)
        log_text = (tmp_path / "orthanc.log").read_text(errors="replace")
        assert models.get("ready"), log_text[-3000:]
        assert models["version"] == __version__
        (worker,) = session.get(f"http://127.0.0.1:{http_port}/ai/health", timeout=5
                                ).json()["workers"]
        argv = Path(f"/proc/{worker['pid']}/cmdline").read_bytes().split(b"\0")
        assert argv[0].decode() == str(venv / "bin" / "python")
    finally:
        proc.terminate()
        proc.wait(60)
