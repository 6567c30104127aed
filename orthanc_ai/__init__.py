"""The one top-level name the orthanc-ai distribution installs.

The code lives in four packages, ``engine``, ``inference``, ``plugin`` and
``training`` (the folders of the design card). Installed as such, they would
land beside every other distribution's top-level modules, and those names are
taken: Roboflow's ``inference`` on PyPI installs a top-level ``inference``
package, and pip would mix its files with ours in one folder. So the wheel
puts them *inside* this package, ``site-packages/orthanc_ai/{engine,...}``,
with the files they read at run time (``orthanc.json``, ``orthanc/*.js``,
``models/``) at the same places relative to them as in a checkout (setup.py).
Nothing else goes into site-packages, and another distribution's
``import inference`` still finds its own.

The ``orthanc-ai`` command and the script Orthanc loads put :data:`ROOT`
first on ``sys.path`` and call :func:`claim`, which refuses to go on when one
of the four names would come from elsewhere; the workers and the model server
they start get ROOT first through ``PYTHONPATH``.
This module imports nothing of ours.
"""

from __future__ import annotations

import importlib.util
import os
import sys

PACKAGES = ("engine", "inference", "plugin", "training")
HERE = os.path.dirname(os.path.abspath(__file__))
# Installed: the packages are in this folder. A checkout: beside it.
ROOT = HERE if os.path.isdir(os.path.join(HERE, "engine")) else os.path.dirname(HERE)


def _origin(name: str) -> str | None:
    """Where ``import name`` finds (or found) the package; None if nowhere."""
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None) if module is not None else \
        importlib.util.find_spec(name)
    if spec is None:
        return None
    if spec.origin and spec.origin not in ("namespace", "built-in", "frozen"):
        return os.path.dirname(os.path.abspath(spec.origin))
    locations = list(spec.submodule_search_locations or [])
    return os.path.abspath(locations[0]) if locations else spec.origin


def conflicts(root: str = ROOT) -> list[str]:
    """One line per package name that resolves outside ``root``."""
    out = []
    for name in PACKAGES:
        origin = _origin(name)
        expected = os.path.join(root, name)
        if origin is None or os.path.realpath(origin) != os.path.realpath(expected):
            out.append(f"'{name}' resolves to {origin or 'nothing'}, not {expected}")
    return out


def claim(root: str = ROOT) -> None:
    """Put ``root`` first on ``sys.path``; fail when a package name of ours would
    still come from another distribution (already imported, for instance)."""
    while root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)
    found = conflicts(root)
    if found:
        raise ImportError(
            "orthanc-ai: another distribution's module shadows ours: " + "; ".join(found)
            + " (see README, 'Installing from a wheel')")


def main() -> int:
    """The ``orthanc-ai`` command."""
    claim()
    from engine.cli import main as cli_main

    return cli_main()
