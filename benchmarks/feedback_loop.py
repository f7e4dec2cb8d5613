"""The feedback loop of issue 15, end to end on the local stack, with the numbers of every step.

    PYTHONPATH=$PWD nice -n 10 .venv/bin/python benchmarks/feedback_loop.py [--profile cpu|quick] [--labels 1000]

It starts its own stack (``infra/stack.py up``: SeaweedFS, a Prefect server and a process worker, all
on 127.0.0.1, on free ports, in a fresh work folder under ``.zalando/``), registers the deployments
and automations of ``prefect.yaml``, and stops everything it started at the end. Then:

0. `training/retrain` makes today's champion on the data of the profile (cpu: the real 60k set,
   ``../shared/data/fashion-mnist``; quick: the mini set, a smoke run).
1. `batch_scoring/score` scores a drifted batch: test images 0-4999 inverted (255 - pixels).
2. Its drift alarm fires (the statistics are printed) and the review queue holds its images.
3. ``zalando labels import`` (the real CLI) records the first N items the reviewers see: on a drifted
   batch the desk's audit sample (every image in a fixed random order: confidence is what drift
   breaks), otherwise the review queue, most doubtful
   first, with the test split's known groups standing in for reviewers; the labelled KPIs run.
4. The drift and/or KPI alarm's automation creates `retrain` runs on the server; one runs (the
   others, the same retrain, are cancelled), on a new dataset version (dsf-...), and the gates decide.
5. The champion after it scores the next inverted batch (test images 5000-9999); today's champion
   scores the same images for comparison. Target: grouped accuracy >= 95%.
6. Both score the original test split. Target: the new champion's grouped accuracy at most 0.2
   points below today's.

The work pool is paused from the moment the drifted batch is being scored until the labels are in,
so the alarms' retrain runs wait for the reviewers instead of retraining on the old data. A
benchmark, not a test: it prints a table and exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from zalando.data.arrays import images_from_table, images_to_arrow  # noqa: E402
from zalando.labels import GROUP_NAMES  # noqa: E402
from zalando.s3server import free_port_block  # noqa: E402

DATA = {
    "cpu": REPO.parent / "shared" / "data" / "fashion-mnist",
    "quick": REPO.parent / "shared" / "data" / "fashion-mnist-mini",
}
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
FIRST, NEXT = "batches/loop-inverted-first", "batches/loop-inverted-next"
ORIGINAL = "batches/loop-original-test"  # the test split as it is (a lake batch like the others)
TARGET_INVERTED = 0.95
MAX_TEST_DROP = 0.002  # 0.2 points


def say(msg: str = "") -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------- Prefect


class Api:
    """The Prefect server's REST API (503 retried: the server answers it while SQLite is locked)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _open(self, req: urllib.request.Request | str) -> Any:
        for attempt in range(6):
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    body = r.read()
                return json.loads(body) if body else None
            except urllib.error.HTTPError as e:
                if e.code != 503 or attempt == 5:
                    raise
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"{self.url}{path}", data=data, headers={"Content-Type": "application/json"}, method=method
        )
        return self._open(req)

    def deployment_id(self, flow: str, name: str) -> str:
        flows = {f["id"]: f["name"] for f in self.call("POST", "/flows/filter", {})}
        for d in self.call("POST", "/deployments/filter", {}):
            if d["name"] == name and flows.get(d["flow_id"]) == flow:
                return d["id"]
        raise SystemExit(f"deployment {flow}/{name} is not registered")

    def start(self, deployment_id: str, parameters: dict[str, Any]) -> str:
        run = self.call("POST", f"/deployments/{deployment_id}/create_flow_run", {"parameters": parameters})
        return run["id"]

    def run(self, run_id: str) -> dict[str, Any]:
        return self.call("GET", f"/flow_runs/{run_id}")

    def wait(self, run_id: str, timeout_s: float, *, until: set[str] = FINAL) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            run = self.run(run_id)
            if run["state"]["type"] in until or time.monotonic() > deadline:
                return run
            time.sleep(2)

    def runs_of(self, deployment_id: str) -> list[dict[str, Any]]:
        return self.call("POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}})

    def cancel(self, run_id: str) -> None:
        self.call(
            "POST",
            f"/flow_runs/{run_id}/set_state",
            {"state": {"type": "CANCELLED", "name": "Cancelled"}, "force": True},
        )

    def pause_pool(self, paused: bool) -> None:
        self.call("PATCH", "/work_pools/zalando", {"is_paused": paused})


def _at(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def state_of(run: dict[str, Any]) -> str:
    return run["state"]["type"]


# ---------------------------------------------------------------------------------------------- stack


def stack_env(work: Path, profile: str) -> dict[str, str]:
    """The environment of this benchmark's own stack (nothing of a developer's stack leaks in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZALANDO_", "PREFECT_"))}
    port = free_port_block(1, start=42000)
    env.update(
        ZALANDO_WORK_DIR=str(work),
        ZALANDO_PREFECT_PORT=str(port),
        ZALANDO_S3_PORT=str(free_port_block()),
        ZALANDO_LAKE_URI="s3://zalando-loop/lake",
        ZALANDO_S3_ACCESS_KEY="loopbench",
        ZALANDO_S3_SECRET_KEY=secrets.token_hex(16),
        ZALANDO_DATA_SOURCE=str(DATA[profile]),
        ZALANDO_PROFILE=profile,
        PREFECT_WORKER_QUERY_SECONDS="2",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        CODECARBON_LOG_LEVEL="error",
        GOMP_SPINCOUNT=env.get("GOMP_SPINCOUNT", "10000"),
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    return env


def run_stack(env: dict[str, str], *args: str, timeout: float = 300) -> None:
    res = subprocess.run(
        [sys.executable, str(REPO / "infra" / "stack.py"), *args],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if res.returncode != 0:
        raise SystemExit(f"infra/stack.py {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")


# ---------------------------------------------------------------------------------------------- lake


def inverted_batches(lake: Any) -> dict[str, int]:
    """Write test images 0-4999 and 5000-9999, inverted, as two lake batches; the true group of every
    image id they hold (and of the test split's own ids)."""
    from zalando.data.ingest import load_raw
    from zalando.lake import new_run_id

    test = load_raw(lake, "test", columns=["image_id", "image", "group"])
    originals = images_from_table(test)
    images = 255 - originals
    ids = test.column("image_id").to_pylist()
    groups = test.column("group").to_numpy().astype(int)
    truth = dict(zip(ids, groups.tolist(), strict=True))
    half = len(ids) // 2
    for key, sl in ((FIRST, slice(0, half)), (NEXT, slice(half, None))):
        inv_ids = [f"inv-{i}" for i in ids[sl]]
        table = pa.table({"image_id": pa.array(inv_ids), "image": images_to_arrow(images[sl])})
        lake.commit_partition(key, {"part-00000": table}, new_run_id(), {"drift": "invert"})
        truth.update(zip(inv_ids, groups[sl].tolist(), strict=True))
    table = pa.table({"image_id": pa.array(ids), "image": images_to_arrow(originals)})
    lake.commit_partition(ORIGINAL, {"part-00000": table}, new_run_id(), {"drift": "none"})
    say(
        f"  batches: {FIRST} = test images 0-{half - 1}, {NEXT} = {half}-{len(ids) - 1}, inverted; {ORIGINAL} = the test split as it is"
    )
    return truth


def batch_id(key: str, day: date) -> str:
    from zalando.scoring.batch import default_source_slug, make_batch_id

    return make_batch_id(day, default_source_slug(key))


def grouped_accuracy(store: Any, bid: str, version: str, truth: dict[str, int]) -> tuple[float, int]:
    rows = store.prediction_rows(bid, version, needs_review_only=False)
    ids = rows.column("image_id").to_pylist()
    pred = rows.column("pred_group").to_numpy().astype(int)
    true = np.asarray([truth[i] for i in ids])
    return float((pred == true).mean()), len(ids)


def gate_tables(lake: Any, after: str | None) -> list[str]:
    """The gate decisions logged after decision ``after``: one table of checks per model."""
    from zalando.registry import decision_log

    log = decision_log(lake)
    if after is not None:
        log = log[log["decision_id"] > after]
    out = []
    for r in log.itertuples(index=False):
        out.append(f"  {r.action} {r.model_version} ({r.experiment}): {r.reason}")
        decision = json.loads(r.decision) if isinstance(r.decision, str) else r.decision
        for c in (decision or {}).get("rows", []):
            v, t = c.get("value"), c.get("threshold")
            fv = f"{v:.4f}" if isinstance(v, float) else str(v)
            ft = f"{t:.4f}" if isinstance(t, float) else ("-" if t is None else str(t))
            out.append(
                f"    {c['check']:<34} {fv:>10} {c['rule']:>22} {ft:>10}  {'pass' if c['passed'] else 'FAIL'}"
            )
    return out


def _best_gated(gated: Any, old: str) -> str | None:
    """The rejected model of the retrain with the highest validation macro F1 (None: one was promoted)."""
    best, best_f1 = None, -1.0
    for r in gated.itertuples(index=False):
        if r.model_version == old or r.action != "reject":
            continue
        decision = json.loads(r.decision) if isinstance(r.decision, str) else (r.decision or {})
        f1 = next(
            (c["value"] for c in decision.get("rows", []) if c["check"] == "macro_f1_vs_champion"), None
        )
        if f1 is not None and f1 > best_f1:
            best, best_f1 = r.model_version, f1
    return best


def last_decision_id(lake: Any) -> str | None:
    from zalando.registry import decision_log

    log = decision_log(lake)
    return None if log.empty else str(log["decision_id"].max())


# ---------------------------------------------------------------------------------------------- the loop


class Loop:
    """One benchmark run: its stack, lake and server, and what each step measured."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str]) -> None:
        from zalando.lake import Lake
        from zalando.settings import load_settings
        from zalando.ui.store import LakeStore

        self.args, self.env = args, env
        self.api = Api(f"http://127.0.0.1:{env['ZALANDO_PREFECT_PORT']}/api")
        self.lake = Lake.from_settings(load_settings())
        self.store = LakeStore(self.lake)
        self.day = datetime.now(UTC).date()
        self.wait_s = args.timeout_min * 60
        self.results: list[tuple[str, str, str, bool | None]] = []  # step, measured, target, met
        self.retrain = self.api.deployment_id("training", "retrain")
        self.score = self.api.deployment_id("batch_scoring", "score")

    def record(self, step: str, measured: str, target: str = "", met: bool | None = None) -> None:
        self.results.append((step, measured, target, met))

    def score_batch(self, key: str, *, model_version: str | None = None, monitor: bool = False) -> str:
        params: dict[str, Any] = {
            "batch_date": self.day.isoformat(), "batch_uri": key, "force": True, "monitor": monitor,
        }  # fmt: skip
        if model_version:
            params["model_version"] = model_version
        run = self.api.wait(self.api.start(self.score, params), self.wait_s)
        if state_of(run) != "COMPLETED":
            raise SystemExit(f"scoring {key}: flow run {run['name']} {state_of(run)}")
        return batch_id(key, self.day)

    # -- step 0
    def todays_champion(self) -> str:
        from zalando.registry import get_champion

        t0 = time.monotonic()
        params: dict[str, Any] = {"profile": self.args.profile, "reason": "feedback-loop benchmark: today"}
        if self.args.profile == "quick":
            params["experiments"] = ["fashion_cnn"]
        run = self.api.wait(self.api.start(self.retrain, params), self.wait_s)
        champion = get_champion(self.lake)
        if state_of(run) != "COMPLETED" or champion is None:
            raise SystemExit(f"today's champion: retrain run {run['name']} {state_of(run)}, no champion")
        version = champion["model_version"]
        say(
            f"0. today's champion {version} ({champion['experiment']}), trained in {time.monotonic() - t0:.0f} s"
        )
        return version

    # -- steps 1-2
    def drifted_batch(self) -> str:
        t0 = time.monotonic()
        params = {"batch_date": self.day.isoformat(), "batch_uri": FIRST, "force": True, "monitor": True}
        run_id = self.api.start(self.score, params)
        # pause the pool once scoring runs: the alarm's retrain waits for the reviewers' labels
        self.api.wait(run_id, self.wait_s, until=FINAL | {"RUNNING"})
        self.api.pause_pool(True)
        run = self.api.wait(run_id, self.wait_s)
        if state_of(run) != "COMPLETED":
            raise SystemExit(f"scoring the drifted batch: flow run {run['name']} {state_of(run)}")
        bid = batch_id(FIRST, self.day)
        batch = self.store.batch(bid)
        say(
            f"1. scored {bid}: {batch.scored} images in {time.monotonic() - t0:.0f} s (flow run {run['name']})"
        )
        say("2. drift statistics of the batch (model " + batch.model_version + "):")
        for d in batch.drift:
            v = "-" if d.value is None else f"{d.value:.4f}"
            t = "-" if d.threshold is None else f"{d.threshold:.4f}"
            say(f"     {d.statistic:<28} value {v:>10}  threshold {t:>10}  {'ALARM' if d.alarm else 'ok'}")
        self.record(
            "drift alarm on the inverted batch",
            ", ".join(batch.alarms) or "none",
            "fires",
            bool(batch.alarms),
        )
        say(
            f"   review queue: {batch.needs_review} of {batch.scored} images (confidence < {batch.confidence_threshold})"
        )
        self.record(
            "review queue (needs_review)", f"{batch.needs_review} of {batch.scored}", "holds the batch", None
        )
        return bid

    # -- step 3
    def _doubtful_first(self, bid: str) -> list[str]:
        """The review queue, most doubtful first, topped up from the batch by confidence."""
        queue = self.store.prediction_rows(bid, needs_review_only=True).column("image_id").to_pylist()
        from_queue = min(len(queue), self.args.labels)
        if len(queue) < self.args.labels:  # a short queue: the batch's other items, most doubtful first
            # (what a reviewer sees filtering the batch by a confidence range on the desk)
            rest = self.store.prediction_rows(bid, needs_review_only=False).column("image_id").to_pylist()
            seen = set(queue)
            queue += [i for i in rest if i not in seen]
        picked = queue[: self.args.labels]
        more = len(picked) - from_queue
        say(
            f"   labelling {len(picked)} items: {from_queue} from the review queue (most doubtful first)"
            + (f", {more} more of the batch by confidence" if more else "")
        )
        return picked

    def label(self, bid: str, truth: dict[str, int], *, drifted: bool) -> int:
        if drifted:  # the desk's advice on a drifted batch: its confidence can't be trusted, so the
            # reviewers work through the audit sample (every image, a fixed random order)
            rows = self.store.prediction_rows(bid, needs_review_only=False, order="audit")
            picked = rows.column("image_id").to_pylist()[: self.args.labels]
            in_queue = sum(rows.column("needs_review").to_pylist()[: self.args.labels])
            say(
                f"   labelling {len(picked)} items of the audit sample (drift alarm: a fair sample of the "
                f"batch; {in_queue} of them are in the review queue)"
            )
        else:
            picked = self._doubtful_first(bid)
        csv = Path(self.env["ZALANDO_WORK_DIR"]) / f"labels-{bid}.csv"
        csv.write_text(
            "image_id,batch_id,label,reviewer\n"
            + "".join(f"{i},{bid},{GROUP_NAMES[truth[i]]},benchmark:test-labels\n" for i in picked)
        )
        t0 = time.monotonic()
        res = subprocess.run(
            [sys.executable, "-m", "zalando.cli", "labels", "import", str(csv)],
            cwd=REPO, env=os.environ.copy(), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        say(f"3. zalando labels import {csv.name} ({len(picked)} rows, {time.monotonic() - t0:.0f} s):")
        for line in res.stdout.strip().splitlines():
            say("     " + line)
        if res.returncode != 0:
            raise SystemExit(f"labels import failed ({res.returncode}):\n{res.stderr}")
        recorded = len(self.store.read_feedback(bid))
        want = len(picked)  # --labels, or the whole batch when it is smaller (the mini set's 250)
        self.record("labels recorded (zalando labels import)", str(recorded), str(want), recorded == want)
        return recorded

    # -- step 4
    def retrain_on_feedback(self, since: datetime) -> str | None:
        deadline, runs = time.monotonic() + 120, []
        while time.monotonic() < deadline:
            runs = [r for r in self.api.runs_of(self.retrain) if _at(r["created"]) >= since]
            if any(str(r["parameters"].get("reason", "")).startswith("kpi alarm") for r in runs):
                break
            time.sleep(3)
        say("4. retrain runs the alarms' automations created:")
        for r in runs:
            say(
                f"     {r['name']}  reason={r['parameters'].get('reason')!r}  profile={r['parameters'].get('profile')}"
            )
        self.record("retrain started by an alarm", ", ".join(
            sorted({str(r['parameters'].get('reason', '')).split(' on ')[0] for r in runs})) or "none",
            "drift and/or kpi", bool(runs))  # fmt: skip
        if not runs:
            self.api.pause_pool(False)
            return None
        runs.sort(key=lambda r: (not str(r["parameters"].get("reason", "")).startswith("kpi"), r["created"]))
        keep, dupes = runs[0], runs[1:]
        for r in dupes:
            self.api.cancel(r["id"])
            say(f"     cancelled {r['name']}: the same retrain as {keep['name']}")
        t0 = time.monotonic()
        self.api.pause_pool(False)
        run = self.api.wait(keep["id"], self.wait_s)
        say(f"   {keep['name']} -> {state_of(run)} in {time.monotonic() - t0:.0f} s")
        self.record(
            "retrain run", f"{keep['name']} {state_of(run)}", "COMPLETED", state_of(run) == "COMPLETED"
        )
        return state_of(run)

    def gates(self, decided_before: str | None, old: str) -> tuple[str, str | None]:
        from zalando.registry import get_champion, get_model

        say("   gate decisions of the retrain (check, value, rule, threshold):")
        for line in gate_tables(self.lake, decided_before):
            say(line)
        from zalando.registry import decision_log

        new = get_champion(self.lake)["model_version"]
        log = decision_log(self.lake)
        gated = log[log["decision_id"] > decided_before] if decided_before else log
        gated_versions = [v for v in gated["model_version"] if v != old]
        dv = get_model(self.lake, gated_versions[0]).get("dataset_version") if gated_versions else None
        extra = self.store.feedback_dataset_extra(dv) if dv else None
        if extra:
            say(f"   dataset version {dv} = {extra['base_dataset_version']} + {extra['items']} feedback images "
                f"({extra['train_items']} trained on, weight {extra['config']['weight']}, "
                f"{extra['holdout_items']} held out)")  # fmt: skip
        self.record("new dataset version", str(dv), "dsf-...", bool(dv and dv.startswith("dsf-")))
        self.record("champion after the retrain", new, f"not {old}", new != old)
        return new, _best_gated(gated, old)

    # -- steps 5-6
    def challenger_numbers(self, challenger: str, truth: dict[str, int]) -> None:
        """The best challenger the gates rejected, measured like a champion: what the retrain learned,
        apart from whether the gates let it through."""
        inv = grouped_accuracy(
            self.store, self.score_batch(NEXT, model_version=challenger), challenger, truth
        )
        orig = grouped_accuracy(
            self.store, self.score_batch(ORIGINAL, model_version=challenger), challenger, truth
        )
        say(f"   the rejected challenger {challenger}: grouped accuracy {inv[0]:.4f} on the next inverted batch, "
            f"{orig[0]:.4f} on the original test split")  # fmt: skip
        self.record("rejected challenger, next inverted / original test", f"{inv[0]:.4f} / {orig[0]:.4f}")

    def compare(self, old: str, new: str, truth: dict[str, int]) -> None:
        t0 = time.monotonic()
        bid = self.score_batch(NEXT, model_version=new)
        if new != old:
            self.score_batch(NEXT, model_version=old)
        acc_new, n = grouped_accuracy(self.store, bid, new, truth)
        acc_old, _ = grouped_accuracy(self.store, bid, old, truth)
        say(f"5. {bid} ({n} unseen inverted images), grouped accuracy: new champion {acc_new:.4f}, "
            f"today's {acc_old:.4f} ({time.monotonic() - t0:.0f} s)")  # fmt: skip
        self.record("grouped acc, next inverted batch", f"{acc_new:.4f} (today's {acc_old:.4f})",
                    f">= {TARGET_INVERTED:.2f}", acc_new >= TARGET_INVERTED)  # fmt: skip
        t0 = time.monotonic()
        tid = self.score_batch(ORIGINAL, model_version=new)
        if new != old:
            self.score_batch(ORIGINAL, model_version=old)
        test_new, n = grouped_accuracy(self.store, tid, new, truth)
        test_old, _ = grouped_accuracy(self.store, tid, old, truth)
        change = (test_new - test_old) * 100
        say(f"6. {tid} ({n} original test images), grouped accuracy: new champion {test_new:.4f}, "
            f"today's {test_old:.4f}: {change:+.2f} points ({time.monotonic() - t0:.0f} s)")  # fmt: skip
        self.record("grouped acc, original test split", f"{test_new:.4f} (today's {test_old:.4f}, {change:+.2f} pt)",
                    f">= today's - {MAX_TEST_DROP * 100:.1f} pt", test_new >= test_old - MAX_TEST_DROP - 1e-12)  # fmt: skip

    def table(self) -> bool:
        say("\nfeedback loop, profile " + self.args.profile + f", {self.args.labels} labels")
        w = max(len(s) for s, *_ in self.results)
        say(f"| {'step':<{w}} | measured | target | met |")
        say(f"|{'-' * (w + 2)}|---|---|---|")
        for step, measured, target, met in self.results:
            say(
                f"| {step:<{w}} | {measured} | {target or '-'} | {'-' if met is None else ('yes' if met else 'NO')} |"
            )
        return all(m is not False for *_, m in self.results)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--profile", choices=sorted(DATA), default="cpu", help="cpu: the 60k set; quick: smoke run"
    )
    ap.add_argument("--labels", type=int, default=1000, help="review-queue items labelled (default 1000)")
    ap.add_argument("--timeout-min", type=int, default=180, help="longest wait for one flow run (minutes)")
    ap.add_argument(
        "--work-dir", type=Path, default=None,
        help="resume in the work folder of a run stopped before its labels (its epoch checkpoints); default: a new one",
    )  # fmt: skip
    args = ap.parse_args()
    (REPO / ".zalando").mkdir(exist_ok=True)
    if args.work_dir and (args.work_dir / "bench-env.json").is_file():  # resume: same keys, same lake
        work = args.work_dir.resolve()
        env = {**stack_env(work, args.profile), **json.loads((work / "bench-env.json").read_text())}
    else:
        work = Path(tempfile.mkdtemp(prefix=f"feedback-loop-{args.profile}-", dir=REPO / ".zalando"))
        env = stack_env(work, args.profile)
        keep = ("ZALANDO_S3_ACCESS_KEY", "ZALANDO_S3_SECRET_KEY", "ZALANDO_PROFILE", "ZALANDO_DATA_SOURCE")
        (work / "bench-env.json").write_text(json.dumps({k: env[k] for k in keep}))
    t_all = time.monotonic()
    say(f"work folder {work} (stack logs in stack/); data {DATA[args.profile]}")
    run_stack(env, "up")
    try:
        os.environ.clear()
        os.environ.update(env, PREFECT_API_URL=f"http://127.0.0.1:{env['ZALANDO_PREFECT_PORT']}/api",
                          PREFECT_HOME=str(work / "prefect"))  # fmt: skip
        run_stack(dict(os.environ), "deploy")
        say(
            f"stack up and deployed in {time.monotonic() - t_all:.0f} s: Prefect {os.environ['PREFECT_API_URL']}"
        )
        loop = Loop(args, dict(os.environ))
        loop.api.pause_pool(False)  # a resumed folder: the stopped run may have left it paused
        if loop.store.feedback_batches():
            raise SystemExit(f"{work} already holds feedback labels: start in a new work folder")
        try:
            old = loop.todays_champion()
            truth = inverted_batches(loop.lake)
            decided = last_decision_id(loop.lake)
            since = datetime.now(UTC)
            bid = loop.drifted_batch()
            loop.label(bid, truth, drifted=bool(loop.store.batch(bid).alarms))
            state = loop.retrain_on_feedback(since)
            new, challenger = loop.gates(decided, old) if state == "COMPLETED" else (old, None)
            loop.compare(old, new, truth)
            if new == old and challenger:
                loop.challenger_numbers(challenger, truth)
        except SystemExit as e:  # a step that could not go on: the table of what was measured
            say(f"stopped: {e}")
            loop.record("benchmark ran to the end", "no", "yes", False)
        ok = loop.table()
    finally:
        run_stack(env, "down", timeout=120)
    say(f"\nwall time {time.monotonic() - t_all:.0f} s; stack stopped; work folder {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
