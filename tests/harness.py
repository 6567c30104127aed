"""Run a real Orthanc with orthanc-ai for tests and benchmarks, on free loopback ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import requests

from engine.demo import free_port

ROOT = Path(__file__).resolve().parent.parent
ORTHANC_AI = str(Path(sys.executable).parent / "orthanc-ai")
STORESCU = "/usr/bin/storescu"
# `make test-current`: the servers under test are Orthanc 1.13.0 in the forky
# root (engine/current_orthanc.py), their models on a model server outside it.
CURRENT = os.environ.get("ORTHANC_AI_ORTHANC") == "current"


class OrthancAI:
    """``orthanc-ai serve`` as a child process, with helpers to feed and inspect it."""

    def __init__(self, data: Path, *, config: Path | None = None,
                 env: dict[str, str] | None = None,
                 auth: tuple[str, str] | None = None,
                 program: str = ORTHANC_AI, cwd: Path | None = None) -> None:
        self.data = data
        self.config = config
        self.env = env or {}
        self.program, self.cwd = program, cwd  # another install's orthanc-ai, run from cwd
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.proc: subprocess.Popen | None = None
        self.http = requests.Session()
        self.http.trust_env = False
        self.http.auth = auth  # with Orthanc's authentication on: the helpers' user

    # -- life cycle ------------------------------------------------------------

    def start(self, wait_ready: bool = True, timeout: float = 180) -> OrthancAI:
        cmd = [self.program, "serve", "--data", str(self.data), "--http-port",
               str(self.http_port), "--dicom-port", str(self.dicom_port)]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        self.data.mkdir(parents=True, exist_ok=True)
        log = open(self.data / "orthanc.log", "ab")  # noqa: SIM115 (owned by the process)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd,
                                     env={**os.environ, **self.env})
        log.close()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if not wait_ready:
                    self.get("/system")  # Orthanc answers; the plugin may be off
                    return self
                if self.get("/ai/models")["ready"]:
                    return self
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"Orthanc not ready in {timeout} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        """``kill -9``: no chance to clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def log_tail(self, n: int = 40) -> str:
        path = self.data / "orthanc.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])

    def __enter__(self) -> OrthancAI:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- HTTP ------------------------------------------------------------------

    def get(self, path: str) -> Any:
        r = self.http.get(self.url + path, timeout=30)
        r.raise_for_status()
        return r.json()

    def get_bytes(self, path: str) -> bytes:
        r = self.http.get(self.url + path, timeout=60)
        r.raise_for_status()
        return r.content

    def post(self, path: str, data: bytes | str = b"", **kw: Any) -> Any:
        r = self.http.post(self.url + path, data=data, timeout=60, **kw)
        r.raise_for_status()
        return r.json()

    def upload(self, dicom: bytes) -> dict[str, Any]:
        return self.post("/instances", dicom, headers={"Content-Type": "application/dicom"})

    def lookup(self, sop_instance_uid: str) -> str | None:
        found = self.post("/tools/lookup", sop_instance_uid)
        return next((f["ID"] for f in found if f["Type"] == "Instance"), None)

    def jobs(self, **filters: str) -> list[dict[str, Any]]:
        query = "&".join(f"{k}={v}" for k, v in filters.items())
        return self.get(f"/ai/jobs?limit=10000&{query}")

    # -- DICOM -----------------------------------------------------------------

    def storescu(self, files: Iterable[Path], aet: str = "TEST_MODALITY") -> None:
        """Real C-STORE with dcmtk, proposing the files' own SOP classes (-R)."""
        files = [str(f) for f in files]
        for i in range(0, len(files), 200):
            subprocess.run(
                [STORESCU, "-R", "-aet", aet, "-aec", "ORTHANC", "127.0.0.1",
                 str(self.dicom_port), *files[i : i + 200]],
                check=True, capture_output=True, timeout=600,
            )

    def wait_jobs(self, instances: Iterable[str], timeout: float = 300) -> list[dict[str, Any]]:
        """Wait until each instance has jobs and all of them have settled."""
        wanted = set(instances)
        deadline = time.time() + timeout
        while True:
            jobs = [j for j in self.jobs() if j["instance"] in wanted]
            settled = all(
                j["state"] in ("done", "skipped", "dead")
                or (j["state"] == "failed" and not j.get("next_attempt"))
                for j in jobs
            )
            if {j["instance"] for j in jobs} >= wanted and settled:
                return jobs
            if time.time() > deadline:
                raise TimeoutError(f"jobs not settled: {jobs}\n{self.log_tail()}")
            time.sleep(0.25)


def outputs(jobs: Iterable[dict[str, Any]]) -> int:
    """Instances that these done analyses stored: one SR each, and for a located
    finding its GSPS and KOS (AI.PresentationStates, on by default)."""
    count = 0
    for job in jobs:
        result = job.get("result") or {}
        if job.get("model") and job.get("state") == "done":
            count += 1 + (2 if result.get("positive") and result.get("region") else 0)
    return count


def write_config(path: Path, *, orthanc: dict[str, Any] | None = None, **ai: Any) -> Path:
    """The project's orthanc.json with AI keys (and top-level ``orthanc`` ones)
    changed, for tests and benchmarks."""
    import json

    from engine.config import load_orthanc_json

    config = {**load_orthanc_json(ROOT / "orthanc.json"), **(orthanc or {})}
    stable_age = ai.pop("StableAge", None)
    if stable_age is not None:
        config["StableAge"] = stable_age
    config["AI"] = {**config.get("AI", {}), **ai}
    path.write_text(json.dumps(config, indent=2))
    return path


def node_config(path: Path, pg: Any, orthanc_db: str, queue_url: str, name: str,
                **ai: Any) -> Path:
    """Orthanc's index and storage in PostgreSQL (orthanc-postgresql), the queue too."""
    if ai.get("Enabled", True):
        ai = {"QueueDatabase": queue_url, "NodeName": name, **ai}
    import json

    config = write_config(path, **ai)
    data = json.loads(config.read_text())
    data["PostgreSQL"] = {"EnableIndex": True, "EnableStorage": True, "Host": "127.0.0.1",
                          "Port": pg.port, "Database": orthanc_db, "Username": "postgres",
                          "Password": "", "Lock": False, "EnableSsl": False}
    data["DatabaseServerIdentifier"] = name
    config.write_text(json.dumps(data, indent=2))
    return config


def dx_corpus(folder: Path, n: int, *, base_images: int = 10, seed: int = 1000,
              spacing_mm: float | None = 0.4) -> list[Path]:
    """``n`` distinct DX instances (own study, series and SOP UIDs) from a few phantoms.

    Rendering is the slow part, so ``base_images`` phantoms are rendered and
    their pixels reused under new patients and UIDs.
    """
    from inference.uids import derived_uid
    from tests.factories import synthetic_dx

    folder.mkdir(parents=True, exist_ok=True)
    bases = [synthetic_dx(seed + i, fracture=bool(i % 2), age=20.0 + 7 * i,
                          sex="MF"[i % 2], spacing_mm=spacing_mm) for i in range(base_images)]
    paths = []
    for k in range(n):
        ds = bases[k % base_images]
        ds.PatientID = f"CORPUS{seed}-{k}"
        ds.StudyInstanceUID = derived_uid("corpus-study", str(seed), str(k))
        ds.SeriesInstanceUID = derived_uid("corpus-series", str(seed), str(k))
        ds.SOPInstanceUID = derived_uid("corpus-instance", str(seed), str(k))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"{k:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
