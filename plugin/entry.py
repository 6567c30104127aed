"""The script Orthanc's Python plugin loads (configuration key ``PythonScript``).

The embedded interpreter only sees this script's folder, so we put the
project root and the virtual environment's site-packages on ``sys.path``
before importing anything of ours, then hand over to the adapter.
"""

import faulthandler
import os
import site
import sys

# A crash in native code (a codec, TensorFlow) then leaves Python stacks in
# Orthanc's log instead of a bare "Segmentation fault".
faulthandler.enable(all_threads=True)

HERE = os.path.dirname(os.path.realpath(__file__))  # a PythonScript may be a link
ROOT = os.path.dirname(HERE)

# Our own folder on sys.path would let plugin/*.py shadow top-level modules.
while HERE in sys.path:
    sys.path.remove(HERE)
# From a wheel, ROOT is <venv>/lib/pythonX.Y/site-packages/orthanc_ai (see
# orthanc_ai/__init__.py); in a checkout, the venv is ROOT/.venv.
_installed = os.path.basename(os.path.dirname(ROOT)) == "site-packages"
_site = os.environ.get("ORTHANC_AI_SITE_PACKAGES") or (
    os.path.dirname(ROOT) if _installed else os.path.join(
        ROOT, ".venv", "lib", "python{}.{}".format(*sys.version_info[:2]), "site-packages"))
# The venv (and the project) must come before Debian's dist-packages, which
# the embedded interpreter also searches: an older Debian module shadowing
# the venv's (e.g. one pulled in by docker-compose) crashed TensorFlow's import.
_before = [p for p in sys.path if p != ROOT]
if os.path.isdir(_site):
    site.addsitedir(_site)  # also runs the venv's .pth files
sys.path[:] = [ROOT] + [p for p in sys.path if p not in _before and p != ROOT] + _before

# engine, inference, plugin and training must be ours, not another distribution's.
import orthanc_ai  # noqa: E402

orthanc_ai.claim(ROOT)

# What the REST routes import late is imported now, on Orthanc's main thread:
# with Python 3.14 (orthanc-python 7.1), code compiled or eval'd on Orthanc's
# HTTP threads, whose C stacks are small, fails with "MemoryError: Parser stack
# overflowed" (namedtuple's eval in prometheus_client's import did, in /ai/).
import getpass  # noqa: E402, F401

import prometheus_client.core  # noqa: E402, F401
import prometheus_client.multiprocess  # noqa: E402, F401

import engine.audit  # noqa: E402, F401
from plugin import adapter  # noqa: E402

adapter.install()
