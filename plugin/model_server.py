"""Start our model server (``inference.server``) as a helper process of Orthanc.

Inside Orthanc ``sys.executable`` is Orthanc itself, so the server is started
with the virtual environment's own ``python``, never with multiprocessing.
It watches Orthanc's PID and stops when Orthanc is gone, even after kill -9.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from .supervisor import PROJECT_ROOT, venv_python


def start_model_server(
    models: Path, log_path: Path, threads: int = 0, nice: int = 10
) -> tuple[str, subprocess.Popen]:
    # The listening socket is made here and handed over: no other process can
    # take the port while the server imports TensorFlow, and early requests
    # wait in the backlog instead of being refused.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        port = sock.getsockname()[1]
        python = venv_python(os.environ.get("ORTHANC_AI_SITE_PACKAGES"))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                ["nice", "-n", str(nice), str(python), "-m", "inference.server",
                 "--models", str(models), "--listen-fd", str(sock.fileno()),
                 "--threads", str(threads), "--parent-pid", str(os.getpid())],
                cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, pass_fds=(sock.fileno(),),
                env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
            )
    return f"http://127.0.0.1:{port}", proc
