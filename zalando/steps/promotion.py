"""Promotion steps: gate the run's new models against the champion, then promote the winner.

Where the promotion is decided: :func:`decide_promotion` gates every candidate and picks the
winner; :func:`promotion_verdicts` turns that (and the approver's answer) into one verdict per
model, with the reason the registry's log records; :func:`apply_promotion` acts on exactly those
verdicts and returns them, so the task that publishes them never decides anything again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from zalando.errors import DataError
from zalando.gates import GateConfig, GateDecision
from zalando.lake import Lake
from zalando.steps.training import Evaluation, evaluate_model

if TYPE_CHECKING:
    from zalando.settings import Settings

PASSED_EVERY_GATE = "passed every quality gate"
NOTHING_NEW = "every model of this run was decided on before (cached training)"

Verdict = Literal["promoted", "refused by approver", "rejected", "kept (no new model)"]


# ---------------------------------------------------------------------------------------------- results


class GatedModel(BaseModel):
    """One new model of the run, gated against the champion."""

    experiment: str
    model_version: str
    macro_f1: float | None  # validation macro F1: the winner is the passing model with the highest
    decision: GateDecision

    @property
    def passed(self) -> bool:
        return self.decision.promote


class PromotionDecision(BaseModel):
    """Every new model gated, and the winner (None when none passed); nothing is written yet."""

    champion_before: str | None
    champion_before_experiment: str | None
    winner: str | None
    winner_experiment: str | None
    decisions: list[GatedModel]  # empty when every model was decided on before (a cached run)
    gates: GateConfig


class ModelVerdict(BaseModel):
    """What happens to one model, and why: a row of the champion-decision table."""

    experiment: str | None
    model_version: str | None
    val_macro_f1: float | None = None
    gates_passed: bool | None = None  # None: not gated tonight (the kept champion)
    verdict: Verdict
    log_reason: str | None = None  # what the registry's decision log records (None: nothing logged)
    reasons: list[str]  # shown with the verdict: the gates' reasons, or why nothing was decided
    decision: GateDecision | None = None


class PromotionOutcome(BaseModel):
    """The champion after the promotion step, and the verdict it acted on for every model."""

    champion_before: str | None
    champion: str | None
    champion_experiment: str | None
    promoted: str | None
    verdicts: list[ModelVerdict]


# ---------------------------------------------------------------------------------------------- decide


def decide_promotion(
    lake: Lake,
    settings: Settings,
    candidates: Sequence[Evaluation],
    run_id: str,
    *,
    gates: Mapping[str, Any] | None = None,
) -> PromotionDecision:
    """Gate every candidate against the champion; the best one that passes (validation macro F1) wins.

    The champion's numbers come from the same validation data: when it was registered on another
    dataset version it is evaluated again on this one (not re-registered). A candidate that was
    shadow-scored beside the champion brings that evidence (:func:`with_shadow_evidence`). Models with a decision
    in the registry's log already (a cached training run) are left out. Nothing is written here:
    :func:`apply_promotion` records the decisions, after an optional human approval.
    """
    from zalando.gates import evaluate_gates, gate_config
    from zalando.models.experiments import load_catalog
    from zalando.registry import decision_log, get_champion

    if not candidates:
        raise DataError("promotion: no trained model to decide on")
    config = gate_config(load_catalog(settings.experiments_file).profile(settings.profile), gates)
    champion = get_champion(lake)
    champ_version = champion["model_version"] if champion else None
    champ_metrics = champion_metrics(lake, settings, champ_version, candidates[0].dataset_version, run_id)
    # a cached training run gives back models decided on an earlier night: they are not gated again
    decided = set(decision_log(lake)["model_version"]) | {champ_version}
    gated = [
        GatedModel(
            experiment=cand.experiment,
            model_version=cand.model_version,
            macro_f1=cand.gate_metrics.get("macro_f1"),
            decision=evaluate_gates(
                with_shadow_evidence(lake, cand.gate_metrics, cand.model_version, champ_version),
                champ_metrics,
                config,
            ),
        )
        for cand in candidates
        if cand.model_version not in decided
    ]
    passing = [g for g in gated if g.passed]
    winner = max(passing, key=lambda g: g.macro_f1 or 0.0) if passing else None
    return PromotionDecision(
        champion_before=champ_version,
        champion_before_experiment=champion["experiment"] if champion else None,
        winner=winner.model_version if winner else None,
        winner_experiment=winner.experiment if winner else None,
        decisions=gated,
        gates=config,
    )


def champion_metrics(
    lake: Lake, settings: Settings, champion_version: str | None, dataset_version: str, run_id: str
) -> dict[str, Any] | None:
    """The champion's gate metrics on ``dataset_version``: its registered ones, or (registered on
    another dataset version) evaluated again on this one, without re-registering it."""
    from zalando.registry import get_model

    if champion_version is None:
        return None
    record = get_model(lake, champion_version)
    if record.get("dataset_version") == dataset_version:
        return record["metrics"]
    return evaluate_model(
        lake, settings, record["experiment"], champion_version, run_id, dataset_version=dataset_version,
        register=False,
    ).gate_metrics  # fmt: skip


def gate_registered(
    lake: Lake, settings: Settings, model_version: str, run_id: str, *, gates: Mapping[str, Any] | None = None
) -> GateDecision:
    """Gate a registered challenger against the champion again, from its registered metrics and its
    shadow evidence (``zalando gate VERSION``): how a rejected or pending challenger that shadowed
    batches gets its agreement and reviewed items weighed. Nothing is written here."""
    from zalando.gates import evaluate_gates, gate_config
    from zalando.models.experiments import load_catalog
    from zalando.registry import get_champion, get_model

    config = gate_config(load_catalog(settings.experiments_file).profile(settings.profile), gates)
    record = get_model(lake, model_version)
    champion = get_champion(lake)
    champ_version = champion["model_version"] if champion else None
    if champ_version == model_version:
        raise DataError(f"gate {model_version}: it is the champion; gate a challenger (see `zalando models`)")
    metrics = {"model_version": model_version, "dataset_version": record.get("dataset_version")}
    metrics |= record.get("metrics") or {}
    champ = champion_metrics(lake, settings, champ_version, str(record.get("dataset_version")), run_id)
    if champ is not None:
        champ = {"model_version": champ_version, **champ}
    return evaluate_gates(with_shadow_evidence(lake, metrics, model_version, champ_version), champ, config)


def with_shadow_evidence(
    lake: Lake, metrics: Mapping[str, Any], model_version: str, champion_version: str | None
) -> dict[str, Any]:
    """A challenger's gate metrics with its shadow evidence beside ``champion_version`` (its agreement
    and accuracy on reviewed items over the batches it shadowed), when it has any: the shadow gates."""
    from zalando.scoring.shadow import shadow_evidence

    evidence = shadow_evidence(lake, model_version, champion_version)
    return {**metrics, "shadow": evidence.model_dump()} if evidence else dict(metrics)


def promotion_verdicts(
    decision: PromotionDecision, *, approved: bool = True, comment: str = ""
) -> list[ModelVerdict]:
    """One verdict per gated model (pure): the winner is promoted unless the approver refused it;
    challengers that passed but lost to the winner, and those that failed a gate, are rejected.

    With no new model (a cached run) the one row says the champion is kept.
    """
    if not decision.decisions:
        return [
            ModelVerdict(
                experiment=decision.champion_before_experiment,
                model_version=decision.champion_before,
                verdict="kept (no new model)",
                reasons=[NOTHING_NEW],
            )
        ]
    winner = decision.winner
    verdicts = []
    for g in decision.decisions:
        verdict: Verdict = "rejected"
        if g.model_version == winner and approved:
            verdict, reason = "promoted", PASSED_EVERY_GATE
        elif g.model_version == winner:
            verdict, reason = "refused by approver", f"approval refused{': ' + comment if comment else ''}"
        elif g.passed:
            reason = f"passed every gate, but {winner} had the higher validation macro F1"
        else:
            reason = "; ".join(g.decision.reasons or ["failed a quality gate"])
        verdicts.append(
            ModelVerdict(
                experiment=g.experiment,
                model_version=g.model_version,
                val_macro_f1=g.macro_f1,
                gates_passed=g.passed,
                verdict=verdict,
                log_reason=reason,
                reasons=g.decision.reasons,
                decision=g.decision,
            )
        )
    return verdicts


# ---------------------------------------------------------------------------------------------- promote


def apply_promotion(
    lake: Lake, decision: PromotionDecision, *, actor: str, approved: bool = True, comment: str = ""
) -> PromotionOutcome:
    """Record every verdict in the registry's log and move the champion pointer to the promoted model.

    A winner refused by a human (``approved=False``) is rejected with the comment as the reason.
    """
    from zalando.registry import get_champion, promote, reject

    verdicts = promotion_verdicts(decision, approved=approved, comment=comment)
    for v in verdicts:
        if v.log_reason is None or v.model_version is None:
            continue
        act = promote if v.verdict == "promoted" else reject
        act(lake, v.model_version, reason=v.log_reason, actor=actor, decision=v.decision)
    champion = get_champion(lake)
    return PromotionOutcome(
        champion_before=decision.champion_before,
        champion=champion["model_version"] if champion else None,
        champion_experiment=champion["experiment"] if champion else None,
        promoted=next((v.model_version for v in verdicts if v.verdict == "promoted"), None),
        verdicts=verdicts,
    )
