"""Hospital PACS for tests: a plain Orthanc and dcmtk's dcmqrscp, on free loopback ports.

Both keep their ports and storage across :meth:`stop` / :meth:`start`, so a
test can take a PACS down and bring it back with the same studies.

``known`` maps a symbolic name to ``(aet, host, port)``: the DICOM peers the
PACS knows (its DicomModalities, or dcmqrscp's HostTable). A C-MOVE to an AE
title that is not known fails: dcmqrscp answers 0xA801 (Move Destination
Unknown), Orthanc 0xC000. The configuration is written by ``start()``, so
``known`` may be changed while stopped (the ports are fixed at construction,
so build all nodes first, then fill in each one's ``known`` from the others'
``peer``).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import requests

from tests.harness import free_port

ORTHANC = "/usr/sbin/Orthanc"
DCMQRSCP = "/usr/bin/dcmqrscp"
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"

Peer = tuple[str, str, int]


def _stop_process(proc: subprocess.Popen | None, timeout: float) -> int:
    if proc is None:
        return 0
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _kill_process(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def _tail(path: Path, n: int) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


class _Node:
    """A server process the tests start, stop (SIGTERM), kill (SIGKILL) and start again."""

    aet: str
    dicom_port: int
    proc: subprocess.Popen | None
    log_path: Path
    stop_timeout = 30.0

    @property
    def peer(self) -> Peer:
        """``(aet, host, port)`` for other nodes' DicomModalities / HostTable."""
        return (self.aet, "127.0.0.1", self.dicom_port)

    def start(self) -> Any:
        raise NotImplementedError

    def stop(self, timeout: float | None = None) -> int:
        code = _stop_process(self.proc, self.stop_timeout if timeout is None else timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        """``kill -9``: down at once (a SIGTERM stop takes Orthanc about 3 s)."""
        _kill_process(self.proc)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        return _tail(self.log_path, n)

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class OrthancPacs(_Node):
    """A plain Orthanc (no plugins) acting as the hospital PACS, or as any DICOM node.

    ``known`` becomes its DicomModalities. ``config`` entries are merged into
    the generated configuration last (e.g. ``{"DicomAlwaysAllowStore": False}``).
    """

    def __init__(self, data: Path, aet: str = "PACS", known: Mapping[str, Peer] | None = None,
                 *, config: Mapping[str, Any] | None = None) -> None:
        self.data = Path(data)
        self.aet = aet
        self.known: dict[str, Peer] = dict(known or {})
        self.extra = dict(config or {})
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.proc: subprocess.Popen | None = None
        self.http = requests.Session()
        self.http.trust_env = False


    @property
    def log_path(self) -> Path:
        return self.data / "orthanc.log"

    def config(self) -> dict[str, Any]:
        return {
            "Name": self.aet,
            "DicomAet": self.aet,
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "StorageDirectory": str(self.data / "storage"),
            "IndexDirectory": str(self.data / "index"),
            "Plugins": [],
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomModalities": {name: list(peer) for name, peer in self.known.items()},
            "DicomScuTimeout": 5,
            "StableAge": 1,
            "HttpTimeout": 10,
            **self.extra,
        }

    # -- life cycle ------------------------------------------------------------

    def start(self, timeout: float = 60) -> OrthancPacs:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.data.mkdir(parents=True, exist_ok=True)
        cfg = self.data / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=2))
        log = open(self.log_path, "ab")  # noqa: SIM115 (owned by the process)
        self.proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.data)
        log.close()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc {self.aet} exited ({self.proc.returncode}):\n"
                                   f"{self.log_tail()}")
            try:
                self.get("/system")
                return self
            except (requests.RequestException, ValueError):
                time.sleep(0.1)
        raise RuntimeError(f"Orthanc {self.aet} not ready in {timeout} s:\n{self.log_tail()}")






    # -- HTTP ------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *,
                timeout: float = 60) -> requests.Response:
        """Raw response (no raise); ``body`` dicts/lists are sent as JSON."""
        data = json.dumps(body) if isinstance(body, dict | list) else body
        return self.http.request(method, self.url + path, data=data, timeout=timeout)

    def get(self, path: str) -> Any:
        r = self.http.get(self.url + path, timeout=30)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: Any = b"", *, timeout: float = 60, **kw: Any) -> Any:
        data = json.dumps(body) if isinstance(body, dict | list) else body
        r = self.http.post(self.url + path, data=data, timeout=timeout, **kw)
        r.raise_for_status()
        return r.json()

    def upload(self, dicom: bytes) -> dict[str, Any]:
        return self.post("/instances", dicom, headers={"Content-Type": "application/dicom"})

    def instances(self) -> list[str]:
        return self.get("/instances")

    def studies(self) -> list[str]:
        return self.get("/studies")

    def lookup(self, uid: str, level: str = "Instance") -> str | None:
        """Orthanc id of the resource with this DICOM UID at ``level``."""
        found = self.post("/tools/lookup", uid)
        return next((f["ID"] for f in found if f["Type"] == level), None)

    def find_sop(self, sop_instance_uid: str) -> bool:
        return self.lookup(sop_instance_uid) is not None

    def wait_sops(self, sop_uids: Iterable[str], timeout: float = 20) -> None:
        wanted = list(sop_uids)
        deadline = time.time() + timeout
        while not all(self.find_sop(uid) for uid in wanted):
            if time.time() > deadline:
                raise TimeoutError(f"{self.aet}: instances not received: {wanted}")
            time.sleep(0.1)


class DcmqrscpPacs(_Node):
    """dcmtk's ``dcmqrscp`` as a second, different PACS (Q/R SCP with its own index).

    Only peers in ``known`` (its HostTable) can be C-MOVE destinations;
    ``known={}`` makes every C-MOVE fail with "Move Destination Unknown"
    (A801). Any peer may associate for C-FIND / C-STORE (Peers ``ANY``).
    """

    stop_timeout = 10.0

    def __init__(self, data: Path, aet: str = "DCMQR", known: Mapping[str, Peer] | None = None,
                 *, options: Iterable[str] = ()) -> None:
        self.data = Path(data)
        self.aet = aet
        self.known: dict[str, Peer] = dict(known or {})
        self.options = list(options)
        self.dicom_port = free_port()
        self.proc: subprocess.Popen | None = None


    @property
    def storage(self) -> Path:
        """Storage area of its AE title: DICOM files and ``index.dat``."""
        return self.data / "db" / self.aet

    @property
    def config_path(self) -> Path:
        return self.data / "dcmqrscp.cfg"

    @property
    def log_path(self) -> Path:
        return self.data / "dcmqrscp.log"

    def config(self) -> str:
        hosts = "\n".join(f"{name:<16} = ({aet}, {host}, {port})"
                          for name, (aet, host, port) in self.known.items())
        return (
            f"NetworkTCPPort  = {self.dicom_port}\n"
            "MaxPDUSize      = 16384\n"
            "MaxAssociations = 16\n"
            "\nHostTable BEGIN\n"
            f"{hosts}\n"
            "HostTable END\n"
            "\nVendorTable BEGIN\nVendorTable END\n"
            "\nAETable BEGIN\n"
            f"{self.aet}  {self.storage}  RW  (500, 1024mb)  ANY\n"
            "AETable END\n"
        )

    # -- life cycle ------------------------------------------------------------

    def start(self, timeout: float = 20) -> DcmqrscpPacs:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.storage.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        log = open(self.log_path, "ab")  # noqa: SIM115 (owned by the process)
        self.proc = subprocess.Popen(
            [DCMQRSCP, "-c", str(self.config_path), "--disable-host-lookup", "-ll", "info",
             *self.options, str(self.dicom_port)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.data)
        log.close()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dcmqrscp exited ({self.proc.returncode}):\n{self.log_tail()}")
            if self.echo():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"dcmqrscp not listening in {timeout} s:\n{self.log_tail()}")




    def echo(self, aet: str = "PROBE") -> bool:
        """C-ECHO (dcmtk's echoscu): True when it answers."""
        r = subprocess.run([ECHOSCU, "-aet", aet, "-aec", self.aet, "-to", "2", "-ta", "2",
                            "-td", "2", "127.0.0.1", str(self.dicom_port)],
                           capture_output=True, timeout=20)
        return r.returncode == 0



    # -- content ---------------------------------------------------------------

    def load(self, paths: Iterable[Path | str], aet: str = "LOADER") -> None:
        """C-STORE the files into the running dcmqrscp (its own SOP classes, ``-R``)."""
        files = [str(p) for p in paths]
        for i in range(0, len(files), 200):
            subprocess.run(
                [STORESCU, "-R", "-aet", aet, "-aec", self.aet, "127.0.0.1",
                 str(self.dicom_port), *files[i : i + 200]],
                check=True, capture_output=True, timeout=120,
            )

    def files(self) -> list[Path]:
        """DICOM files in its storage area (not the index)."""
        if not self.storage.exists():
            return []
        return sorted(p for p in self.storage.iterdir()
                      if p.is_file() and p.name != "index.dat")

    def sop_uids(self) -> set[str]:
        import pydicom

        return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                for p in self.files()}

    def find_sop(self, sop_instance_uid: str) -> bool:
        return sop_instance_uid in self.sop_uids()

    def wait_sops(self, sop_uids: Iterable[str], timeout: float = 20) -> None:
        wanted = set(sop_uids)
        deadline = time.time() + timeout
        while not wanted <= self.sop_uids():
            if time.time() > deadline:
                raise TimeoutError(f"{self.aet}: instances not received: {wanted}")
            time.sleep(0.1)



def stop_all(nodes: Iterable[OrthancPacs | DcmqrscpPacs], timeout: float = 30) -> None:
    """Stop several nodes at once (SIGTERM to all, then wait): Orthanc takes ~3 s each."""
    nodes = list(nodes)
    for node in nodes:
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
    for node in nodes:
        node.stop(timeout)
