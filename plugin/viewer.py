"""The OHIF viewer's files, served by the plugin under ``/ohif/``.

Served through Orthanc's REST callbacks, so Orthanc's authentication and
the same origin apply to the viewer and to the DICOMweb requests it makes.
Orthanc's folder-serving plugin has no fallback; OHIF's own routes
(``/ohif/viewer?StudyInstanceUIDs=...``) are answered with ``index.html``.
``engine.ohif`` installs and rewrites the files; here they are only read.
"""

from __future__ import annotations

import mimetypes
import os
import re
from pathlib import Path

Response = tuple[int, str, bytes, dict[str, str]]

# Webpack's content-hashed names never change content: cache them for good.
_HASHED = re.compile(r"(^|/)([0-9a-z-]+\.bundle\.)?[0-9a-f]{16}\.[a-z0-9]+$")
_TYPES = {".js": "text/javascript; charset=utf-8", ".mjs": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".html": "text/html; charset=utf-8",
          ".json": "application/json", ".wasm": "application/wasm",
          ".svg": "image/svg+xml", ".woff2": "font/woff2", ".map": "application/json"}


class Viewer:
    def __init__(self, folder: str | Path) -> None:
        self.root = Path(folder).resolve()

    def available(self) -> bool:
        return (self.root / "index.html").is_file()

    def _file(self, relative: str) -> Path | None:
        parts = [p for p in relative.split("/") if p]
        if any(p in (".", "..") or "\\" in p or "\0" in p for p in parts):
            return None
        path = self.root.joinpath(*parts) if parts else self.root / "index.html"
        try:
            path = path.resolve()
        except OSError:
            return None
        if path != self.root and self.root not in path.parents:
            return None
        return path if path.is_file() else None

    def answer(self, relative: str) -> Response:
        """(status, content type, body, headers) for GET /ohif/<relative>."""
        if not self.available():
            return (404, "text/plain; charset=utf-8",
                    b"The OHIF viewer is not installed here (make ohif installs it).", {})
        path = self._file(relative)
        if path is None:
            # OHIF's client-side routes; a missing file with an extension stays a 404,
            # so that a broken bundle reference is seen as one.
            last = relative.rstrip("/").rsplit("/", 1)[-1]
            if "." in last:
                return 404, "text/plain; charset=utf-8", b"not found", {}
            path = self.root / "index.html"
        suffix = path.suffix.lower()
        content_type = _TYPES.get(suffix) or mimetypes.guess_type(path.name)[0] or \
            "application/octet-stream"
        with open(path, "rb") as f:
            body = f.read()
        name = os.path.relpath(path, self.root)
        cache = "public, max-age=31536000, immutable" if _HASHED.search(name) else "no-cache"
        return 200, content_type, body, {"Cache-Control": cache}
