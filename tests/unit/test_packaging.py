"""orthanc_ai.claim: our four package names come from our folder or we stop,
in a child interpreter each (sys.modules of its own) with another
distribution's ``inference`` in the way."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import orthanc_ai
from engine.config import PROJECT_ROOT


def _python(code: str, cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(pythonpath)})


def _foreign(tmp_path: Path) -> Path:
    path = tmp_path / "elsewhere"
    (path / "inference").mkdir(parents=True)
    (path / "inference" / "__init__.py").write_text('WHOSE = "another distribution"\n')
    return path


def test_in_this_checkout_everything_is_ours():
    assert orthanc_ai.ROOT == str(PROJECT_ROOT)
    assert orthanc_ai.conflicts() == []


def test_claim_puts_ours_before_another_inference_on_the_path(tmp_path):
    proc = _python("import orthanc_ai; orthanc_ai.claim(); import inference, engine.cli; "
                   "print(inference.__file__)", tmp_path, _foreign(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(PROJECT_ROOT / "inference" / "__init__.py")


def test_claim_refuses_another_inference_already_imported(tmp_path):
    elsewhere = _foreign(tmp_path)
    proc = _python("import inference, orthanc_ai; orthanc_ai.claim()", tmp_path, elsewhere)
    assert proc.returncode != 0
    assert "another distribution's module shadows ours: 'inference' resolves to " \
        f"{elsewhere / 'inference'}, not {PROJECT_ROOT / 'inference'}" in proc.stderr


def test_the_command_and_the_orthanc_script_claim_first():
    scripts = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"orthanc-ai": "orthanc_ai:main"}
    entry = (PROJECT_ROOT / "plugin" / "entry.py").read_text()
    before_ours = entry.split("orthanc_ai.claim(ROOT)")[0]
    assert "import orthanc_ai" in before_ours
    assert "from plugin" not in before_ours and "import engine" not in before_ours
