"""Which experiments a run trains (resolved against the catalogue of experiments and profiles)."""

from __future__ import annotations

import hashlib
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.common import RunConfig
from zalando.models.experiments import load_catalog


@task(name="plan-experiments", cache_policy=NO_CACHE)
def plan_experiments(cfg: RunConfig, experiments: list[str] | None = None) -> list[dict[str, Any]]:
    """The experiments to train, resolved for the profile: name plus a fingerprint of the spec.

    ``experiments`` picks a subset (any known experiment, in or out of the profile); unknown names
    fail with the list of valid ones.
    """
    catalog = load_catalog(cfg.settings().experiments_file)
    names = list(experiments) if experiments else list(catalog.profile(cfg.profile).experiments)
    plan = []
    for name in dict.fromkeys(names):
        spec = catalog.resolved(name, cfg.profile)
        digest = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]
        plan.append({"experiment": name, "spec_digest": digest})
    get_run_logger().info("profile %s trains %s", cfg.profile, ", ".join(p["experiment"] for p in plan))
    return plan
