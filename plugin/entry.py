"""The script Orthanc's Python plugin loads (configuration key ``PythonScript``).

The embedded interpreter only sees this script's folder, so we put the
project root and the virtual environment's site-packages on ``sys.path``
before importing anything of ours, then hand over to the adapter.
"""

import os
import site
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Our own folder on sys.path would let plugin/*.py shadow top-level modules.
while HERE in sys.path:
    sys.path.remove(HERE)
_site = os.environ.get("ORTHANC_AI_SITE_PACKAGES") or os.path.join(
    ROOT, ".venv", "lib", "python{}.{}".format(*sys.version_info[:2]), "site-packages"
)
if os.path.isdir(_site):
    site.addsitedir(_site)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from plugin import adapter  # noqa: E402

adapter.install()
