"""The wheel as a site installs it: built with ``python -m build`` (the sdist,
then the wheel from the sdist), installed into a fresh venv beside another
distribution's ``inference``, and served from outside the checkout.

The fresh venv gets our dependencies through a .pth line naming this venv's
site-packages (no download of TensorFlow again); ``pip check`` confirms that
they satisfy the wheel's requirements. Run once, in the Debian 12 pass: the
last test installs the wheel as orthanc/Dockerfile does, on the forky root's
Orthanc 1.13.0 and Python 3.14 (``serve --orthanc current`` itself needs a
checkout).
"""

from __future__ import annotations

import contextlib
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

from engine import current_orthanc
from engine.cli import ORTHANC, orthanc_config
from engine.config import PROJECT_ROOT, load_orthanc_json
from engine.demo import free_port
from inference.card import ModelCard
from inference.version import __version__
from plugin.model_server import start_model_server
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
        assert _worker_python(server) == str(venv / "bin" / "python")

        _analyse(server, installed)


def _hand_config(base: dict, installed: Path, data: Path, **ai) -> tuple[dict, int]:
    """Orthanc's configuration as an admin writes it: ``base`` with ports, storage
    and plugins, the installed script named, the models of the installed package."""
    http_port = free_port()
    config = orthanc_config(base, data, http_port, free_port())
    config["PythonScript"] = str(installed / "plugin" / "entry.py")
    config["AI"] = {**config.get("AI", {}), "ModelsDirectory": str(installed / "models"),
                    "OhifDirectory": "", **ai}
    return config, http_port


@contextlib.contextmanager
def _orthanc(argv: list[str], http_port: int, tmp_path: Path):
    """Orthanc started as given, without `serve`: nothing tells the script where
    the venv is. Yields a client (the harness's HTTP helpers) once the models are ready."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("ORTHANC_AI_SITE_PACKAGES", "PYTHONPATH", "VIRTUAL_ENV")}
    with open(tmp_path / "orthanc.log", "wb") as log:
        proc = subprocess.Popen(argv, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                env=env)
    client = OrthancAI(tmp_path)  # not started: its HTTP helpers, on our port
    client.http_port, client.url = http_port, f"http://127.0.0.1:{http_port}"
    try:
        deadline, models = time.time() + 180, {}
        while time.time() < deadline and proc.poll() is None and not models.get("ready"):
            time.sleep(0.5)
            try:
                models = client.get("/ai/models")
            except (requests.RequestException, ValueError):
                pass
        assert models.get("ready"), client.log_tail(60)
        assert models["version"] == __version__
        yield client
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _worker_python(client: OrthancAI) -> str:
    (worker,) = client.get("/ai/health")["workers"]
    return Path(f"/proc/{worker['pid']}/cmdline").read_bytes().split(b"\0")[0].decode()


def _analyse(client: OrthancAI, installed: Path) -> None:
    """One radiograph in; its SR names the product's and the model's versions."""
    buf = io.BytesIO()
    synthetic_dx(5).save_as(buf, enforce_file_format=True)
    instance = client.upload(buf.getvalue())["ID"]
    (job,) = client.wait_jobs([instance], timeout=120)
    assert job["state"] == "done", job
    card = ModelCard.from_folder(installed / "models" / "limb-fracture-xr")
    versions = client.get_bytes(f"/instances/{job['result']['sr_instance']}"
                                "/content/0018-1020").decode().strip("\0 ")
    assert versions.split("\\") == [__version__, card.version]


def test_an_orthanc_configured_by_hand_loads_the_installed_script(venv, tmp_path):
    installed = next((venv / "lib").glob("python3.*/site-packages")) / "orthanc_ai"
    config, http_port = _hand_config(load_orthanc_json(installed / "orthanc.json"), installed,
                                     tmp_path / "data")
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    with _orthanc([ORTHANC, str(tmp_path / "orthanc.json")], http_port, tmp_path) as client:
        assert _worker_python(client) == str(venv / "bin" / "python")


def test_the_docker_image_layout_on_orthanc_1_13(wheel, tmp_path):
    """What orthanc/Dockerfile does, on the forky root that holds the image's
    Orthanc 1.13.0, Python plugin 7.1 and Python 3.14: a venv made with that
    python3, the wheel installed into it, Orthanc configured with the image's
    orthanc/docker-orthanc-ai.json (its paths and the model server's address
    made local), no `serve`, the models on a model server (no TensorFlow for 3.14)."""
    assert current_orthanc.is_current(), "no forky root: run `make current-orthanc`"
    v = tmp_path / "venv"  # under /tmp, which the root sees at the same path

    def in_root(*argv: str) -> list[str]:
        return current_orthanc.command(list(argv), [tmp_path])

    _run(in_root("/usr/bin/python3", "-m", "venv", str(v)))
    purelib = v / "lib" / f"python{current_orthanc.python_minor()}" / "site-packages"
    _run(in_root(str(v / "bin" / "pip"), "install", "-q", "--no-deps", "--no-index", str(wheel)))
    # The dependencies: the root's own venv, built for 3.14 from our lock.
    (purelib / "orthanc-ai-test-deps.pth").write_text(current_orthanc.site_packages() + "\n")
    _run(in_root(str(v / "bin" / "pip"), "check"))
    out = _run(in_root(str(v / "bin" / "orthanc-ai"), "--version")).stdout
    assert out.strip() == f"orthanc-ai {__version__}"

    installed = purelib / "orthanc_ai"
    url, model_server = start_model_server(installed / "models", tmp_path / "model-server.log")
    try:
        image = load_orthanc_json(PROJECT_ROOT / "orthanc" / "docker-orthanc-ai.json")
        assert image["PythonScript"] == \
            f"/opt/orthanc-ai/.venv/lib/python{current_orthanc.python_minor()}" \
            "/site-packages/orthanc_ai/plugin/entry.py"  # where this test installed it, here
        config, http_port = _hand_config(
            image, installed, tmp_path / "data", ModelServerUrl=url,
            QueueDatabase=str(tmp_path / "data" / "jobs.sqlite"))
        assert config["AI"]["Backend"] == "http"
        (tmp_path / "orthanc.json").write_text(json.dumps(config))
        with _orthanc(in_root("/usr/sbin/Orthanc", str(tmp_path / "orthanc.json")), http_port,
                      tmp_path) as client:
            assert _worker_python(client) == str(v / "bin" / "python")
            _analyse(client, installed)
    finally:
        model_server.terminate()
        model_server.wait(30)
