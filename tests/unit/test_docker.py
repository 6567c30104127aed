"""The Docker deployment (orthanc/Dockerfile, orthanc/Dockerfile.model-server,
docker-compose.yml), checked without a Docker engine: the compose file as
docker-compose renders it, and the Orthanc Dockerfile's assumptions against a
Debian forky root holding the same Orthanc, Python plugin and Python as the
image orthancteam/orthanc:26.8.1 (Orthanc 1.13.0, Python 3.14)."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from engine import current_orthanc
from engine.config import PROJECT_ROOT, load_orthanc_json, parse_ai_section

DOCKERFILE = PROJECT_ROOT / "orthanc" / "Dockerfile"
MODEL_SERVER_DOCKERFILE = PROJECT_ROOT / "orthanc" / "Dockerfile.model-server"
COMPOSE = PROJECT_ROOT / "docker-compose.yml"
AI_JSON = PROJECT_ROOT / "orthanc" / "docker-orthanc-ai.json"
ORTHANC_IMAGE = "orthancteam/orthanc:26.8.1"
IMAGE_PYTHON = "3.14"  # the image's /usr/bin/python3, which its Python plugin embeds
IMAGE_ORTHANC = "1.13.0"
CURRENT_ROOT = current_orthanc.ROOT


# -- docker-compose.yml, as docker-compose renders it ---------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    tool = shutil.which("docker-compose")
    assert tool, "docker-compose (Debian package docker-compose) is needed: " \
                 "scripts/install-debian.sh installs it"
    proc = subprocess.run([tool, "-f", str(COMPOSE), "config"], capture_output=True,
                          text=True, timeout=60, cwd=PROJECT_ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
    # YAML to JSON with the interpreter docker-compose runs on: python3-yaml is
    # its dependency (the venv has no YAML parser).
    shebang = Path(tool).read_text(errors="replace").splitlines()[0]
    python = shebang[2:].split()[0] if shebang.startswith("#!") else "/usr/bin/python3"
    as_json = subprocess.run(
        [python, "-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
        input=proc.stdout, capture_output=True, text=True, timeout=60)
    assert as_json.returncode == 0, as_json.stderr
    return json.loads(as_json.stdout)


def test_compose_has_orthanc_and_the_model_server(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {"orthanc", "model-server"}
    assert services["orthanc"]["build"]["dockerfile"] == "orthanc/Dockerfile"
    assert services["model-server"]["build"]["dockerfile"] == "orthanc/Dockerfile.model-server"
    assert services["orthanc"]["depends_on"]["model-server"]["condition"] == "service_healthy"
    assert "version" not in COMPOSE.read_text().split("services:")[0]  # obsolete key


def test_every_published_port_is_on_loopback(compose: dict) -> None:
    published = []
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            text = port if isinstance(port, str) else \
                f"{port.get('host_ip', '')}:{port['published']}:{port['target']}"
            assert text.startswith("127.0.0.1:"), f"{name} publishes {text} beyond loopback"
            published.append(text.split("/")[0])
    assert {"127.0.0.1:8042:8042", "127.0.0.1:4242:4242", "127.0.0.1:8501:8501"} <= \
        set(published)


def test_base_images_are_pinned() -> None:
    orthanc = DOCKERFILE.read_text()
    assert f"ARG ORTHANC_IMAGE={ORTHANC_IMAGE}\n" in orthanc
    assert "FROM ${ORTHANC_IMAGE}" in orthanc
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.1[0-3][.\w-]*slim\n",
                     MODEL_SERVER_DOCKERFILE.read_text())
    for path in (DOCKERFILE, MODEL_SERVER_DOCKERFILE, COMPOSE):
        assert ":latest" not in path.read_text(), path


def test_compose_builds_the_pinned_orthanc_image(compose: dict) -> None:
    assert compose["services"]["orthanc"]["build"]["args"]["ORTHANC_IMAGE"] == ORTHANC_IMAGE


def test_orthanc_enables_python_and_dicomweb_and_mounts_our_config(compose: dict) -> None:
    orthanc = compose["services"]["orthanc"]
    env = orthanc["environment"]
    assert env["PYTHON_PLUGIN_ENABLED"] == "true"  # the image's plugins-def.json names
    assert env["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    volumes = [v if isinstance(v, str) else f"{v['source']}:{v['target']}"
               for v in orthanc["volumes"]]
    assert any(v.endswith(":/etc/orthanc/orthanc-ai.json:ro") for v in volumes)
    assert any(":/var/lib/orthanc/db" in v for v in volumes)


INSTALLED = f"/opt/orthanc-ai/.venv/lib/python{IMAGE_PYTHON}/site-packages/orthanc_ai"


def test_ai_section_uses_the_model_server_on_the_compose_network() -> None:
    configuration = load_orthanc_json(AI_JSON)
    # The installed copy's script; its folder tells it where the venv is.
    assert configuration["PythonScript"] == f"{INSTALLED}/plugin/entry.py"
    ai = parse_ai_section(configuration["AI"])
    assert ai.backend == "http"
    assert ai.model_server_url == "http://model-server:8501"
    assert str(ai.models_directory) == "/opt/orthanc-ai/models"  # the compose file's mount
    cmd = MODEL_SERVER_DOCKERFILE.read_text()
    assert '"model-server"' in cmd and '"8501"' in cmd and '"0.0.0.0"' in cmd


def _copies(dockerfile: Path) -> list[tuple[str, str]]:
    """(source, destination) of each COPY into the build folder /tmp/orthanc-ai."""
    out = []
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY ") and "/tmp/orthanc-ai/" in line:
            *sources, destination = line.split()[1:]
            out += [(source, destination) for source in sources]
    return out


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, MODEL_SERVER_DOCKERFILE],
                         ids=["orthanc", "model-server"])
def test_the_copied_sources_build_the_wheel(dockerfile: Path, tmp_path: Path) -> None:
    """What each Dockerfile copies is enough for `pip install /tmp/orthanc-ai`:
    the wheel built from exactly those files has the packages and their files."""
    build = tmp_path / "orthanc-ai"
    for source, destination in _copies(dockerfile):
        target = build / destination.removeprefix("/tmp/orthanc-ai/")
        if destination.endswith("/") and not (PROJECT_ROOT / source).is_dir():
            target = target / Path(source).name
        if (PROJECT_ROOT / source).is_dir():
            shutil.copytree(PROJECT_ROOT / source, target,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(PROJECT_ROOT / source, target)
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                           "--outdir", str(tmp_path / "dist"), str(build)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("orthanc_ai/__init__.py", "orthanc_ai/plugin/entry.py",
                   "orthanc_ai/engine/worker.py", "orthanc_ai/inference/server.py",
                   "orthanc_ai/orthanc/explorer.js", "orthanc_ai/orthanc.json"):
        assert needed in names, needed
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)  # the GPL's text
    assert "pip install --no-cache-dir -c /tmp/orthanc-ai/requirements.lock /tmp/orthanc-ai" \
        in dockerfile.read_text()


def test_the_venv_is_made_with_the_image_python_where_the_script_is() -> None:
    text = DOCKERFILE.read_text()
    assert "python3 -m venv /opt/orthanc-ai/.venv" in text
    assert "tensorflow" not in text.split("RUN python3 -m venv")[1].split("COPY")[0].lower()


# -- the Dockerfile's assumptions, against the forky root -------------------------

@pytest.fixture(scope="module")
def root() -> Path:
    # make test builds it first (make current-orthanc); no silent skip.
    assert current_orthanc.is_current(CURRENT_ROOT), \
        f"no current forky root at {CURRENT_ROOT}: run `make current-orthanc`"
    return CURRENT_ROOT


def _needed(elf: Path) -> list[str]:
    """DT_NEEDED entries of a 64-bit little-endian ELF shared object."""
    data = elf.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{elf}: not ELF64 LE"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    for _name, kind, _f, _a, offset, size, link, _i, _al, entsize in sections:
        if kind != 6:  # SHT_DYNAMIC
            continue
        strtab = sections[link]
        names = []
        for j in range(size // entsize):
            tag, value = struct.unpack_from("<qQ", data, offset + j * entsize)
            if tag == 1:  # DT_NEEDED
                start = strtab[4] + value
                names.append(data[start:data.index(b"\0", start)].decode())
        return names
    return []


def _python_minor(root: Path) -> str:
    target = os.readlink(root / "usr" / "bin" / "python3")
    m = re.fullmatch(r"python(3\.\d+)", target)
    assert m, f"/usr/bin/python3 -> {target}"
    return m.group(1)


def test_root_python_is_the_image_python(root: Path) -> None:
    assert _python_minor(root) == IMAGE_PYTHON


def test_python_plugin_embeds_that_python(root: Path) -> None:
    plugin = root / "usr" / "share" / "orthanc" / "plugins" / "libOrthancPython.so"
    assert f"libpython{_python_minor(root)}.so.1.0" in _needed(plugin)


def test_plugins_the_deployment_enables_exist(root: Path) -> None:
    # PYTHON_PLUGIN_ENABLED and DICOM_WEB_PLUGIN_ENABLED load these (the
    # image's plugins-def.json), from plugins-available/ there.
    for lib in ("libOrthancPython.so", "libOrthancDicomWeb.so"):
        assert (root / "usr" / "share" / "orthanc" / "plugins" / lib).exists(), lib


def test_orthanc_version_is_the_image_one(root: Path) -> None:
    versions = current_orthanc.package_versions(root)
    assert versions["orthanc"].split("+")[0] == IMAGE_ORTHANC
    assert versions["orthanc-python"].split("+")[0].startswith("7.")


def test_no_stray_json_in_the_ai_file() -> None:
    json.loads(AI_JSON.read_text())  # plain JSON: the image's generateConfiguration reads it
