"""A current Orthanc beside Debian 12's: Debian forky in a folder, run in a chroot.

Debian 12 ships Orthanc 1.10.1 with orthanc-python 4.0. Sites run current
releases (the Orthanc Team's image 26.8.1: Orthanc 1.13.0, Python plugin 7.1,
DICOMweb 1.24, Python 3.14). Debian testing "forky" carries those same
versions and the same Python minor version, so a forky root made with
``debootstrap`` is how the suite and users try the product on them here.
(Trixie's Orthanc 1.12.7 predates the decoder fixes of 1.12.11.)

    python -m engine.current_orthanc build     # once; reused while its stamp matches

The root holds Orthanc, its Python, DICOMweb and PostgreSQL plugins, and a
venv made with the root's own Python 3.14 at ``/opt/orthanc-ai/venv``.
TensorFlow 2.21 has no build for Python 3.14, so that venv has no TensorFlow:
the plugin's workers reach the models over HTTP, on our model server started
from the project's own venv outside the root (``serve --orthanc current``).

Orthanc runs as ``unshare --mount`` + ``chroot``: a private mount namespace
in which the project, the data folder and ``/tmp`` are bound at their own
paths, so configuration files and the plugin's paths mean the same inside and
out, and the mounts vanish with the process. The process keeps its pid
(nothing forks), so a signal to it reaches Orthanc itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from engine.config import PROJECT_ROOT

SUITE = "forky"
MIRROR = os.environ.get("ORTHANC_AI_DEBIAN_MIRROR", "http://deb.debian.org/debian")
ROOT = Path(os.environ.get("ORTHANC_AI_CURRENT_ROOT", PROJECT_ROOT / "build" / "orthanc-current"))
PACKAGES = (
    "orthanc", "orthanc-python", "orthanc-dicomweb", "orthanc-postgresql",
    "python3", "python3-venv", "python3-dev", "g++", "ca-certificates", "coreutils",
)
VENV = "/opt/orthanc-ai/venv"
STAMP = ".orthanc-ai-stamp.json"
LOCK = PROJECT_ROOT / "requirements.lock"


def requirements() -> list[str]:
    """pyproject's dependencies that apply to the root's Python 3.14 (all but
    TensorFlow), installed at the lock's versions. pyjpegls (highdicom's) has no
    wheel for 3.14: hence g++ and python3-dev in the root."""
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    return [d for d in project["dependencies"] if "python_version < '3.14'" not in d]


def python_minor(root: Path = ROOT) -> str:
    """``3.14``: the root's python3, read from its files (no need to run it)."""
    names = sorted(p.name for p in (root / "usr" / "lib").glob("python3.*")
                   if (p / "os.py").exists())
    if not names:
        raise FileNotFoundError(f"no Python in {root}")
    return names[-1].removeprefix("python")


def site_packages(root: Path = ROOT) -> str:
    """The venv's site-packages as the root sees it."""
    return f"{VENV}/lib/python{python_minor(root)}/site-packages"


def wanted() -> dict:
    """What the stamp records: a change in any of it rebuilds the root."""
    lock = hashlib.sha256(LOCK.read_bytes()).hexdigest()
    return {"suite": SUITE, "packages": sorted(PACKAGES),
            "requirements": sorted(requirements()), "lock": lock}


def is_current(root: Path = ROOT) -> bool:
    try:
        return json.loads((root / STAMP).read_text()) == wanted()
    except (OSError, ValueError):
        return False


def package_versions(root: Path = ROOT) -> dict[str, str]:
    """Installed versions of the Orthanc packages, from the root's dpkg status
    (removed packages whose configuration stays are not installed)."""
    versions = {}
    for stanza in (root / "var/lib/dpkg/status").read_text(encoding="utf-8").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line
                      and not line.startswith(" "))
        name = fields.get("Package", "")
        if name.startswith(("orthanc", "python3")) and "Version" in fields and \
                fields.get("Status", "").endswith(" installed"):
            versions[name] = fields["Version"]
    return versions


def _step(message: str) -> None:
    print(f"[current Orthanc] {message}", flush=True)


def _chroot(root: Path, script: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["DEBIAN_FRONTEND"] = "noninteractive"
    subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                    f'mount -t proc proc "{root}/proc"; exec chroot "{root}" sh -ec "$0"',
                    script], check=True, env=env)


def build(root: Path = ROOT) -> Path:
    """Make the root if its stamp does not match; return it."""
    if is_current(root):
        return root
    for tool in ("debootstrap", "unshare", "chroot"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is missing: install Debian's debootstrap and util-linux")
    new = root.with_name(root.name + ".new")
    shutil.rmtree(new, ignore_errors=True)
    new.parent.mkdir(parents=True, exist_ok=True)
    _step(f"debootstrap {SUITE} into {new} (about 1-2 minutes) ...")
    # bookworm's debootstrap has no script named forky: sid's is the one for testing.
    subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                    SUITE, str(new), MIRROR, "/usr/share/debootstrap/scripts/sid"],
                   check=True, stdout=subprocess.DEVNULL)
    # The host's trust store: PyPI may be reached through this site's TLS proxy.
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", new / "etc/ssl/certs/ca-certificates.crt")
    shutil.copy("/etc/resolv.conf", new / "etc/resolv.conf")
    shutil.copy(LOCK, new / "tmp/requirements.lock")
    wanted_here = " ".join(f"'{r}'" for r in requirements())
    _step(f"venv with the root's Python {python_minor(new)} at {VENV} (about 1-2 minutes) ...")
    _chroot(new, f"python3 -m venv {VENV}; {VENV}/bin/pip install -q --no-cache-dir "
                 f"--disable-pip-version-check -c /tmp/requirements.lock {wanted_here}; "
                 "rm /tmp/requirements.lock")
    (new / STAMP).write_text(json.dumps(wanted(), indent=1))
    shutil.rmtree(root, ignore_errors=True)
    new.rename(root)
    versions = package_versions(root)
    _step("ready: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())
                                 if k.startswith("orthanc")))
    return root


def command(argv: list[str], binds: list[Path], root: Path = ROOT) -> list[str]:
    """``argv`` (paths as the root sees them) run in the root, with ``binds``
    visible at their own paths, plus /dev, /proc, /sys and /tmp."""
    if not is_current(root):
        raise RuntimeError("the current Orthanc's root is missing or stale: run "
                           "`make current-orthanc` (python -m engine.current_orthanc build)")
    mounts = ['mount -t proc proc "$R/proc"', 'mount --rbind /dev "$R/dev"',
              'mount --rbind /sys "$R/sys"']
    for path in dict.fromkeys([Path("/tmp"), *(Path(b).resolve() for b in binds)]):
        mounts.append(f'mkdir -p "$R{path}" && mount --bind "{path}" "$R{path}"')
    script = "; ".join(mounts) + '; exec chroot "$R" "$@"'
    return ["unshare", "--mount", "--propagation", "private", "env", f"R={root}",
            "sh", "-ec", script, "sh", *argv]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["build"]:
        build()
        return 0
    if args[:1] == ["versions"]:
        print(json.dumps(package_versions(), indent=1))
        return 0
    print("usage: python -m engine.current_orthanc build|versions", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
