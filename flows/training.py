"""The `training` flow: ingest -> preprocess -> train every experiment -> evaluate -> promote.

Deployed as `training/retrain` (by hand, or by the drift alarm automation) and run inside `nightly`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.common import RunConfig
from tasks.data import ingest_source, make_dataset_version, verify_source, write_eda_report
from tasks.lake import prepare_lake
from tasks.training import plan_experiments
from zalando.lake import new_run_id
from zalando.s3server import embedded_s3
from zalando.settings import Profile, load_settings


@flow(
    name="training",
    # one task at a time: torch uses every core for one model; .map still shows the fan-out
    task_runner=ThreadPoolTaskRunner(max_workers=1),
    flow_run_name="training-{profile}",
)
def training(
    profile: Profile = "cpu",
    experiments: list[str] | None = None,
    data_source: str | None = None,
    seed: int | None = None,
    force: bool = False,
    reason: str = "manual",
) -> dict[str, Any]:
    """Train, evaluate and gate every experiment of a profile; promote the best challenger that passes.

    Args:
        profile: paper (the study, GPU), cpu (the nightly default) or quick (tests and demos).
        experiments: train only these experiments (default: every experiment of the profile).
        data_source: where the Fashion-MNIST IDX files come from (default: ZALANDO_DATA_SOURCE).
        seed: random seed for the split and training (default: ZALANDO_SEED).
        force: re-ingest, re-split and retrain even when the cache says nothing changed.
        reason: why this run happens (manual, schedule, drift alarm ...); recorded in the decision log.
    """
    log = get_run_logger()
    settings = load_settings(profile=profile, data_source=data_source, seed=seed)
    cfg = RunConfig.from_settings(settings, run_id=new_run_id())
    log.info("training run %s (profile %s, reason: %s)", cfg.run_id, profile, reason)
    with embedded_s3(settings):
        prepare_lake(cfg)
        digest = verify_source(cfg)
        ingest_source.with_options(refresh_cache=force)(cfg, digest, force=force)
        dataset = make_dataset_version.with_options(refresh_cache=force)(cfg, digest, force=force)
        eda = write_eda_report(cfg, digest)
        plan = plan_experiments(cfg, experiments)
    return {
        "run_id": cfg.run_id,
        "profile": profile,
        "source_digest": digest,
        "dataset_version": dataset["dataset_version"],
        "eda": eda["uri"],
        "experiments": [p["experiment"] for p in plan],
    }
