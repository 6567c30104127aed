"""The Orthanc source port, and its loopback HTTP implementation.

Worker processes reach Orthanc over HTTP with the token of
``orthanc.GenerateRestApiAuthorizationToken()``, handed over by the
supervisor through the worker's stdin (never a command line or a log), so
this works whatever the authentication settings are.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any, Protocol

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from inference.errors import BadInput, SkipInput, TransientError


def orthanc_instance_id(patient_id: str, study_uid: str, series_uid: str,
                        sop_instance_uid: str) -> str:
    """The ID Orthanc gives an instance: SHA-1 of its patient ID and three UIDs."""
    digest = hashlib.sha1(
        "|".join((patient_id.strip(), study_uid.strip(), series_uid.strip(),
                  sop_instance_uid.strip())).encode()).hexdigest()
    return "-".join(digest[i:i + 8] for i in range(0, 40, 8))


class InstanceGone(SkipInput):
    """The instance was deleted before its job ran (e.g. storage recycling)."""


class OrthancSource(Protocol):
    """What the pipeline needs from Orthanc."""

    def get_json(self, path: str) -> Any: ...
    def instance(self, instance_id: str) -> dict[str, Any]: ...
    def instance_metadata(self, instance_id: str) -> dict[str, str]: ...
    def instance_file(self, instance_id: str) -> bytes: ...
    def store(self, dicom: bytes) -> dict[str, Any]: ...
    def changes(self, since: int, limit: int = 100) -> dict[str, Any]: ...
    def delete(self, path: str) -> None: ...
    def call(self, method: str, path: str, body: Any = None,
             timeout: float | None = None) -> tuple[int, Any]: ...


def orthanc_study_id(patient_id: str, study_uid: str) -> str:
    """The ID Orthanc gives a study: SHA-1 of its patient ID and study UID."""
    digest = hashlib.sha1("|".join((patient_id.strip(), study_uid.strip())).encode()).hexdigest()
    return "-".join(digest[i:i + 8] for i in range(0, 40, 8))


class OrthancClient:
    """Thread-safe: each thread gets its own ``requests`` session (keep-alive)."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._token = token
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # never route loopback traffic through a proxy
            # Orthanc gzips answers for clients that accept it: on loopback that
            # only burns CPU (about 150 ms for a 2 MB radiograph on this machine).
            session.headers["Accept-Encoding"] = "identity"
            if self._token:
                session.headers["Authorization"] = self._token
            # Orthanc closes idle keep-alive connections; a request that meets
            # one is sent again on a fresh connection. Every request of ours
            # may be repeated: the SR we POST is the same SR (AlreadyStored).
            retry = Retry(total=2, connect=2, read=1, status=0, other=0,
                          allowed_methods=None, backoff_factor=0, raise_on_status=False)
            for scheme in ("http://", "https://"):
                session.mount(scheme, HTTPAdapter(max_retries=retry))
            if self.base_url.startswith("https://"):
                # Loopback to our own Orthanc: its certificate names the public host.
                session.verify = False
            self._local.session = session
        return session

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        try:
            response = self.session.request(
                method, self.base_url + path, timeout=self.timeout, **kwargs
            )
        except requests.RequestException as exc:
            raise TransientError(f"Orthanc REST {method} {path.split('?')[0]}: {exc}") from exc
        if response.status_code == 404:
            raise InstanceGone(
                f"deleted from Orthanc before its job ran (404 on {path.split('?')[0]})"
            )
        if response.status_code >= 500 or response.status_code in (408, 429, 503):
            raise TransientError(
                f"Orthanc REST {method} {path.split('?')[0]}: HTTP {response.status_code}"
            )
        if response.status_code >= 400:
            raise BadInput(
                f"Orthanc REST {method} {path.split('?')[0]}: HTTP {response.status_code} "
                f"{response.text[:200]}"
            )
        return response

    def get_json(self, path: str) -> Any:
        return self._request("GET", path).json()

    def instance(self, instance_id: str) -> dict[str, Any]:
        return self.get_json(f"/instances/{instance_id}")

    def instance_metadata(self, instance_id: str) -> dict[str, str]:
        return self.get_json(f"/instances/{instance_id}/metadata?expand")

    def instance_file(self, instance_id: str) -> bytes:
        return self._request("GET", f"/instances/{instance_id}/file").content

    def store(self, dicom: bytes) -> dict[str, Any]:
        response = self._request(
            "POST", "/instances", data=dicom, headers={"Content-Type": "application/dicom"}
        )
        return response.json()

    def changes(self, since: int, limit: int = 100) -> dict[str, Any]:
        return self.get_json(f"/changes?since={since}&limit={limit}")

    def delete(self, path: str) -> None:
        self._request("DELETE", path)

    @property
    def _once(self) -> requests.Session:
        """A session that never repeats a request: a C-MOVE or C-STORE that timed
        out may still be running in Orthanc."""
        session = getattr(self._local, "once", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False
            session.headers["Accept-Encoding"] = "identity"
            if self._token:
                session.headers["Authorization"] = self._token
            if self.base_url.startswith("https://"):
                session.verify = False
            self._local.once = session
        return session

    def call(self, method: str, path: str, body: Any = None,
             timeout: float | None = None) -> tuple[int, Any]:
        """One request, sent once; (HTTP status, parsed JSON or text). Orthanc's own
        errors (a peer that refused, a failed C-MOVE) come back as a status, not raised."""
        data = {"data": body.encode()} if isinstance(body, str) else {"json": body}
        try:
            response = self._once.request(method, self.base_url + path,
                                          timeout=timeout or self.timeout, **data)
        except requests.RequestException as exc:
            raise TransientError(f"Orthanc REST {method} {path.split('?')[0]}: "
                                 f"{type(exc).__name__}") from exc
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, response.text
