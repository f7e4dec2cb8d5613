"""The local stack's warm scorer: `zalando score FOLDER` hands it the batch instead of starting
Python, Prefect, pyiceberg and torch, and loading the champion, for every command (about 2 s of a
warm run against 10 s cold on our 2-core machines: `benchmarks/cli_score.py`).

    python infra/scorer.py --state WORK/stack/scorer.json      # `infra/stack.py up` starts it

It binds 127.0.0.1 on the port its state file names and asks every request for the token there
(the file is the stack user's, mode 0600: whoever may read it may hand the scorer a folder to read).
It runs one batch at a time through the CLI's own code (:func:`zalando.cli_score.score_one`: the input
checks, then the `batch_scoring` flow on the stack's Prefect server, so the run is in the Prefect UI
as any other), with the caller's batch roots, and only when its settings are the caller's
(:func:`zalando.local_stack.settings_fingerprint`; else 409 and the CLI scores in its own process).
The answer holds the batch's summary, or the error's one line and exit code, and the log records of
the run, which the CLI writes as its own. ``/progress`` (the token too) says how many images of the
batch being scored its shards have committed: the CLI draws its progress bar from it when a batch
takes longer than 1.5 s.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fastapi import FastAPI, Header, HTTPException  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

log = logging.getLogger("zalando.scorer")


class ScoreRequest(BaseModel):
    """One `zalando score LOCATION` as the CLI was asked for it."""

    model_config = ConfigDict(extra="forbid")

    location: str | None = None  # None: the demo batch (the test split in the lake)
    batch_date: str | None = None
    model_version: str | None = None
    runner: str = "local"
    shard_size: int = Field(10_000, ge=1)
    workers: int = Field(1, ge=1, le=64)
    force: bool = False
    dask_address: str | None = None
    allow_empty: bool = False
    shadow: bool = False
    verbose: bool = False
    batch_roots: list[str]  # the caller's (its current directory is one by default)
    settings: dict[str, str]  # the caller's settings_fingerprint


class _Capture(logging.Handler):
    """The log records of one request (the scorer runs one at a time), each once."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[dict[str, Any]] = []
        self._seen: set[int] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if id(record) in self._seen:  # a logger with its own handler and propagation
            return
        self._seen.add(id(record))
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string never fails the batch
            message = str(record.msg)
        self.records.append({"name": record.name, "level": record.levelno, "message": message})


class _Current:
    """The batch being scored now: its shard progress (None between batches)."""

    shards: Any = None

    @classmethod
    def set(cls, shards: Any) -> None:
        cls.shards = shards


def _score(req: ScoreRequest) -> JSONResponse:
    """Score one batch with the caller's batch roots; the caller's settings must be ours."""
    from zalando import cli_common
    from zalando.cli_score import score_one
    from zalando.local_stack import settings_fingerprint
    from zalando.scoring.batch import find_demo_batch

    old_roots = os.environ.get("ZALANDO_BATCH_ROOTS")
    os.environ["ZALANDO_BATCH_ROOTS"] = json.dumps(req.batch_roots)  # the flow's tasks read it too
    capture = _Capture(logging.DEBUG if req.verbose else logging.INFO)
    loggers = [logging.getLogger(), logging.getLogger("prefect")]
    try:
        settings = cli_common.settings_from()
        mine = settings_fingerprint(settings)
        differ = sorted(k for k in set(mine) | set(req.settings) if mine.get(k) != req.settings.get(k))
        if differ:
            return JSONResponse({"detail": f"the scorer runs other settings ({', '.join(differ)})"}, 409)
        for lg in loggers:
            lg.addHandler(capture)
        t0 = time.perf_counter()
        with cli_common.lake_session(settings) as lake:
            summary = score_one(
                lake,
                settings,
                req.location or find_demo_batch(lake),
                **req.model_dump(exclude={"location", "verbose", "batch_roots", "settings"}),
                prefect_api=f"{os.environ.get('PREFECT_API_URL')} (the local stack's server, "
                f"through its warm scorer, pid {os.getpid()})",
                progress=False,
                on_progress=_Current.set,
            )
        log.info("batch %s scored in %.2fs", summary.get("batch_id"), time.perf_counter() - t0)
        body = {"ok": True, "summary": json.loads(json.dumps(summary, default=str))}
    except Exception as e:  # noqa: BLE001 - every failure goes back to the caller as the CLI would say it
        z = cli_common.zalando_error_of(e)
        if z is None:
            log.exception("the scorer failed on %s", req.location)
            body = {"ok": False, "error": f"the scorer failed: {type(e).__name__}: {e}", "exit_code": 1}
        else:
            text = str(z).strip()
            body = {"ok": False, "error": text.splitlines()[0] if text else type(z).__name__, "exit_code": 2}
    finally:
        for lg in loggers:
            lg.removeHandler(capture)
        if old_roots is None:
            os.environ.pop("ZALANDO_BATCH_ROOTS", None)
        else:
            os.environ["ZALANDO_BATCH_ROOTS"] = old_roots
    body["logs"] = capture.records
    return JSONResponse(body)


def _load_champion() -> str:
    """Load (once per version: the predictor cache) the lake's current champion; its version."""
    from zalando import cli_common
    from zalando.scoring.champion import load_champion_predictor

    with cli_common.lake_session(cli_common.settings_from()) as lake:
        return load_champion_predictor(lake).model_version


def watch_champion(lock: threading.Lock, every_s: float, stop: threading.Event) -> None:
    """Every ``every_s`` seconds, load a newly promoted champion between batches, so the first batch
    after a promotion does not pay its load (3 s on our machines). Failures are logged, never raised."""
    last = None
    while not stop.wait(every_s):
        try:
            with lock:
                version = _load_champion()
        except Exception as e:  # noqa: BLE001 - no champion, the lake blinked: the next batch loads it
            log.debug("champion not loaded ahead (%s)", e)
            continue
        if version != last:
            log.info("champion %s loaded, ahead of the next batch", version)
            last = version


def create_app(token: str, lock: threading.Lock | None = None) -> FastAPI:
    """The scorer's two routes: /health (no token) and /score (the token, one batch at a time)."""
    app = FastAPI(title="zalando warm scorer", docs_url=None, redoc_url=None, openapi_url=None)
    lock = lock or threading.Lock()
    expected = f"Bearer {token}".encode()

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"ready": True, "pid": os.getpid(), "busy": lock.locked()}

    def check(authorization: str) -> None:
        if not hmac.compare_digest(authorization.encode(), expected):
            raise HTTPException(401, "the token of the stack's scorer.json is needed")

    @app.post("/score")
    def score(req: ScoreRequest, authorization: str = Header("")) -> JSONResponse:
        check(authorization)
        with lock:
            return _score(req)

    @app.get("/progress")
    def progress(authorization: str = Header("")) -> dict[str, Any]:
        """The batch being scored: images its shards have committed, of its total ({} between batches)."""
        check(authorization)
        shards = _Current.shards
        return shards.poll() if shards is not None else {}

    return app


def warm_up() -> None:
    """Import what a batch needs and load the champion once (when there is one), before /health
    says ready: the first batch then costs what every later one does."""
    from zalando import cli_common

    settings = cli_common.settings_from()
    cli_common.setup_logging(False)
    api = cli_common.flow_env(settings)  # the stack's Prefect server, as the CLI's own runs use it
    t0 = time.perf_counter()
    import flows.batch_scoring  # noqa: F401 - prefect, pyiceberg, torch, scipy: the cold start

    try:
        _load_champion()
    except Exception as e:  # noqa: BLE001 - no champion yet is fine: the first batch loads it
        log.info("no champion loaded at start (%s)", str(e).splitlines()[0] if str(e) else type(e).__name__)
    log.info("warm in %.1fs; Prefect API %s", time.perf_counter() - t0, api)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infra/scorer.py", description=__doc__.split("\n")[0])
    parser.add_argument("--state", required=True, type=Path, help="scorer.json: port and token")
    parser.add_argument(
        "--watch-s", type=float, default=30.0, help="seconds between looks for a new champion (0: never)"
    )
    args = parser.parse_args(argv)
    try:
        state = json.loads(args.state.read_text())
        port, token = int(state["port"]), str(state["token"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: {args.state}: no readable port and token ({e})", file=sys.stderr)
        return 2
    import uvicorn

    warm_up()
    lock, stop = threading.Lock(), threading.Event()
    if args.watch_s > 0:
        threading.Thread(target=watch_champion, args=(lock, args.watch_s, stop), daemon=True).start()
    try:
        uvicorn.run(
            create_app(token, lock), host="127.0.0.1", port=port, log_level="warning", access_log=False
        )
    finally:
        stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
