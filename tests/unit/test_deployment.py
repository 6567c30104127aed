"""Deployment files that cannot run here (no Docker engine) are still checked."""

import shutil
import subprocess

from engine.config import PROJECT_ROOT


def test_docker_compose_file_is_valid():
    tool = shutil.which("docker-compose")
    assert tool, "Debian's docker-compose is installed by scripts/install-debian.sh"
    proc = subprocess.run([tool, "-f", str(PROJECT_ROOT / "docker-compose.yml"), "config"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "127.0.0.1:8042:8042" in proc.stdout  # published on loopback only
    assert "/opt/orthanc-ai/models" in proc.stdout
    for package in ("plugin", "engine", "inference"):  # what the workers import
        assert f"/opt/orthanc-ai/{package}" in proc.stdout
        assert f"COPY {package} " in (PROJECT_ROOT / "orthanc" / "Dockerfile").read_text()
