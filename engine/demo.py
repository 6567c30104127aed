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


def demo_configuration(base: dict[str, Any], pacs: DemoPacs, ris_port: int,
                       audit_port: int) -> dict[str, Any]:
    """The user's configuration, with the demo PACS as priors source and destination,
    the demo RIS for HL7 results and the demo audit repository for the audit trail."""
    config = dict(base)
    config["DicomModalities"] = {**(base.get("DicomModalities") or {}), AET: pacs.modality()}
    ai = dict(base.get("AI") or {})
    ai.setdefault("Priors", {"Sources": [AET], "MaxAgeDays": 3650, "MaxPriors": 1,
                             "DeadlineSeconds": 60})
    ai.setdefault("Forward", {"Destinations": [AET]})
    ai.setdefault("HL7", {"Host": "127.0.0.1", "Port": ris_port,
                          "ReceivingApplication": "DEMO_RIS", "ReceivingFacility": "DEMO"})
    ai.setdefault("Audit", {"Host": "127.0.0.1", "Port": audit_port, "Transport": "tcp"})
    config["AI"] = ai
    return config


def describe_ris(ris: Any) -> list[str]:
    """What the demo RIS received: one line per ORU^R01, its OBX findings."""
    lines = []
    for message in ris.received:
        obx = [s for s in message if str(s[0]) == "OBX"]
        findings = [f"{s[3][0][1]}={s[5][0][1] if str(s[2]) == 'CWE' else s[5]}"
                    for s in obx if str(s[2]) in ("CWE", "NM")]
        lines.append(f"  {message.segment('MSH')[9]} {message.segment('MSH')[10]}: "
                     + "; ".join(findings))
    return lines


def describe_audit(receiver: Any) -> list[str]:
    """What the demo audit repository received: messages counted by DICOM event."""
    import xml.etree.ElementTree as ET

    counts: dict[str, int] = {}
    for message in receiver.parsed():
        event = ET.fromstring(message.xml).find("EventIdentification/EventID")
        name = "?" if event is None else \
            f"{event.get('csd-code')} {event.get('originalText', '')}".strip()
        counts[name] = counts.get(name, 0) + 1
    return [f"  {name}: {n}" for name, n in sorted(counts.items())]
