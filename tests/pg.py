"""A throw-away PostgreSQL server for tests, on a free loopback port.

    with PostgresServer(tmp_path) as pg:
        store = open_store(pg.url)            # the default database
        other = pg.create_database()          # a fresh one, by URL

Debian's server binaries (``postgresql-15``: /usr/lib/postgresql/NN/bin) are
used directly, not the ``pg_ctlcluster`` wrappers. initdb refuses to run as
root, so as root the cluster belongs to the ``postgres`` user and the server
runs as that user. The cluster lives in a folder of its own under /tmp
(pytest's folders are not traversable by another user) and goes at
:meth:`~PostgresServer.stop`; the server's log goes to ``folder``.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.harness import free_port

DEBIAN_BINDIRS = "/usr/lib/postgresql"


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries are not installed (or not usable)."""


def find_bindir() -> Path:
    """The folder holding ``initdb`` and ``postgres``: $PG_BINDIR, pg_config, Debian's."""
    candidates: list[Path] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        if out:
            candidates.append(Path(out))
    except (OSError, subprocess.SubprocessError):
        pass

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in p.parent.name.split(".") if x.isdigit())

    debian = [p / "bin" for p in Path(DEBIAN_BINDIRS).glob("*") if p.name[:1].isdigit()]
    candidates += sorted(debian, key=version, reverse=True)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, postgres) not found in "
        f"{[str(c) for c in candidates] or DEBIAN_BINDIRS}: install them with "
        "`apt-get install postgresql` (scripts/install-debian.sh) or set PG_BINDIR")


class PostgresServer:
    """``postgres`` as a child process; :attr:`url` names database :attr:`dbname`."""

    def __init__(self, folder: Path | str | None = None, *, dbname: str = "orthanc_ai",
                 settings: dict[str, Any] | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.dbname = dbname
        self.settings = {"fsync": "off", "full_page_writes": "off",
                         "synchronous_commit": "on", "max_connections": "200",
                         **(settings or {})}
        self.host = "127.0.0.1"
        self.port = 0
        self.cluster: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self._log: Any = None
        self._names = itertools.count(1)
        self.bindir: Path | None = None

    # -- addresses -----------------------------------------------------------

    @property
    def url(self) -> str:
        return self.url_for(self.dbname)

    def url_for(self, dbname: str) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{dbname}"

    @property
    def data_dir(self) -> Path:
        assert self.cluster is not None, "not started"
        return self.cluster / "data"

    # -- life cycle ----------------------------------------------------------

    def start(self, timeout: float = 60.0) -> PostgresServer:
        self.bindir = find_bindir()
        self.cluster = Path(tempfile.mkdtemp(prefix="orthanc-ai-pg-", dir="/tmp"))
        os.chmod(self.cluster, 0o700)
        if os.geteuid() == 0:
            try:
                pg = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable(
                    "running as root needs the `postgres` user (package postgresql-common)"
                ) from None
            os.chown(self.cluster, pg.pw_uid, pg.pw_gid)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.log_path = self.folder / "postgres.log"
        else:
            self.log_path = self.cluster / "postgres.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - open while the server runs
        try:
            self._run([str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                       "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"])
            for _ in range(3):  # a free port can be taken before the server binds it
                self.port = free_port()
                if self._launch(timeout):
                    break
            else:
                raise RuntimeError(f"PostgreSQL did not start; see {self.log_path}:\n"
                                   + self.log_tail())
            self.create_database(self.dbname)
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, timeout: float = 60.0) -> None:
        """Fast shutdown, then the same cluster on the same port (clients are cut off)."""
        self._shutdown()
        if not self._launch(timeout):
            raise RuntimeError(f"PostgreSQL did not restart; see {self.log_path}:\n"
                               + self.log_tail())

    def stop(self) -> None:
        self._shutdown()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.cluster is not None:
            shutil.rmtree(self.cluster, ignore_errors=True)
            self.cluster = None

    def __enter__(self) -> PostgresServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # -- databases -----------------------------------------------------------

    def connect(self, dbname: str = "postgres") -> Any:
        """An autocommit psycopg connection (close it)."""
        import psycopg

        return psycopg.connect(self.url_for(dbname), autocommit=True, connect_timeout=5)

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database (a fresh name unless given); its URL."""
        from psycopg import sql

        name = name or f"test_{os.getpid()}_{next(self._names)}"
        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def reset_database(self, name: str) -> str:
        """``name`` empty again (created if missing), faster than a new database; its URL.

        Its sessions are ended and its ``public`` schema dropped and made anew.
        """
        from psycopg import sql

        with self.connect() as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            (name,)).fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                return self.url_for(name)
        self.terminate_sessions(name)
        with self.connect(name) as conn:
            conn.execute("DROP SCHEMA IF EXISTS public CASCADE")
            conn.execute("CREATE SCHEMA public")
        return self.url_for(name)

    def drop_database(self, name_or_url: str) -> None:
        """Drop it, ending the sessions still connected to it."""
        from psycopg import sql

        name = name_or_url.rsplit("/", 1)[-1]
        with self.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                         .format(sql.Identifier(name)))

    def terminate_sessions(self, dbname: str) -> int:
        """Cut every client of ``dbname`` off, as a server restart would."""
        with self.connect() as conn:
            row = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,)).fetchone()
        return int(row[0]) if row else 0

    # -- internals -----------------------------------------------------------

    def _user_args(self) -> dict[str, Any]:
        if os.geteuid() != 0:
            return {}
        return {"user": "postgres", "group": "postgres", "extra_groups": []}

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return env

    def _run(self, cmd: list[str]) -> None:
        assert self.cluster is not None
        proc = subprocess.run(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                              cwd=self.cluster, env=self._env(), timeout=120,
                              **self._user_args())
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}); see {self.log_path}:\n"
                               + self.log_tail())

    def _launch(self, timeout: float) -> bool:
        """Start postgres on self.port; False if it exited (the port was taken)."""
        import psycopg

        assert self.bindir is not None and self.cluster is not None
        cmd = [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
               "-k", str(self.cluster), "-c", f"listen_addresses={self.host}"]
        for key, value in self.settings.items():
            cmd += ["-c", f"{key}={value}"]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=self.cluster, env=self._env(), **self._user_args())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                return False
            try:
                psycopg.connect(self.url_for("postgres"), connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                time.sleep(0.05)
        self._shutdown()
        raise RuntimeError(f"PostgreSQL not ready after {timeout:.0f} s; see {self.log_path}:\n"
                           + self.log_tail())

    def _shutdown(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)  # fast shutdown: roll back, disconnect, checkpoint
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGQUIT)  # immediate shutdown
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
