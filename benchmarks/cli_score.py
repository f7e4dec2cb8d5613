"""`zalando score FOLDER` (the real command, a subprocess) on 500 PNG files: with the local stack up,
and without it.

    PYTHONPATH=$PWD nice -n 10 .venv/bin/python benchmarks/cli_score.py [--runs 3] [--no-stack-runs 2] [--fresh-runs 1]

It starts its own stack (``infra/stack.py up``: SeaweedFS, a Prefect server, a process worker and
the warm scorer on 127.0.0.1, on free ports, in a fresh temporary work folder), makes a champion
through the command (``zalando ingest`` of the mini data set, ``zalando train -e fashion_cnn`` with
the ``quick`` profile), and writes the mini set's 500 test images as PNG files into the work folder.
Then it times:

1. ``--runs`` scorings with the stack up: the command hands the batch to the stack's warm scorer;
2. ``--runs`` scorings with the stack up and ``ZALANDO_SCORER=off``: the command runs the flow in its
   own process, on the stack's Prefect server and S3 server;
3. ``infra/stack.py down``, then ``--no-stack-runs`` scorings without it: the command starts the S3
   server and a temporary Prefect server on the work folder's Prefect state (migrated by then);
4. ``--fresh-runs`` scorings without it on an empty PREFECT_HOME: the temporary server migrates a
   new database first.

Every run scores a new batch (its own ``--date``), as a user's next folder would be. Each run must
say in its log which Prefect API it used (the stack's / a temporary server), or the benchmark fails.
Everything it started is stopped at the end, always; the work folder is removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from zalando.s3server import free_port_block  # noqa: E402

MINI = REPO.parent / "shared" / "data" / "fashion-mnist-mini"
CLI = [sys.executable, "-m", "zalando.cli"]  # what the `zalando` console script runs
STACK = [sys.executable, str(REPO / "infra" / "stack.py")]
FIRST_DAY = date(2026, 1, 1)


def say(msg: str = "") -> None:
    print(msg, flush=True)


def bench_env(work: Path) -> dict[str, str]:
    """This benchmark's own stack and command environment (nothing of a developer's stack leaks in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZALANDO_", "PREFECT_"))}
    env.update(
        ZALANDO_WORK_DIR=str(work),
        ZALANDO_PREFECT_PORT=str(free_port_block(1, start=42000)),
        ZALANDO_S3_PORT=str(free_port_block()),
        ZALANDO_LAKE_URI="s3://zalando-cli/lake",
        ZALANDO_S3_ACCESS_KEY="clibench",
        ZALANDO_S3_SECRET_KEY=secrets.token_hex(16),
        ZALANDO_DATA_SOURCE=str(MINI),
        ZALANDO_PROFILE="quick",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        CODECARBON_LOG_LEVEL="error",
        COLUMNS="200",  # the log lines stay whole in a pipe
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    return env


def run(
    cmd: list[str], env: dict[str, str], what: str, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise SystemExit(
            f"{what} failed (exit {res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        )
    return res


def write_png_folder(folder: Path) -> int:
    """The mini set's test images (500), one PNG file each."""
    from PIL import Image

    from zalando.data.idx import read_idx_images

    images = read_idx_images(str(MINI / "t10k-images-idx3-ubyte.gz"))
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"test-{i:04d}.png")
    return len(images)


def scorer_cpu(work: Path) -> float:
    """CPU seconds the stack's warm scorer has used so far (0 when it does not run)."""
    try:
        pid = json.loads((work / "stack" / "scorer.pid").read_text())["pid"]
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, KeyError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_score(env: dict[str, str], folder: Path, day: date, expect: str) -> tuple[float, float]:
    """Wall and CPU seconds (the command, the servers it started and the warm scorer) of one
    `zalando score FOLDER`."""
    work = Path(env["ZALANDO_WORK_DIR"])
    scorer_before = scorer_cpu(work)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = run([*CLI, "score", folder.as_uri(), "--date", day.isoformat()], env, f"zalando score ({expect})")
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    said = " ".join(res.stderr.split())  # rich wraps log lines
    if f"Prefect API: {expect}" not in said:
        raise SystemExit(f"zalando score did not use {expect!r}:\n{res.stderr[-3000:]}")
    if "500 scored" not in " ".join(res.stdout.split()) + said:
        raise SystemExit(f"zalando score did not score the 500 images:\n{res.stdout[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu + scorer_cpu(work) - scorer_before


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="scorings with the stack up")
    parser.add_argument("--no-stack-runs", type=int, default=2, help="scorings without it")
    parser.add_argument("--fresh-runs", type=int, default=1, help="without it, on an empty PREFECT_HOME")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="zalando-cli-bench-"))
    env = bench_env(work)
    api = f"http://127.0.0.1:{env['ZALANDO_PREFECT_PORT']}/api"
    rows: list[tuple[str, float, float]] = []
    load_before = os.getloadavg()[0]
    stack_up = False
    day = FIRST_DAY
    try:
        say(f"work folder {work}; stack on {api}")
        t0 = time.perf_counter()
        stack_up = True  # from here on `down` runs, even if `up` fails half-way
        run([*STACK, "up"], env, "infra/stack.py up", timeout=600)
        say(f"  stack up in {time.perf_counter() - t0:.1f}s")
        t0 = time.perf_counter()
        run([*CLI, "ingest"], env, "zalando ingest")
        run([*CLI, "train", "-e", "fashion_cnn"], env, "zalando train", timeout=1800)
        say(f"  champion (ingest + quick fashion_cnn) in {time.perf_counter() - t0:.1f}s")
        folder = work / "inbox-png"
        say(f"  {write_png_folder(folder)} PNG files in {folder}")

        for i in range(args.runs):
            wall, cpu = time_score(
                env, folder, day, f"{api} (the local stack's server, through its warm scorer"
            )
            rows.append((f"stack up, warm scorer #{i + 1}", wall, cpu))
            say(f"  stack up, warm scorer #{i + 1}: {wall:.1f}s")
            day += timedelta(days=1)
        in_process = dict(env, ZALANDO_SCORER="off")
        for i in range(args.runs):
            wall, cpu = time_score(in_process, folder, day, f"{api} (the local stack's server)")
            rows.append((f"stack up, ZALANDO_SCORER=off #{i + 1}", wall, cpu))
            say(f"  stack up, in-process #{i + 1}: {wall:.1f}s")
            day += timedelta(days=1)

        run([*STACK, "down"], env, "infra/stack.py down", timeout=120)
        stack_up = False
        for i in range(args.no_stack_runs):
            wall, cpu = time_score(env, folder, day, "a temporary server")
            rows.append((f"no stack, Prefect state kept #{i + 1}", wall, cpu))
            say(f"  no stack #{i + 1}: {wall:.1f}s")
            day += timedelta(days=1)
        for i in range(args.fresh_runs):
            fresh = dict(env, PREFECT_HOME=str(work / f"prefect-fresh-{i}"))
            wall, cpu = time_score(fresh, folder, day, "a temporary server")
            rows.append((f"no stack, fresh PREFECT_HOME #{i + 1}", wall, cpu))
            say(f"  no stack, fresh #{i + 1}: {wall:.1f}s")
            day += timedelta(days=1)
    finally:
        if stack_up:
            subprocess.run([*STACK, "down"], env=env, cwd=REPO, capture_output=True, timeout=120)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    width = max(len(name) for name, _, _ in rows)
    say()
    say(f"{'zalando score FOLDER (500 PNG files)'.ljust(width)}  wall s  cpu s")
    for name, wall, cpu in rows:
        say(f"{name.ljust(width)}  {wall:6.1f}  {cpu:5.1f}")
    say(
        f"(load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores; "
        "cpu s: the command, the servers it started and the warm scorer, user + system)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
