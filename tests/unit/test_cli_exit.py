"""The `zalando` process ends right after its exit handlers (no interpreter teardown), with the status,
output and clean-up of a normal exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, *(["-c", code] if code else []), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _main_with_app(body: str) -> str:
    """A script running `zalando.cli.main` with `app` replaced by ``body`` (a function's statements)."""
    return (
        "import atexit, sys\n"
        "from zalando import cli\n"
        "def app():\n" + "".join(f"    {line}\n" for line in body.splitlines()) + "cli.app = app\n"
        "cli.main()\n"
    )


def test_a_command_error_keeps_exit_code_2_and_its_one_line() -> None:
    r = _python("", "-m", "zalando.cli", "score", "--from", "2026-01-01")
    assert r.returncode == 2, r.stderr
    assert "error: --from and --to go together" in r.stderr


def test_exit_handlers_registered_during_the_command_run_and_output_is_flushed(tmp_path: Path) -> None:
    marker = tmp_path / "handler-ran"
    script = _main_with_app(
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ok'))\n"
        "sys.stdout.write('no newline, still buffered')\n"
        "sys.exit(3)"
    )
    r = _python(script)
    assert r.returncode == 3, r.stderr
    assert r.stdout == "no newline, still buffered"
    assert marker.read_text() == "ok"  # e.g. Prefect stopping its temporary server


def test_the_interpreter_teardown_is_skipped() -> None:
    # an object alive at exit is freed only by the teardown (torch's and Prefect's modules, here a probe)
    script = "class Probe:\n    def __del__(self):\n        sys.stderr.write('torn down')\nprobe = Probe()\n"
    assert "torn down" in _python(script + "import sys\n").stderr  # a plain interpreter tears down
    r = _python(script + _main_with_app("print('done')"))
    assert r.returncode == 0 and r.stdout == "done\n" and "torn down" not in r.stderr


def test_a_string_status_exits_1_with_its_message() -> None:
    r = _python(_main_with_app("sys.exit('went wrong')"))
    assert r.returncode == 1 and "went wrong" in r.stderr


def test_an_escaping_exception_exits_as_python_does() -> None:
    r = _python(_main_with_app("raise RuntimeError('boom')"))
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "RuntimeError: boom" in r.stderr
