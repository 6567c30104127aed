"""A strict stand-in for the ``orthanc`` module that Orthanc's Python plugin provides.

Only what our adapter is allowed to use exists; any other attribute raises,
so a new SDK call cannot slip in untested (STYLE.md, Orthanc samples). Names
and shapes follow orthanc-python 4.0 (shared/reference/orthanc-python-4.0-api.txt).
"""

from __future__ import annotations

import json
import types
from typing import Any


class _ChangeType:
    ORTHANC_STARTED = 0x10
    ORTHANC_STOPPED = 0x11
    NEW_INSTANCE = 0x01
    STABLE_SERIES = 0x08


class StrictOrthanc(types.ModuleType):
    ALLOWED = {
        "ChangeType", "GetConfiguration", "GetConfigurationPath",
        "GenerateRestApiAuthorizationToken",
        "RegisterOnStoredInstanceCallback", "RegisterOnChangeCallback",
        "RegisterRestCallback", "RegisterIncomingHttpRequestFilter",
        "LogInfo", "LogWarning", "LogError", "ExtendOrthancExplorer",
    }

    def __init__(self, configuration: dict[str, Any], path: str = "/etc/orthanc") -> None:
        super().__init__("orthanc")
        self._configuration_path = path
        self.ChangeType = _ChangeType
        self._configuration = configuration
        self.stored_callbacks: list = []
        self.change_callbacks: list = []
        self.rest_callbacks: dict[str, Any] = {}
        self.http_filters: list = []
        self.explorer_js: list[str] = []
        self.logs: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"orthanc.{name} is not stubbed: the adapter must not use it")

    def GetConfiguration(self) -> str:  # noqa: N802 (the SDK's names)
        return json.dumps(self._configuration)

    def GetConfigurationPath(self) -> str:  # noqa: N802
        return self._configuration_path

    def GenerateRestApiAuthorizationToken(self) -> str:  # noqa: N802
        return "Bearer test-token"

    def RegisterOnStoredInstanceCallback(self, cb) -> None:  # noqa: N802
        self.stored_callbacks.append(cb)

    def RegisterOnChangeCallback(self, cb) -> None:  # noqa: N802
        self.change_callbacks.append(cb)

    def RegisterRestCallback(self, pattern: str, cb) -> None:  # noqa: N802
        self.rest_callbacks[pattern] = cb

    def RegisterIncomingHttpRequestFilter(self, cb) -> None:  # noqa: N802
        self.http_filters.append(cb)

    def ExtendOrthancExplorer(self, js: str) -> None:  # noqa: N802
        assert isinstance(js, str)
        self.explorer_js.append(js)

    def LogInfo(self, message: str) -> None:  # noqa: N802
        self.logs.append(("info", message))

    def LogWarning(self, message: str) -> None:  # noqa: N802
        self.logs.append(("warning", message))

    def LogError(self, message: str) -> None:  # noqa: N802
        self.logs.append(("error", message))


class RestOutput:
    """Records what a REST callback answered."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.body: bytes = b""
        self.content_type = ""

    def AnswerBuffer(self, body: bytes, content_type: str) -> None:  # noqa: N802
        self.status, self.body, self.content_type = 200, body, content_type

    def SendHttpStatus(self, status: int, body: str, size: int) -> None:  # noqa: N802
        # orthanc-python 4.0 wants a str and its size (found the hard way: a 500).
        assert isinstance(body, str) and size == len(body.encode())
        self.status, self.body = status, body.encode()

    def SendMethodNotAllowed(self, allowed: str) -> None:  # noqa: N802
        self.status = 405
