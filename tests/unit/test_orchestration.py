"""Orchestration helpers without a Prefect server: which faults are retried, cache keys, what a
task receives, the stack's environment, prefect.yaml as data."""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from tasks.common import RunConfig, RunContext, cache_on, is_transient, retry_if_transient
from tests.conftest import load_stack_module
from zalando.errors import ConfigError, DataError, LakeError, NotCommittedError, SourceError
from zalando.lake import Lake
from zalando.settings import Settings
from zalando.steps.training import PlannedExperiment, TrainedModel, plan_experiments

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        # as the lake and the sources raise them: the raise site saw the cause and set the flag
        (LakeError("lake write s3://b/k: connection reset by peer", transient=True), True),
        (
            LakeError(
                "S3 endpoint http://x bucket 'b': server not reachable (EndpointConnectionError); is it running?",
                transient=True,
            ),
            True,
        ),
        (SourceError("data source https://x: timed out", transient=True), True),
        (TimeoutError("read timed out"), True),
        (ConnectionError("refused"), True),
        (LakeError("S3 endpoint http://x bucket 'b': access denied: wrong S3 credentials"), False),
        (LakeError("lake object s3://b/k does not exist"), False),
        (LakeError("lake file s3://b/k: sha256 does not match its manifest"), False),
        (NotCommittedError("lake partition s3://b/p is not committed"), False),
        (DataError("train-images-idx3-ubyte.gz: sha256 checksum mismatch"), False),
        (ConfigError("unknown experiment 'x'"), False),
        (ValueError("a bug"), False),
        (None, False),
        # the flag decides, never the words: no substring of the message is read
        (LakeError("lake write s3://b/k: credentials must be renewed (503)", transient=True), True),
        (LakeError("lake write s3://b/k: connection reset by peer"), False),  # nobody said transient
        (SourceError("data source https://x: HTTP 404 Not Found", transient=False), False),
        # a raw pyarrow fault that escaped the lake: the lake's one rule classifies it
        (OSError("When reading ...: AWS Error UNKNOWN (HTTP status 503) during HeadObject operation"), True),
        (OSError("When uploading ...: AWS Error ACCESS_DENIED during PutObject operation: denied"), False),
        (FileNotFoundError("[Errno 2] Path does not exist 'b/k'"), False),
    ],
)
def test_only_transient_storage_and_network_faults_are_retried(
    exc: BaseException | None, transient: bool
) -> None:
    assert is_transient(exc) is transient


def test_retry_condition_reads_the_exception_of_the_failed_state() -> None:
    def failed(exc: BaseException) -> SimpleNamespace:
        def result() -> None:
            raise exc

        return SimpleNamespace(result=result)

    assert retry_if_transient(None, None, failed(TimeoutError("slow"))) is True
    assert retry_if_transient(None, None, failed(DataError("bad bytes"))) is False
    assert retry_if_transient(None, None, SimpleNamespace(result=lambda: 42)) is False


def _cfg(**kw: object) -> RunConfig:
    base = dict(run_id="r1", profile="quick", seed=1, lake_uri="s3://b/l", data_source="/data")
    return RunConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_cache_keys_depend_only_on_the_named_references() -> None:
    key_fn = cache_on("source_digest", "cfg.lake_uri").policies[0].cache_key_fn  # type: ignore[attr-defined]
    base = key_fn(None, {"cfg": _cfg(), "source_digest": "abc", "force": False})
    # another run, another seed, a different unrelated argument: same key (the cache hits)
    assert key_fn(None, {"cfg": _cfg(run_id="r2", seed=7), "source_digest": "abc", "force": True}) == base
    # other source bytes or another lake: another key
    assert key_fn(None, {"cfg": _cfg(), "source_digest": "abd"}) != base
    assert key_fn(None, {"cfg": _cfg(lake_uri="s3://b/other"), "source_digest": "abc"}) != base
    # dict fields, as the evaluate task keys on trained["model_version"]
    dict_key = cache_on("trained.model_version").policies[0].cache_key_fn  # type: ignore[attr-defined]
    assert dict_key(None, {"trained": {"model_version": "v1", "wall_s": 1}}) == dict_key(
        None, {"trained": {"model_version": "v1", "wall_s": 2}}
    )
    # ... and fields of a typed step result (the evaluate task's input is a TrainedModel)
    trained = dict(experiment="e", bundle_key="k", dataset_version="ds", temperature=1.0, train_energy=None)
    trained.update(epochs_run=1, best_val_loss=0.5)
    assert dict_key(None, {"trained": TrainedModel(model_version="v1", wall_s=1, **trained)}) == dict_key(
        None, {"trained": {"model_version": "v1"}}
    )
    assert dict_key(None, {"trained": TrainedModel(model_version="v2", wall_s=1, **trained)}) != dict_key(
        None, {"trained": {"model_version": "v1"}}
    )


def test_the_train_cache_keys_on_the_planned_spec(tmp_path: Path) -> None:
    """The train task's key reads the digest computed from the very spec it trains."""
    settings = Settings(profile="quick", lake_uri="s3://b/l", work_dir=tmp_path)
    planned = plan_experiments(settings, ["fashion_cnn", "fashion_cnn_small"])
    key_fn = cache_on("planned.experiment", "planned.spec_digest").policies[0].cache_key_fn  # type: ignore[attr-defined]
    keys = [key_fn(None, {"planned": p}) for p in planned]
    assert keys[0] != keys[1]
    widened = planned[0].model_copy(update={"spec": planned[0].spec.model_copy(update={"lr": 0.5})})
    assert key_fn(None, {"planned": widened}) != keys[0]
    assert (
        key_fn(None, {"planned": PlannedExperiment.model_validate_json(planned[0].model_dump_json())})
        == keys[0]
    )


def test_step_results_survive_prefects_serializers(tmp_path: Path) -> None:
    """Task results are persisted by Prefect (pickle by default, JSON when configured): the plan,
    with its ExperimentSpec, comes back equal either way."""
    from prefect.serializers import JSONSerializer, PickleSerializer

    (planned,) = plan_experiments(
        Settings(profile="quick", lake_uri="s3://b/l", work_dir=tmp_path), ["fashion_cnn"]
    )
    for serializer in (JSONSerializer(), PickleSerializer()):
        back = serializer.loads(serializer.dumps([planned]))
        assert back == [planned] and back[0].spec_digest == planned.spec_digest, serializer


def test_the_scoring_tasks_stay_torch_free() -> None:
    """Dask workers import tasks.scoring to run a shard with ONNX Runtime: no torch on the way."""
    code = (
        "import sys\n"
        "import tasks.scoring, tasks.lake, zalando.steps.scoring, zalando.steps.monitoring\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]


def test_run_config_carries_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZALANDO_S3_SECRET_KEY", "very-secret-value-123")
    settings = Settings(lake_uri="s3://b/l", profile="quick")
    cfg = RunConfig.from_settings(settings, run_id="r1")
    assert "very-secret-value-123" not in cfg.model_dump_json()
    # ... and gets it back from the environment where the task runs
    assert cfg.settings().s3_secret_key.get_secret_value() == "very-secret-value-123"
    assert cfg.settings().profile == "quick"


def test_run_context_is_built_once_per_process_and_shared_by_threads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ZALANDO_WORK_DIR", str(tmp_path / "work"))  # an environment no other test has
    built: list[Settings] = []
    build = Lake.from_settings

    def counting(settings: Settings) -> Lake:
        built.append(settings)
        time.sleep(0.05)  # a slow build: every thread arrives while the first one is building
        return build(settings)

    monkeypatch.setattr(Lake, "from_settings", counting)
    cfg = _cfg(lake_uri=(tmp_path / "lake").as_uri())
    start = threading.Barrier(8)

    def task(_: int) -> RunContext:
        start.wait()
        return cfg.context()

    with ThreadPoolExecutor(8) as pool:
        contexts = list(pool.map(task, range(8)))
    assert len(built) == 1 and all(c is contexts[0] for c in contexts)
    ctx = contexts[0]
    assert cfg.settings() is ctx.settings and cfg.lake() is ctx.lake and len(built) == 1
    assert ctx.settings.lake_uri == cfg.lake_uri and ctx.settings.work_dir == tmp_path / "work"
    assert ctx.lake.uri() == cfg.lake_uri
    assert _cfg(run_id="r2", lake_uri=cfg.lake_uri).context() is ctx  # another run, same settings
    other = _cfg(lake_uri=(tmp_path / "other").as_uri()).context()
    assert other is not ctx and other.lake.uri() == (tmp_path / "other").as_uri() and len(built) == 2


def test_run_context_follows_the_environment_and_keeps_no_secret(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import tasks.common as common

    cfg = _cfg(lake_uri=(tmp_path / "lake").as_uri())
    monkeypatch.setenv("ZALANDO_S3_SECRET_KEY", "first-secret-value-123")
    first = cfg.context()
    monkeypatch.setenv("ZALANDO_S3_SECRET_KEY", "second-secret-value-456")
    second = cfg.context()
    assert (
        second is not first and second.settings.s3_secret_key.get_secret_value() == "second-secret-value-456"
    )
    with monkeypatch.context() as inner:  # any ZALANDO_* setting counts
        inner.setenv("ZALANDO_TORCH_THREADS", "3")
        assert cfg.settings().torch_threads == 3
    # (the context restores whatever the session had, e.g. the flow tests' ZALANDO_TORCH_THREADS=1)
    monkeypatch.setenv("ZALANDO_S3_SECRET_KEY", "first-secret-value-123")
    assert cfg.context() is first  # the same environment again: the same context
    for secret in ("first-secret-value-123", "second-secret-value-456"):
        assert secret not in repr(first) + repr(second) + cfg.model_dump_json()
        assert not any(secret in str(key) for key in common._CONTEXTS)


def _stack_module() -> Any:
    return load_stack_module("zalando_stack")


def test_stack_keeps_prefect_state_in_the_work_folder_and_binds_loopback(tmp_path: Path) -> None:
    stack = _stack_module().Stack.from_env(
        {"ZALANDO_WORK_DIR": str(tmp_path), "ZALANDO_PREFECT_PORT": "4321"}
    )
    env = stack.prefect_env()
    assert env["PREFECT_HOME"] == str(tmp_path / "prefect")
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4321/api"
    assert env["PREFECT_SERVER_API_HOST"] == "127.0.0.1"
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["ZALANDO_HOME"] == str(REPO) and env["ZALANDO_WORK_DIR"] == str(tmp_path)
    relative = _stack_module().Stack.from_env({"ZALANDO_WORK_DIR": ".zalando"})
    assert relative.work_dir == REPO / ".zalando"


def test_stack_down_without_up_stops_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stack = _stack_module().Stack.from_env({"ZALANDO_WORK_DIR": str(tmp_path)})
    stack.down()
    assert capsys.readouterr().out == ""


def test_prefect_yaml_declares_the_deployments_schedule_and_drift_trigger() -> None:
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in doc["deployments"]}
    assert set(deps) == {"nightly", "retrain", "score", "paper-gpu", "weekly", "kpis", "score-catalogue"}
    assert deps["nightly"]["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC", "active": True}]
    local = {"runner": "local", "dask_address": None}  # the Dask cluster is chosen per run
    assert deps["nightly"]["parameters"] == {"profile": "cpu", **local, "shadow": False}
    assert deps["score"]["parameters"] == {"shadow": False}  # issue 15: shadow scoring, off by default
    assert deps["retrain"]["parameters"] == {"profile": "cpu", **local}
    assert {d["work_pool"]["name"] for n, d in deps.items() if n != "paper-gpu"} == {"zalando"}
    # the study's set-up goes to the GPU machines' own pool, which tells the engine to use CUDA
    gpu = deps["paper-gpu"]
    assert gpu["entrypoint"] == "flows/training.py:training" and gpu["parameters"] == {"profile": "paper"}
    assert gpu["work_pool"]["name"] == "gpu"
    assert gpu["work_pool"]["job_variables"] == {"env": {"ZALANDO_DEVICE": "cuda"}}
    assert "device" in Settings.model_fields  # ZALANDO_DEVICE is a real setting
    # the lake's maintenance: weekly (Sundays 03:00 UTC, after the night's run), one at a time
    weekly = deps["weekly"]
    assert weekly["entrypoint"] == "flows/maintenance.py:lake_maintenance"
    assert weekly["schedules"] == [{"cron": "0 3 * * 0", "timezone": "UTC", "active": True}]
    assert weekly["parameters"] == {"older_than_days": 7, "orphans_older_than_days": 3}
    assert weekly["concurrency_limit"] == 1
    assert doc["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $ZALANDO_HOME }}"}}
    ]
    drift, kpi = deps["retrain"]["triggers"]  # issue 15: the KPI alarm's trigger beside the drift one
    assert drift["expect"] == ["zalando.drift.alarm"]
    assert kpi["expect"] == ["zalando.kpi.alarm"] and kpi["name"] == "zalando-kpi-alarm-retrain"
    for trigger in (drift, kpi):
        assert trigger["match"] == {"prefect.resource.id": "zalando.batch.*"} and trigger["enabled"]
        assert trigger["parameters"]["profile"] == "{{ event.payload.profile }}"
    assert kpi["parameters"]["reason"] == "kpi alarm on {{ event.resource.id }}"
    # the labelled KPIs run after the nightly (02:00), on the profile the alarm retrains
    assert deps["kpis"]["entrypoint"] == "flows/feedback.py:labelled_kpis"
    assert deps["kpis"]["schedules"] == [{"cron": "0 6 * * *", "timezone": "UTC", "active": True}]
    assert deps["kpis"]["parameters"] == {"profile": "cpu"}
    # issue 14: the catalogue, nightly after the training (02:00) and by hand, one run at a time
    catalogue = deps["score-catalogue"]
    assert catalogue["entrypoint"] == "flows/catalogue.py:catalogue_scoring"
    assert catalogue["schedules"] == [{"cron": "0 4 * * *", "timezone": "UTC", "active": True}]
    assert catalogue["parameters"] == {"profile": "cpu", "country": "us", "full": False}
    assert catalogue["concurrency_limit"] == 1
    from flows.catalogue import catalogue_scoring

    assert catalogue_scoring.name == "catalogue"  # so the deployment is catalogue/score-catalogue
    for dep in deps.values():  # every entrypoint names a real flow
        path, func = dep["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert hasattr(getattr(module, func), "deploy"), dep["entrypoint"]
        # ... and every deployment parameter is one of that flow's parameters
        signature = inspect.signature(getattr(module, func).fn)
        assert set(dep.get("parameters") or {}) <= set(signature.parameters), dep["name"]


def test_experiments_get_one_dask_worker_each() -> None:
    """The training flow's Dask runner: an existing scheduler, or a local cluster of one worker per
    experiment (at most one per core) offering the `experiment` resource every training task holds."""
    from flows.training import EXPERIMENT_RESOURCE, _experiment_runner

    assert _experiment_runner("tcp://10.0.0.5:8786", 5).address == "tcp://10.0.0.5:8786"
    for experiments, cores, workers, threads in [(2, 2, 2, 1), (5, 2, 2, 1), (1, 8, 1, 8), (3, 8, 3, 2)]:
        kwargs = _experiment_runner(None, experiments, cores=cores).cluster_kwargs
        assert (kwargs["n_workers"], kwargs["threads_per_worker"]) == (workers, threads), experiments
        assert kwargs["resources"] == {EXPERIMENT_RESOURCE: 1} and kwargs["processes"] is True


def test_the_train_task_is_not_on_a_dask_worker_in_the_flow_process() -> None:
    """Off Dask the train task keeps the settings' threads and records `local`."""
    import distributed  # loaded, as in a flow process that started a local cluster

    from tasks.training import _dask_worker

    assert distributed is not None and _dask_worker() is None


def test_contexts_that_differ_only_in_batch_roots_share_one_lake(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # the warm scorer sets ZALANDO_BATCH_ROOTS per request: one lake (catalog, S3 client) for all callers
    cfg = _cfg(lake_uri=(tmp_path / "lake").as_uri())
    monkeypatch.setenv("ZALANDO_BATCH_ROOTS", str(tmp_path / "alice"))
    alice = cfg.context()
    monkeypatch.setenv("ZALANDO_BATCH_ROOTS", str(tmp_path / "bob"))
    bob = cfg.context()
    assert bob is not alice and bob.lake is alice.lake
    assert alice.settings.batch_roots == [tmp_path / "alice"] and bob.settings.batch_roots == [
        tmp_path / "bob"
    ]
    monkeypatch.setenv("ZALANDO_S3_REGION", "eu-central-1")  # a setting the lake is made of: its own lake
    assert cfg.context().lake is not alice.lake
