"""The wheel's layout (metadata: pyproject.toml).

One top-level package, ``orthanc_ai``, holds ``engine``, ``inference``,
``plugin`` and ``training`` and the files they read at run time, at the same
places relative to each other as in this checkout, so that their
``Path(__file__)``-relative paths hold in both (orthanc_ai/__init__.py says
why nothing else is installed at the top level).
"""

import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
TOP = ("engine", "inference", "plugin", "training")
# Read at run time through engine.config.PROJECT_ROOT (MANIFEST.in puts them in the sdist).
DATA = ("orthanc.json", "orthanc/explorer.js", "orthanc/ohif-app-config.js", "models")


class BuildWithData(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads them from the checkout
        into = Path(self.build_lib) / "orthanc_ai"
        for name in DATA:
            source, target = HERE / name, into / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.rmtree(target, ignore_errors=True)  # nothing left from a former build
                shutil.copytree(source, target,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(source, target)


packages = find_packages(include=[f"{t}*" for t in TOP] + ["orthanc_ai"])
setup(
    packages=[p if p == "orthanc_ai" else f"orthanc_ai.{p}" for p in packages],
    package_dir={"orthanc_ai": "orthanc_ai", **{f"orthanc_ai.{t}": t for t in TOP}},
    cmdclass={"build_py": BuildWithData},
)
