"""Install the OHIF viewer that the plugin serves under ``/ohif/``.

The npm package ``@ohif/app`` ships a prebuilt ``dist/`` that needs nothing
else (``npm install`` of the package fails on our registry for a missing
dependency; the tarball alone is enough). We download the pinned tarball
from the npm registry, check its published sha512, unpack ``dist/`` and
make it work under a sub-path: the prebuilt files assume they are served at
``/``. Every rewrite below names what it changes and how many places it
must find, so that another OHIF version fails here, loudly, instead of
serving a viewer that loads nothing.

One rewrite is a fix of OHIF 3.13.2 itself: its image loader reads the VOI
LUT Function (0028,1056) as an array and takes element 0, while the DICOMweb
metadata gives a string, so "LINEAR" becomes "L", which cornerstone3D
rejects ("Invalid VOI LUT function"; cornerstone3D #2844, OHIF #6239):
radiographs carrying the attribute render black or blown out. We accept a
string or an array there, and keep the files as the modality sent them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

VERSION = "3.13.2"
INTEGRITY = ("sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq"
             "+jd5xXZB9E8EA==")
REGISTRY = "https://registry.npmjs.org"
PREFIX = "/ohif/"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
APP_CONFIG = PROJECT_ROOT / "orthanc" / "ohif-app-config.js"
DEFAULT_DIR = PROJECT_ROOT / "build" / "ohif"
REWRITES_VERSION = 3  # bump when a rewrite below changes: installed copies are redone


class InstallError(RuntimeError):
    pass


def study_link(study_uid: str, sr_series_uid: str | None = None) -> str:
    """OHIF's page for a study, relative to Orthanc's root ("ohif/viewer?...").

    With our SR's series, OHIF opens that SR: the finding drawn on its image,
    a CT on its key slice.
    """
    query = {"StudyInstanceUIDs": study_uid}
    if sr_series_uid:
        query["initialSeriesInstanceUID"] = sr_series_uid
    return f"{PREFIX.lstrip('/')}viewer?{urllib.parse.urlencode(query)}"


def _tarball_name() -> str:
    return f"app-{VERSION}.tgz"


def _download(dest: Path, progress: Callable[[str], None]) -> None:
    url = f"{os.environ.get('ORTHANC_AI_NPM_REGISTRY', REGISTRY).rstrip('/')}" \
          f"/@ohif/app/-/{_tarball_name()}"
    opener = urllib.request.build_opener()
    with opener.open(url, timeout=60) as answer:
        total = int(answer.headers.get("Content-Length") or 0)
        digest, got, shown = hashlib.sha512(), 0, -1
        with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as out:
            while chunk := answer.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                got += len(chunk)
                percent = got * 100 // total if total else -1
                if percent // 10 != shown // 10:
                    shown = percent
                    progress(f"OHIF {VERSION}: downloaded {got >> 20} MiB"
                             + (f" ({percent} %)" if total else ""))
    found = "sha512-" + base64.b64encode(digest.digest()).decode()
    if found != INTEGRITY:
        os.unlink(out.name)
        raise InstallError(f"@ohif/app {VERSION}: the tarball's sha512 is not the published one")
    os.replace(out.name, dest)


def _sub(text: str, pattern: str, replacement: str, *, name: str, file: str,
         at_least: int = 1, exactly: int | None = None, regex: bool = False) -> str:
    found = len(re.findall(pattern if regex else re.escape(pattern), text))
    if (exactly is not None and found != exactly) or found < at_least:
        want = exactly if exactly is not None else f"at least {at_least}"
        raise InstallError(f"OHIF {VERSION}: {name}: {found} place(s) in {file}, expected {want}")
    if regex:
        return re.sub(pattern, replacement, text)
    return text.replace(pattern, replacement)


_PUBLIC_PATH = '__webpack_require__.p = "/";'

# Fixes of OHIF 3.13.2's own code: (bundle name prefix, what, regex, replacement).
_FIXES = (
    # The image loader's VOI LUT Function: an array's first element, or a string.
    ("app.bundle.", "VOI LUT Function read as a string",
     r"\(voiLutModule\.voiLUTFunction\?\.length &&\s+voiLutModule\.voiLUTFunction\[0\]\)",
     "(Array.isArray(voiLutModule.voiLUTFunction) ? voiLutModule.voiLUTFunction[0] "
     ": voiLutModule.voiLUTFunction)"),
    # A TID 1501 group without coordinates (a finding found absent: nothing to
    # draw) made the SR extension throw, and no finding of that SR was shown.
    ("7248.bundle.", "SR measurement group without coordinates",
     r"const referencedSOPSequence = measurement\.coords\[0\]\.ReferencedSOPSequence;",
     "const referencedSOPSequence = measurement.coords[0]?.ReferencedSOPSequence;"),
    # The SR display of a TID 1410 group drew its NUMs and "363698007: <site>",
    # never the finding: the group's Comment (the finding in words) goes first,
    # and the site is labelled in words.
    ("7248.bundle.", "SR finding in words",
     r"label: enums/\* \.CodeNameCodeSequenceValues\.FindingSiteSCT \*/\.n7\.FindingSiteSCT,"
     r"(\s+value: findingSites\[0\]\.ConceptCodeSequence\.CodeMeaning\s+\}\);\s+\})"
     r"(\s+return measurement;)",
     "label: 'Finding site',\\1\n  const comment = mergedContentSequence.find(item => "
     "item.ValueType === 'TEXT' && item.ConceptNameCodeSequence.CodeValue === '121106' && "
     "item.ConceptNameCodeSequence.CodingSchemeDesignator === 'DCM');\n"
     "  if (comment) {\n    measurement.labels.unshift({ label: 'Finding', "
     "value: comment.TextValue });\n  }\\2"),
    ("app.bundle.", "microscopy viewer path", r"'/dicom-microscopy-viewer/",
     "'@@PREFIX@@dicom-microscopy-viewer/"),
)


def rewrite(dist: Path, prefix: str = PREFIX) -> dict[str, int]:
    """Make a prebuilt dist/ work under ``prefix``; what was changed, by kind."""
    if not (prefix.startswith("/") and prefix.endswith("/")):
        raise InstallError("the OHIF prefix must start and end with '/'")
    counts: dict[str, int] = {}

    def done(kind: str, n: int = 1) -> None:
        counts[kind] = counts.get(kind, 0) + n

    index = dist / "index.html"
    html = index.read_text(encoding="utf-8")
    html = _sub(html, 'window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{prefix}"',
                name="window.PUBLIC_URL", file="index.html", exactly=2)
    # Workbox is loaded from Google's CDN: no service worker in a hospital.
    html = _sub(html, '<script rel="preload" as="script" type="module" '
                      'src="/init-service-worker.js"></script>', "",
                name="service worker", file="index.html", exactly=1)
    for attr in ("href", "src"):
        html = _sub(html, f'{attr}="/', f'{attr}="{prefix}', name=f"absolute {attr}",
                    file="index.html")
    index.write_text(html, encoding="utf-8")
    done("index.html")

    bundles, fixed = 0, set()
    for path in sorted(dist.glob("*.js")):
        text = path.read_text(encoding="utf-8")
        changed = text
        if _PUBLIC_PATH in changed:
            changed = changed.replace(_PUBLIC_PATH, f'__webpack_require__.p = "{prefix}";')
            bundles += 1
        for bundle, what, pattern, replacement in _FIXES:
            if path.name.startswith(bundle):
                changed = _sub(changed, pattern, replacement.replace("@@PREFIX@@", prefix),
                               name=what, file=path.name, exactly=1, regex=True)
                fixed.add(what)
        if changed != text:
            path.write_text(changed, encoding="utf-8")
    missing = {what for _, what, _, _ in _FIXES} - fixed
    if missing:
        raise InstallError(f"OHIF {VERSION}: no bundle to fix for: {', '.join(sorted(missing))}")
    done("fixes", len(fixed))
    if bundles < 2:
        raise InstallError(f"OHIF {VERSION}: webpack public path found in {bundles} bundle(s)")
    done("webpack public path", bundles)

    for path in sorted(dist.glob("*.css")):
        text = path.read_text(encoding="utf-8")
        if "url(/" in text:
            path.write_text(text.replace("url(/", f"url({prefix}"), encoding="utf-8")
            done("css")

    config = APP_CONFIG.read_text(encoding="utf-8")
    (dist / "app-config.js").write_text(
        _sub(config, "@@PREFIX@@", prefix, name="prefix", file=APP_CONFIG.name, exactly=1),
        encoding="utf-8")
    done("app-config.js")
    return counts


def _stamp(prefix: str) -> dict:
    return {"version": VERSION, "integrity": INTEGRITY, "prefix": prefix,
            "rewrites": REWRITES_VERSION,
            "app_config": hashlib.sha256(APP_CONFIG.read_bytes()).hexdigest()}


def installed(root: Path = DEFAULT_DIR, prefix: str = PREFIX) -> bool:
    try:
        return json.loads((root / "installed.json").read_text()) == _stamp(prefix)
    except (OSError, ValueError):
        return False


def _unpack(tarball: Path, dest: Path) -> None:
    """``package/dist/`` of the tarball into ``dest``: plain files only, no path outside it
    (Debian 12's Python 3.11.2 has no tarfile extraction filters)."""
    with tarfile.open(tarball) as tar:
        for member in tar:
            name = member.name
            if not member.isfile() or not name.startswith("package/dist/"):
                continue
            parts = Path(name[len("package/dist/"):]).parts
            if not parts or any(p in ("", ".", "..") for p in parts) or name.startswith("/"):
                raise InstallError(f"OHIF {VERSION}: unsafe path in the tarball")
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as data, open(target, "wb") as out:
                shutil.copyfileobj(data, out)


def install(root: Path = DEFAULT_DIR, prefix: str = PREFIX,
            progress: Callable[[str], None] | None = None) -> Path:
    """Install (once) and return the folder the plugin serves: ``root/dist``."""
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    dist = root / "dist"
    if installed(root, prefix):
        os.utime(root / "installed.json")  # make's stamp
        return dist
    root.mkdir(parents=True, exist_ok=True)
    tarball = root / _tarball_name()
    if not tarball.exists():
        _download(tarball, say)
    say(f"OHIF {VERSION}: unpacking and rewriting for {prefix}")
    staging = Path(tempfile.mkdtemp(dir=root, prefix="dist."))
    try:
        _unpack(tarball, staging)
        counts = rewrite(staging, prefix)
        if dist.exists():
            shutil.rmtree(dist)
        os.replace(staging, dist)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (root / "installed.json").write_text(json.dumps(_stamp(prefix), indent=2))
    say(f"OHIF {VERSION}: installed in {dist} ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    return dist


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m engine.ohif",
                                     description="Install the OHIF viewer served at /ohif/.")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    try:
        install(args.dir)
    except (InstallError, OSError) as exc:
        print(f"orthanc-ai: OHIF not installed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["VERSION", "PREFIX", "DEFAULT_DIR", "InstallError", "install", "installed", "rewrite"]
