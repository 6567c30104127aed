"""The demo's hospital PACS: a second, plain Orthanc holding the demo patients' priors.

``orthanc-ai demo`` starts it on free loopback ports, loads the earlier
studies of two demo patients into it, and points our Orthanc at it as the
``AI.Priors`` source and the ``AI.Forward`` destination: the current
studies are compared with priors fetched by C-MOVE, and every SR is sent
back to it by C-STORE.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import requests

AET = "DEMO_PACS"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DemoPacs:
    def __init__(self, folder: Path, orthanc: str, our_aet: str, our_dicom_port: int) -> None:
        self.folder = folder
        self.orthanc = orthanc
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.known = {our_aet: {"AET": our_aet, "Host": "127.0.0.1", "Port": our_dicom_port}}
        self.proc: subprocess.Popen | None = None
        self.http = requests.Session()
        self.http.trust_env = False

    def start(self, timeout: float = 60) -> DemoPacs:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "demo-pacs", "DicomAet": AET, "HttpPort": self.http_port,
            "DicomPort": self.dicom_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "Plugins": [],
            "StorageDirectory": str(self.folder / "db"), "IndexDirectory": str(self.folder / "db"),
            "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
            "DicomModalities": self.known,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        with open(self.folder / "orthanc.log", "ab") as log:
            self.proc = subprocess.Popen([self.orthanc, str(path)], stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the demo PACS exited ({self.proc.returncode}); "
                                   f"log: {self.folder / 'orthanc.log'}")
            try:
                self.http.get(self.url + "/system", timeout=2).raise_for_status()
                return self
            except requests.RequestException:
                time.sleep(0.3)
        raise RuntimeError("the demo PACS did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def upload(self, path: Path) -> None:
        self.http.post(self.url + "/instances", data=path.read_bytes(), timeout=30,
                       headers={"Content-Type": "application/dicom"}).raise_for_status()

    def modality(self) -> dict[str, Any]:
        """Our Orthanc's DicomModalities entry for it."""
        return {"AET": AET, "Host": "127.0.0.1", "Port": self.dicom_port}


def demo_configuration(base: dict[str, Any], pacs: DemoPacs) -> dict[str, Any]:
    """The user's configuration, with the demo PACS as priors source and destination."""
    config = dict(base)
    config["DicomModalities"] = {**(base.get("DicomModalities") or {}), AET: pacs.modality()}
    ai = dict(base.get("AI") or {})
    ai.setdefault("Priors", {"Sources": [AET], "MaxAgeDays": 3650, "MaxPriors": 1,
                             "DeadlineSeconds": 60})
    ai.setdefault("Forward", {"Destinations": [AET]})
    config["AI"] = ai
    return config
