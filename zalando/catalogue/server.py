"""The embedded catalogue server: Debian's PostgreSQL on 127.0.0.1, scram password authentication.

Used when no ``ZALANDO_CATALOG_DSN`` is set, the way :mod:`zalando.s3server` runs SeaweedFS. State
lives under ``<work_dir>/postgres/``: ``data/`` (the cluster), ``sock/`` (the Unix socket),
``postgres.log`` and ``server.json`` (our PID file). A server we find running is reused; a PID file
whose process is gone is reported as stale and replaced on the next start.

``initdb`` refuses to run as root, so as root every server command runs as the unprivileged
``postgres`` user (``runuser -u postgres --``) on folders that user owns; as a normal user they run
directly.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from zalando.catalogue.errors import CatalogueError
from zalando.s3server import pid_alive

log = logging.getLogger(__name__)

PG_ROOT = Path("/usr/lib/postgresql")
SERVER_USER = "postgres"  # who runs the server when we are root
_MAX_SOCKET_PATH = 107  # sun_path limit on Linux, minus the terminating NUL


def find_bin_dir(root: Path = PG_ROOT, version: str | None = None) -> Path:
    """``/usr/lib/postgresql/<version>/bin``: the given major version, else the newest one installed."""
    found = sorted(
        (p for p in root.glob("*/bin") if (p / "initdb").is_file() and (p / "pg_ctl").is_file()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1,
    )
    if version is not None:
        found = [p for p in found if p.parent.name == version]
    if not found:
        wanted = f"PostgreSQL {version} server binaries" if version else "PostgreSQL server binaries"
        raise CatalogueError(
            f"embedded catalogue: {wanted} not found under {root}/<version>/bin; "
            "install Debian's `postgresql` package (apt-get install postgresql) or set ZALANDO_CATALOG_DSN"
        )
    return found[-1]


def port_taken(port: int, host: str = "127.0.0.1", timeout: float = 0.3) -> bool:
    """True when something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        return s.connect_ex((host, port)) == 0


@dataclass
class PostgresServer:
    """One private PostgreSQL cluster serving 127.0.0.1:port."""

    state_dir: Path
    port: int
    user: str
    password: str = field(repr=False)  # never in a repr, a log line or a traceback
    database: str = "catalog"

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.state_dir / "sock"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "postgres.log"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "server.json"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ who runs it
    @staticmethod
    def as_root() -> bool:
        return os.geteuid() == 0

    def _owner(self) -> tuple[int, int]:
        """uid, gid that own the cluster's folders: the postgres user as root, else ourselves."""
        if not self.as_root():
            return os.getuid(), os.getgid()
        try:
            entry = pwd.getpwnam(SERVER_USER)
        except KeyError:
            raise CatalogueError(
                f"embedded catalogue: as root the server runs as the `{SERVER_USER}` user, which does not "
                "exist; install Debian's `postgresql` package (it creates the user)"
            ) from None
        return entry.pw_uid, entry.pw_gid

    def _command(self, args: list[str]) -> list[str]:
        if self.as_root():
            runuser = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
            if not runuser:
                raise CatalogueError(
                    "embedded catalogue: `runuser` (util-linux) is needed to run as postgres"
                )
            return [runuser, "-u", SERVER_USER, "--", *args]
        return args

    def _run(self, args: list[str], what: str, timeout: float) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                self._command(args),
                capture_output=True,
                text=True,
                cwd=self.state_dir,  # a folder the server user can enter (initdb reads its cwd)
                stdin=subprocess.DEVNULL,
                timeout=timeout,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"},
            )
        except subprocess.TimeoutExpired:
            raise CatalogueError(
                f"embedded catalogue: {what} did not finish within {timeout:.0f}s; see {self.log_file}"
            ) from None

    def _bin(self) -> Path:
        """The binaries matching the cluster's version (PG_VERSION), else the newest installed."""
        version_file = self.data_dir / "PG_VERSION"
        version = version_file.read_text().strip() if version_file.is_file() else None
        return find_bin_dir(version=version)

    # ------------------------------------------------------------------ state
    def _read_pid(self) -> int | None:
        try:
            return int(json.loads(self.pid_file.read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _is_ours(self, pid: int) -> bool:
        """The process is a postmaster of our data folder (not a recycled PID)."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return pid_alive(pid)
        return str(self.data_dir).encode() in cmdline  # postgres may rewrite argv: a substring test

    def server_pid(self) -> int | None:
        """The PID of our running postmaster, if any."""
        pid = self._read_pid()
        return pid if pid is not None and pid_alive(pid) and self._is_ours(pid) else None

    def status(self) -> str:
        """'running', 'starting', 'stale' (PID file, process gone), 'foreign' (port taken by another
        program) or 'stopped'."""
        if self.server_pid() is not None:
            return "running" if port_taken(self.port) else "starting"
        if self._read_pid() is not None:
            return "stale"
        return "foreign" if port_taken(self.port) else "stopped"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One start or stop at a time per cluster, across processes (two commands at once)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "server.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ start
    def _prepare_dirs(self) -> None:
        uid, gid = self._owner()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # the cluster's files bypass authentication: only we (and, as root, postgres) may enter
        self.state_dir.chmod(0o711 if self.as_root() else 0o700)
        self.socket_dir.mkdir(exist_ok=True)
        self.socket_dir.chmod(0o700)
        self.log_file.touch(mode=0o600, exist_ok=True)
        for path in (self.socket_dir, self.log_file):
            os.chown(path, uid, gid)
        sock = self.socket_dir / f".s.PGSQL.{self.port}"
        if len(str(sock)) > _MAX_SOCKET_PATH:
            raise CatalogueError(
                f"embedded catalogue: socket path {sock} is longer than {_MAX_SOCKET_PATH} characters; "
                "set ZALANDO_WORK_DIR to a shorter folder"
            )
        if self.as_root() and self._run(["test", "-w", str(self.socket_dir)], "access check", 30).returncode:
            raise CatalogueError(
                f"embedded catalogue: the `{SERVER_USER}` user cannot reach {self.state_dir} (a parent "
                "folder is closed to other users, e.g. mode 0700); set ZALANDO_WORK_DIR to a folder it can enter"
            )

    def _initdb(self) -> None:
        """Create the cluster (superuser = our user, scram everywhere) in a side folder, then rename it."""
        uid, gid = self._owner()
        staging = self.state_dir / "data.initdb"
        shutil.rmtree(staging, ignore_errors=True)
        pwfile = self.socket_dir / "initdb.pw"  # a real file the server user can read (not a pipe)
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.password + "\n")
        os.chown(pwfile, uid, gid)
        try:
            staging.mkdir(mode=0o700)
            os.chown(staging, uid, gid)
            proc = self._run(
                [
                    str(find_bin_dir() / "initdb"),
                    "-D",
                    str(staging),
                    "-A",
                    "scram-sha-256",
                    "-U",
                    self.user,
                    f"--pwfile={pwfile}",
                    "--encoding=UTF8",
                    "--no-locale",
                    "--no-instructions",
                ],
                "initdb",
                180,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if proc.returncode:
            shutil.rmtree(staging, ignore_errors=True)
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])
            raise CatalogueError(f"embedded catalogue: initdb failed (code {proc.returncode}): {tail}")
        staging.rename(self.data_dir)
        log.info("embedded catalogue: new cluster in %s (superuser %s)", self.data_dir, self.user)

    def start(self, timeout: float = 60.0) -> bool:
        """Start the server unless ours is already running. Returns True when this call started it."""
        with self._locked():
            return self._start(timeout)

    def _start(self, timeout: float) -> bool:
        state = self.status()
        if state in ("running", "starting"):
            self.wait_ready(timeout)
            log.info("embedded catalogue already running on %s (reused)", self.address)
            return False
        if state == "stale":
            log.warning("embedded catalogue: stale PID file %s (process gone); starting anew", self.pid_file)
            self.pid_file.unlink(missing_ok=True)
        if port_taken(self.port):
            raise CatalogueError(
                f"embedded catalogue: port {self.port} is already used by another program; "
                "set ZALANDO_CATALOG_PORT to a free port or ZALANDO_CATALOG_DSN to use that server"
            )
        self._prepare_dirs()
        if not (self.data_dir / "PG_VERSION").is_file():
            self._initdb()
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {shlex.quote(str(self.socket_dir))} "
            f"-c unix_socket_permissions=0700"
        )
        proc = self._run(
            [
                str(self._bin() / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-o",
                options,
                "-w",
                "-t",
                str(int(timeout)),
                "-s",
                "start",
            ],
            "pg_ctl start",
            timeout + 15,
        )
        pid = self._postmaster_pid()
        if proc.returncode or pid is None:
            tail = self.log_file.read_text(errors="replace").strip().splitlines()[-2:]
            if pid is not None:  # it came up after all, but not ready: do not leave it behind
                self._signal_stop(pid, timeout=15)
            raise CatalogueError(
                f"embedded catalogue did not start on {self.address} (pg_ctl code {proc.returncode}): "
                + " | ".join(tail or [(proc.stderr or "").strip()])
            )
        self.pid_file.write_text(json.dumps({"pid": pid, "port": self.port, "started_at": time.time()}))
        log.info("embedded catalogue started on %s (pid %d, data in %s)", self.address, pid, self.data_dir)
        return True

    def _postmaster_pid(self) -> int | None:
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if pid_alive(pid) else None

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port_taken(self.port):
                return
            if self.server_pid() is None:
                raise CatalogueError(f"embedded catalogue on {self.address} exited; see {self.log_file}")
            time.sleep(0.2)
        raise CatalogueError(f"embedded catalogue did not answer on {self.address} within {timeout:.0f}s")

    # ------------------------------------------------------------------ stop
    def stop(self, timeout: float = 30.0) -> bool:
        """Stop our server (and only ours): a fast shutdown. Returns True when a process was stopped."""
        if not self.state_dir.is_dir():
            return False
        with self._locked():
            return self._stop(timeout)

    def _stop(self, timeout: float) -> bool:
        pid = self.server_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        proc = self._run(
            [
                str(self._bin() / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-m",
                "fast",
                "-w",
                "-t",
                str(int(timeout)),
                "-s",
                "stop",
            ],
            "pg_ctl stop",
            timeout + 15,
        )
        if proc.returncode or pid_alive(pid):
            log.warning(
                "embedded catalogue: pg_ctl stop failed (%s); signalling pid %d", proc.stderr.strip(), pid
            )
            self._signal_stop(pid, timeout)
        self.pid_file.unlink(missing_ok=True)
        log.info("embedded catalogue on %s stopped", self.address)
        return True

    def _signal_stop(self, pid: int, timeout: float) -> None:
        """SIGINT (fast shutdown), then SIGQUIT (immediate) if it lingers."""
        for sig in (signal.SIGINT, signal.SIGQUIT):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and pid_alive(pid):
                time.sleep(0.1)
            if not pid_alive(pid):
                return


def server_for(settings: object) -> PostgresServer:
    """The embedded server a :class:`~zalando.settings.Settings` describes."""
    return PostgresServer(
        state_dir=Path(settings.work_dir).resolve() / "postgres",  # type: ignore[attr-defined]
        port=settings.catalog_port,  # type: ignore[attr-defined]
        user=settings.catalog_user,  # type: ignore[attr-defined]
        password=settings.catalog_password.get_secret_value(),  # type: ignore[attr-defined]
        database=settings.catalog_db,  # type: ignore[attr-defined]
    )


@contextlib.contextmanager
def embedded_postgres(settings: object) -> Iterator[PostgresServer | None]:
    """Run the embedded catalogue server for the duration of a command, when no DSN is set.

    A server already running (``zalando catalog init``) is reused and left running.
    """
    if not getattr(settings, "embedded_catalog", False):
        yield None
        return
    server = server_for(settings)
    started = server.start()
    try:
        yield server
    finally:
        if started:
            server.stop()
