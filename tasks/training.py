"""Training tasks: plan the experiments, train one, evaluate one, decide, promote, report.

Each task calls one step of :mod:`zalando.steps` and publishes what people look at in the UI:
the per-group metric table of every model, the champion decision, links to the lake's report.
"""

from __future__ import annotations

import hashlib
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.common import RunConfig, cache_on, io_task_options
from zalando import steps
from zalando.models.experiments import load_catalog


def _artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    raw = "-".join(parts).lower()
    return "".join(c if c.isalnum() else "-" for c in raw).strip("-")


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


@task(
    name="train",
    task_run_name="train-{experiment}",
    cache_policy=cache_on("experiment", "spec_digest", "dataset_version", "cfg.seed", "cfg.lake_uri"),
    **io_task_options(),
)
def train_model(cfg: RunConfig, experiment: str, spec_digest: str, dataset_version: str) -> dict[str, Any]:
    """Train one experiment; its bundle, model card and drift reference go to the lake.

    Cached on the resolved spec, the dataset version and the seed: an unchanged night retrains nothing.
    A retry (or a re-run after a crash) resumes from the last epoch checkpoint in the work folder.
    """
    settings = cfg.settings()
    checkpoints = (
        settings.work_dir / "checkpoints" / experiment / f"{dataset_version}-{spec_digest}-{cfg.seed}"
    )
    out = steps.train_model(
        cfg.lake(), settings, experiment, dataset_version, cfg.run_id, checkpoint_dir=checkpoints
    )
    get_run_logger().info(
        "%s -> model %s (%d epoch(s), %.1fs, T=%.3f)",
        experiment,
        out["model_version"],
        out["epochs_run"],
        out["wall_s"],
        out["temperature"],
    )
    return out


@task(
    name="evaluate",
    task_run_name="evaluate-{trained[experiment]}",
    cache_policy=cache_on("trained.model_version", "cfg.lake_uri"),
    **io_task_options(),
)
def evaluate_model(cfg: RunConfig, trained: dict[str, Any]) -> dict[str, Any]:
    """Metrics, performance, energy and canary accuracy of one model; registered in the registry."""
    out = steps.evaluate_model(
        cfg.lake(),
        cfg.settings(),
        trained["experiment"],
        trained["model_version"],
        cfg.run_id,
        train_energy=trained.get("train_energy"),
    )
    s = out["summary_test"]
    create_table_artifact(
        key=_artifact_key("per-group", out["experiment"]),
        table=out["per_group_test"],
        description=(
            f"Per-group metrics of `{out['experiment']}` ({out['model_version']}) on the test split: "
            f"accuracy {s['accuracy']:.4f}, macro F1 {s['macro_f1']:.4f}. Lake: {out['metrics_uri']}"
        ),
    )
    get_run_logger().info(
        "%s: test accuracy %.4f, macro F1 %.4f", out["experiment"], s["accuracy"], s["macro_f1"]
    )
    return out


@task(name="decide-champion", cache_policy=NO_CACHE, **io_task_options())
def decide_champion(
    cfg: RunConfig, evaluations: list[dict[str, Any]], gates: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Gate every new model against the champion on the same validation data; pick the winner."""
    decision = steps.decide_promotion(cfg.lake(), cfg.settings(), evaluations, cfg.run_id, gates=gates)
    log = get_run_logger()
    if not decision["decisions"]:
        log.info(
            "no new model to decide on (cached training): champion %s stays", decision["champion_before"]
        )
    for d in decision["decisions"]:
        log.info("%s (%s): %s", d["experiment"], d["model_version"], "passes" if d["promote"] else "fails")
    return decision


# Not retried: the decision log is append-only, so a blind retry could log a decision twice. A
# failed promotion fails the run; the next run decides again.
@task(name="promote", cache_policy=NO_CACHE)
def promote_champion(
    cfg: RunConfig, decision: dict[str, Any], approved: bool, comment: str, actor: str
) -> dict[str, Any]:
    """Record the decisions in the registry log and move the champion pointer; publish the decision."""
    out = steps.apply_promotion(cfg.lake(), decision, actor=actor, approved=approved, comment=comment)
    rows = []
    for d in decision["decisions"]:
        if d["model_version"] == out["promoted"]:
            verdict = "promoted"
        elif d["model_version"] == decision["winner"] and not approved:
            verdict = "refused by approver"
        else:
            verdict = "rejected"
        rows.append(
            {
                "experiment": d["experiment"],
                "model_version": d["model_version"],
                "val_macro_f1": d["macro_f1"],
                "gates_passed": d["promote"],
                "decision": verdict,
                "reasons": "; ".join(d["decision"]["reasons"]) or "-",
            }
        )
    if not rows:
        rows.append(
            {
                "experiment": out["champion_experiment"],
                "model_version": out["champion"],
                "val_macro_f1": None,
                "gates_passed": None,
                "decision": "kept (no new model)",
                "reasons": "every model of this run was decided on before (cached training)",
            }
        )
    create_table_artifact(
        key="champion-decision",
        table=rows,
        description=(
            f"Champion before: `{decision['champion_before']}`; after: `{out['champion']}`. "
            f"Actor: {actor}{' (' + comment + ')' if comment else ''}."
        ),
    )
    details = "\n\n".join(f"### {d['experiment']}\n\n{d['markdown']}" for d in decision["decisions"])
    create_markdown_artifact(
        key="gate-checks",
        markdown=f"# Quality gates, run `{cfg.run_id}`\n\n{details or 'No new model to gate.'}\n",
        description="Every number compared by the quality gates",
    )
    get_run_logger().info("champion: %s (was %s)", out["champion"], decision["champion_before"])
    return out


@task(name="publish-report", cache_policy=NO_CACHE, **io_task_options())
def publish_report(cfg: RunConfig, evaluations: list[dict[str, Any]], champion: str | None) -> dict[str, Any]:
    """The run's Markdown + PNG report in the lake, and its tables and links as artifacts."""
    out = steps.write_run_report(cfg.lake(), cfg.settings(), cfg.run_id, evaluations, champion)
    create_table_artifact(
        key="run-per-group",
        table=out["tables"]["per_group"],
        description=f"Per group x experiment on the test split, with the study's best model as reference (run {cfg.run_id})",
    )
    links = "\n".join(f"- [{name}]({uri})" for name, uri in out["files"].items())
    create_markdown_artifact(
        key="run-report",
        markdown=(
            f"# Run `{cfg.run_id}` (profile {cfg.profile})\n\n"
            f"Champion after this run: **`{champion}`**\n\n"
            f"Report in the lake: [{out['report_uri']}]({out['report_uri']})\n\n"
            f"Files:\n\n{links}\n\n"
            "Metric tables: "
            + ", ".join(f"`{e['metrics_uri']}`" for e in evaluations if e.get("metrics_uri"))
            + "\n"
        ),
        description="Links to this run's report, figures and metric tables in the lake",
    )
    return {k: out[k] for k in ("key", "uri", "report_uri")}
