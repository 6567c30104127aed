"""The forky root's bookkeeping and the command line that runs Orthanc in it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from engine import cli
from engine import current_orthanc as current


def fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "usr/lib/python3.14").mkdir(parents=True)
    (root / "usr/lib/python3.14/os.py").write_text("")
    (root / "usr/lib/python3").mkdir()  # Debian's dist-packages folder, not an interpreter
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text(
        "Package: orthanc\nStatus: install ok installed\nVersion: 1.13.0+dfsg-1+b1\n\n"
        "Package: libc6\nStatus: install ok installed\nVersion: 2.42-1\n\n"
        "Package: orthanc-python\nStatus: install ok installed\nVersion: 7.1+ds-1+b2\n\n"
        "Package: orthanc-gdcm\nStatus: deinstall ok config-files\nVersion: 1.7-1\n")
    return root


def test_python_minor_and_site_packages(tmp_path: Path) -> None:
    root = fake_root(tmp_path)
    assert current.python_minor(root) == "3.14"
    assert current.site_packages(root) == "/opt/orthanc-ai/venv/lib/python3.14/site-packages"


def test_package_versions_read_from_dpkg_status(tmp_path: Path) -> None:
    assert current.package_versions(fake_root(tmp_path)) == {
        "orthanc": "1.13.0+dfsg-1+b1", "orthanc-python": "7.1+ds-1+b2"}


def test_stamp_decides_whether_the_root_is_current(tmp_path: Path) -> None:
    root = fake_root(tmp_path)
    assert not current.is_current(root)
    (root / current.STAMP).write_text(json.dumps(current.wanted()))
    assert current.is_current(root)
    stale = dict(current.wanted(), packages=["orthanc"])
    (root / current.STAMP).write_text(json.dumps(stale))
    assert not current.is_current(root)


def test_a_stale_root_is_refused_with_the_command_that_makes_it(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="make current-orthanc"):
        current.command(["/usr/sbin/Orthanc", "x.json"], [], fake_root(tmp_path))


def test_command_binds_paths_at_their_own_place_and_keeps_the_pid(tmp_path: Path) -> None:
    root = fake_root(tmp_path)
    (root / current.STAMP).write_text(json.dumps(current.wanted()))
    project = tmp_path / "my project"
    argv = current.command(["/usr/sbin/Orthanc", "/data/o.json"], [project, project], root)
    assert argv[:4] == ["unshare", "--mount", "--propagation", "private"]
    assert argv[-2:] == ["/usr/sbin/Orthanc", "/data/o.json"]
    script = argv[argv.index("-ec") + 1]
    assert script.count(f'mount --bind "{project}" "$R{project}"') == 1  # once, quoted
    assert 'mount --bind "/tmp" "$R/tmp"' in script
    assert script.endswith('exec chroot "$R" "$@"')  # exec all the way: Orthanc keeps the pid
    # The script is valid sh (parsed, not run).
    subprocess.run(["sh", "-n", "-c", script], check=True)


# -- what serve switches on, by version -------------------------------------------

@pytest.mark.parametrize(("versions", "expected"), [
    ({"orthanc": "1.10.1+dfsg-2+deb12u1", "orthanc-python": "4.0+ds-1+b7"}, {}),  # bookworm
    ({"orthanc": "1.12.7+dfsg-1", "orthanc-python": "5.0+ds-1"},  # trixie
     {"Python": {"AllowThreads": True}}),
    ({"orthanc": "1.12.10"}, {"HttpBindAddresses": ["127.0.0.1"]}),  # no Python package known
    ({"orthanc": "1.13.0+dfsg-1+b1", "orthanc-python": "7.1+ds-1+b2"},  # forky
     {"HttpBindAddresses": ["127.0.0.1"], "Python": {"AllowThreads": True}}),
    ({"orthanc": "mainline"}, {}),
])
def test_serve_uses_what_the_orthanc_version_offers(versions, expected) -> None:
    config: dict = {}
    cli.use_capabilities(config, versions)
    assert config == expected


def test_the_configuration_wins_over_the_capabilities() -> None:
    config = {"HttpBindAddresses": ["10.0.0.2"], "Python": {"AllowThreads": False}}
    assert cli.use_capabilities(config, {"orthanc": "1.13.0", "orthanc-python": "7.1"}) == []
    assert config == {"HttpBindAddresses": ["10.0.0.2"], "Python": {"AllowThreads": False}}


def test_versions_of_this_machine_and_of_the_root(tmp_path: Path) -> None:
    assert cli.orthanc_versions(fake_root(tmp_path))["orthanc"] == "1.13.0+dfsg-1+b1"
    here = cli.orthanc_versions()  # Debian 12's packages (scripts/install-debian.sh)
    assert here["orthanc"].startswith("1.10.1") and here["orthanc-python"].startswith("4.0")
