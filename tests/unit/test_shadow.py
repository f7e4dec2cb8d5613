"""Shadow scoring (issue 15): the agreement arithmetic, the challenger's choice, the reviewed items,
and a whole shadow run on a file lake with fake predictors (torch-free)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tests.scoring_support import FakePredictor, local_catalog, mnist_like, raw_parquet, write_files
from zalando.errors import DataError
from zalando.feedback import Decision
from zalando.labels import GROUP_NAMES, NUM_GROUPS
from zalando.lake.commit import scan
from zalando.scoring import score_batch
from zalando.scoring.shadow import (
    OVERALL,
    agreement_markdown,
    agreement_rows,
    agreement_table,
    find_challenger,
    join_groups,
    reviewed_comparison,
    score_shadow,
)


def test_agreement_counts_each_models_groups_and_the_images_both_put_there() -> None:
    champ = np.array([0, 0, 0, 1, 1, 2, 4, 4])
    chall = np.array([0, 0, 1, 1, 2, 2, 4, 0])
    rows = {r.group_name: r for r in agreement_rows(champ, chall)}
    assert list(rows) == [*GROUP_NAMES, OVERALL]
    g0, g1, g2, g3, g4 = (rows[n] for n in GROUP_NAMES)
    assert (g0.n_champion, g0.n_challenger, g0.n_agree, g0.agreement_rate) == (3, 3, 2, pytest.approx(2 / 3))
    assert (g1.n_champion, g1.n_challenger, g1.n_agree, g1.agreement_rate) == (2, 2, 1, 0.5)
    assert (g2.n_champion, g2.n_challenger, g2.n_agree, g2.agreement_rate) == (1, 2, 1, 1.0)
    assert (g3.n_champion, g3.n_challenger, g3.n_agree, g3.agreement_rate) == (
        0,
        0,
        0,
        None,
    )  # never predicted
    assert (g4.n_champion, g4.n_challenger, g4.n_agree, g4.agreement_rate) == (2, 1, 1, 0.5)
    overall = rows[OVERALL]
    assert (overall.n_champion, overall.n_challenger, overall.n_agree) == (8, 8, 5)
    assert overall.agreement_rate == 5 / 8
    assert sum(rows[n].n_agree for n in GROUP_NAMES) == overall.n_agree


def test_agreement_of_nothing_and_of_bad_input() -> None:
    rows = agreement_rows(np.zeros(0, int), np.zeros(0, int))
    assert rows[-1].n_champion == 0 and rows[-1].agreement_rate is None
    with pytest.raises(DataError, match="equal 1-d"):
        agreement_rows(np.zeros(3, int), np.zeros(2, int))
    with pytest.raises(DataError, match="group ids"):
        agreement_rows(np.array([0, NUM_GROUPS]), np.array([0, 1]))


def test_join_pairs_the_same_images_and_refuses_an_id_twice() -> None:
    champ = pa.table({"image_id": ["a", "b", "c"], "pred_group": pa.array([0, 1, 2], pa.int8())})
    chall = pa.table({"image_id": ["c", "a", "z"], "pred_group": pa.array([2, 3, 4], pa.int8())})
    a, b = join_groups(champ, chall)
    assert sorted(zip(a.tolist(), b.tolist(), strict=True)) == [(0, 3), (2, 2)]  # b and z: one side only
    twice = pa.table({"image_id": ["a", "a"], "pred_group": pa.array([0, 0], pa.int8())})
    with pytest.raises(DataError, match="challenger's rows hold an image id twice"):
        join_groups(champ, twice)


def test_agreement_table_has_the_lake_schema_and_a_null_group_overall_row() -> None:
    rows = agreement_rows(np.array([0, 1]), np.array([0, 0]))
    t = agreement_table(
        rows, batch_id="b", batch_date=date(2026, 5, 1), champion_version="v1", challenger_version="v2"
    )
    assert t.num_rows == NUM_GROUPS + 1 and t.column("group").to_pylist() == [0, 1, 2, 3, 4, None]
    assert t.column("group_name").to_pylist()[-1] == OVERALL
    assert t.column("n_agree").to_pylist() == [1, 0, 0, 0, 0, 1]


def _decision(image_id: str, predicted: str, label: str) -> Decision:
    return Decision(
        image_id=image_id, batch_id="b", model_version="v1", predicted_group=predicted, label=label,
        reviewer="r", decided_at=datetime(2026, 5, 1, tzinfo=UTC), source="import",
    )  # fmt: skip


def test_reviewed_items_pair_the_label_with_both_models_groups() -> None:
    decisions = [
        _decision("a", GROUP_NAMES[0], GROUP_NAMES[1]),
        _decision("b", GROUP_NAMES[2], GROUP_NAMES[2]),
        _decision("c", GROUP_NAMES[0], "unusable"),  # no true group: left out
        _decision("d", GROUP_NAMES[0], GROUP_NAMES[0]),  # the challenger never scored it: left out
    ]
    cmp = reviewed_comparison(decisions, {"a": 1, "b": 3, "c": 0})
    assert (cmp.y_true, cmp.y_champion, cmp.y_challenger) == ([1, 2], [0, 2], [1, 3])


def test_the_challenger_is_the_newest_registered_version_that_is_not_the_champion(tmp_path: Path) -> None:
    from zalando import registry

    lake = local_catalog(tmp_path).lake
    assert find_challenger(lake) is None
    for v in ("v-old", "v-champ", "v-new"):
        registry.register_model(
            lake, model_version=v, experiment="e", metrics={}, spec={}, dataset_version="d",
            code_version="c", bundle_key=f"models/e/{v}",
        )  # fmt: skip
    assert find_challenger(lake) == "v-new"  # no champion yet: every version is a challenger
    registry.promote(lake, "v-champ", reason="t", actor="t")
    registry.reject(lake, "v-new", reason="t", actor="t")  # rejected challengers stay challengers
    assert find_challenger(lake) == "v-new"
    assert find_challenger(lake, exclude=["v-new"]) == "v-old"
    registry.promote(lake, "v-new", reason="t", actor="t")
    assert find_challenger(lake) == "v-champ"  # the champion before it


class _OtherPredictor(FakePredictor):
    """Like FakePredictor, but puts every image one group further on: a challenger that disagrees."""

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, emb = super().predict(images)
        return np.roll(probs, 1, axis=1), emb


def test_a_shadow_run_on_a_file_lake_commits_beside_the_batch_and_replaces_on_a_rerun(tmp_path: Path) -> None:
    cat = local_catalog(tmp_path)
    imgs = mnist_like(40)
    ids = [f"img-{i:03d}" for i in range(40)]
    src = write_files(tmp_path / "in", {"a.parquet": raw_parquet(ids, imgs, row_group_size=10)})
    r = score_batch(
        cat, src.as_uri(), batch_date="2026-05-01", source="shop", shard_size=10,
        model_version="champ-v", predictor=FakePredictor(),
    )  # fmt: skip
    kw = dict(batch_id=r.batch_id, batch_date=r.batch_date, champion_version="champ-v", location=src.as_uri())
    out = score_shadow(
        cat, **kw, champion_committed_before=True, shard_size=10, challenger="chall-v",
        predictor=_OtherPredictor(),
    )  # fmt: skip
    assert out.status == "scored" and out.scored == 40 and out.data_files == 4
    preds = scan(cat, "predictions", {"batch_id": r.batch_id})
    shadow = scan(cat, "shadow_predictions", {"batch_id": r.batch_id})
    assert preds.num_rows == 40 and set(preds.column("model_version").to_pylist()) == {"champ-v"}
    assert not any(preds.column("shadow").to_pylist())
    assert shadow.num_rows == 40 and set(shadow.column("model_version").to_pylist()) == {"chall-v"}
    assert all(shadow.column("shadow").to_pylist())
    assert set(shadow.column("champion_model_version").to_pylist()) == {"champ-v"}
    by_id = dict(
        zip(preds.column("image_id").to_pylist(), preds.column("pred_group").to_pylist(), strict=True)
    )
    expected = sum(
        by_id[i] == g
        for i, g in zip(
            shadow.column("image_id").to_pylist(), shadow.column("pred_group").to_pylist(), strict=True
        )
    )
    agreement = scan(cat, "shadow_agreement", {"batch_id": r.batch_id}).to_pylist()
    overall = next(a for a in agreement if a["group"] is None)
    assert overall["n_agree"] == expected == out.groups[-1].n_agree and overall["n_champion"] == 40
    assert "| **overall** | 40 | 40 |" in agreement_markdown(out)

    again = score_shadow(
        cat, **kw, champion_committed_before=True, challenger="chall-v", predictor=_OtherPredictor()
    )
    assert again.status == "skipped" and again.agreement == out.agreement  # exactly once
    forced = score_shadow(
        cat, **kw, champion_committed_before=True, shard_size=7, force=True, challenger="chall-v",
        predictor=_OtherPredictor(),
    )  # fmt: skip
    assert forced.status == "scored"
    shadow = scan(cat, "shadow_predictions", {"batch_id": r.batch_id})
    assert shadow.num_rows == 40 and len(set(shadow.column("image_id").to_pylist())) == 40
    assert len(scan(cat, "shadow_agreement", {"batch_id": r.batch_id})) == NUM_GROUPS + 1


def test_a_broken_challenger_gives_a_failed_result_and_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cat = local_catalog(tmp_path)
    src = write_files(tmp_path / "in", {"a.parquet": raw_parquet(["x", "y"], mnist_like(2))})
    r = score_batch(
        cat, src.as_uri(), batch_date="2026-05-01", model_version="champ-v", predictor=FakePredictor()
    )
    caplog.set_level("WARNING", logger="zalando.scoring.shadow")
    out = score_shadow(
        cat, batch_id=r.batch_id, batch_date=r.batch_date, champion_version="champ-v",
        location=src.as_uri(), champion_committed_before=True, challenger="chall-v",
        predictor=FakePredictor(fail_on_call=1),
    )  # fmt: skip
    assert out.status == "failed" and "simulated worker crash" in (out.error or "")
    warnings = [rec for rec in caplog.records if rec.levelname == "WARNING"]
    assert len(warnings) == 1 and "committed" in warnings[0].getMessage()
    assert scan(cat, "shadow_predictions", {"batch_id": r.batch_id}).num_rows == 0
    assert scan(cat, "predictions", {"batch_id": r.batch_id}).num_rows == 2


def test_without_a_challenger_shadow_says_so_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cat = local_catalog(tmp_path)
    caplog.set_level("INFO", logger="zalando.scoring.shadow")
    out = score_shadow(cat, batch_id="2026-05-01-x", batch_date=date(2026, 5, 1), champion_version="v1")
    assert out.status == "no_challenger" and out.challenger_version is None
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "zalando.scoring.shadow"]
    assert len(lines) == 1 and "there is no challenger" in lines[0]


# ---------------------------------------------------------------------------------------------- the gates


def _gate_metrics(version: str, f1: float) -> dict:
    """Metrics that pass every other gate with room to spare."""
    return {
        "model_version": version, "dataset_version": "ds1", "macro_f1": f1, "latency_ms_per_1000": 400.0,
        "size_mb": 3.0, "canary_accuracy": 0.8,
        "per_group": {g: {"recall": 0.999, "precision": 0.999, "npv": 0.999} for g in GROUP_NAMES},
    }  # fmt: skip


def _evidence(
    agreement: float, reviewed: int = 0, acc: float = 0.0, champ_acc: float = 0.0, champion: str = "v-old"
) -> dict:
    return {
        "challenger_version": "v-new", "champion_version": champion, "batches": ["b1", "b2"], "items": 1000,
        "agreement": agreement, "groups": [], "reviewed_items": reviewed,
        "challenger_reviewed_accuracy": acc if reviewed else None,
        "champion_reviewed_accuracy": champ_acc if reviewed else None,
    }  # fmt: skip


def test_the_shadow_gate_uses_the_agreement_when_a_floor_is_set_and_reports_it_otherwise() -> None:
    from zalando.gates import GateConfig, evaluate_gates

    champion = _gate_metrics("v-old", 0.94)
    plain = evaluate_gates(_gate_metrics("v-new", 0.95), champion)
    assert "shadow_agreement" not in {r["check"] for r in plain.rows}  # no evidence: no row
    shadowed = {**_gate_metrics("v-new", 0.95), "shadow": _evidence(0.91)}
    d = evaluate_gates(shadowed, champion)  # default: reported, not gated
    row = next(r for r in d.rows if r["check"] == "shadow_agreement")
    assert d.promote and row["value"] == 0.91 and row["threshold"] is None
    assert row["rule"] == "reported (1000 images of 2 shadowed batch(es))"
    d = evaluate_gates(shadowed, champion, GateConfig(min_shadow_agreement=0.95))
    assert not d.promote and d.reasons == [
        "shadow agreement with the champion 0.91 below 0.9500 (1000 images of 2 shadowed batch(es))"
    ]
    assert evaluate_gates(shadowed, champion, GateConfig(min_shadow_agreement=0.9)).promote
    # evidence measured beside another champion is not used
    other = {**shadowed, "shadow": _evidence(0.5, champion="v-older")}
    d = evaluate_gates(other, champion, GateConfig(min_shadow_agreement=0.95))
    assert d.promote and "shadow_agreement" not in {r["check"] for r in d.rows}
    assert "| shadow_agreement | 0.91 | reported" in evaluate_gates(shadowed, champion).to_markdown()


def test_the_reviewed_items_gate_compares_both_models_on_the_same_reviewed_items() -> None:
    from zalando.gates import GateConfig, evaluate_gates

    champion = _gate_metrics("v-old", 0.94)
    worse = {**_gate_metrics("v-new", 0.95), "shadow": _evidence(0.9, reviewed=40, acc=0.70, champ_acc=0.75)}
    d = evaluate_gates(worse, champion)  # default: must not drop
    row = next(r for r in d.rows if r["check"] == "reviewed_accuracy_vs_champion")
    assert not d.promote and row["threshold"] == 0.75 and "40 reviewed items" in row["rule"]
    assert "accuracy on the 40 reviewed items of its shadowed batches 0.7" in d.reasons[0]
    assert evaluate_gates(worse, champion, GateConfig(max_reviewed_accuracy_drop=0.05)).promote
    assert evaluate_gates(worse, champion, GateConfig(max_reviewed_accuracy_drop=None)).promote
    few = {**worse, "shadow": _evidence(0.9, reviewed=10, acc=0.1, champ_acc=0.9)}
    d = evaluate_gates(few, champion)
    row = next(r for r in d.rows if r["check"] == "reviewed_accuracy_vs_champion")
    assert d.promote and row["rule"] == "reported (10 reviewed items; fewer than 20 needed)"


def test_decide_promotion_gates_a_shadowed_candidate_on_its_agreement(tmp_path: Path) -> None:
    from zalando.lake import Lake
    from zalando.lake.commit import replace_partition
    from zalando.registry import promote, register_model
    from zalando.settings import Settings
    from zalando.steps.promotion import decide_promotion
    from zalando.steps.training import Evaluation

    lake = Lake.local(tmp_path / "lake")

    def candidate(version: str, f1: float) -> Evaluation:
        metrics = {k: v for k, v in _gate_metrics(version, f1).items() if k != "model_version"}
        register_model(
            lake, model_version=version, experiment="e", metrics=metrics, spec={}, dataset_version="ds1",
            code_version="c", bundle_key=f"models/e/{version}",
        )  # fmt: skip
        return Evaluation(
            experiment="e", model_version=version, dataset_version="ds1", run_id="r", registered=False,
            metrics_uri=None, eval_key=None, gate_metrics=metrics, per_group_test=[], summary_test={},
            performance=[],
        )  # fmt: skip

    candidate("v1", 0.90)
    promote(lake, "v1", reason="first", actor="test")
    shadowed, fresh = candidate("v2", 0.95), candidate("v3", 0.95)
    rows = agreement_rows(np.array([0] * 10), np.array([0] * 8 + [1] * 2))  # 80% agreement
    table = agreement_table(
        rows, batch_id="b1", batch_date=date(2026, 5, 1), champion_version="v1", challenger_version="v2"
    )
    replace_partition(
        lake.catalog(), "shadow_agreement", table, {"batch_id": "b1", "challenger_version": "v2"}
    )
    settings = Settings(profile="quick", lake_uri="file:///unused")
    decision = decide_promotion(lake, settings, [shadowed, fresh], "run", gates={"min_shadow_agreement": 0.9})
    by_version = {g.model_version: g.decision for g in decision.decisions}
    assert not by_version["v2"].promote and by_version["v3"].promote and decision.winner == "v3"
    row = next(r for r in by_version["v2"].rows if r["check"] == "shadow_agreement")
    assert row["value"] == 0.8 and row["rule"] == ">= (10 images of 1 shadowed batch(es))"
    assert "shadow_agreement" not in {r["check"] for r in by_version["v3"].rows}  # never shadowed


def test_zalando_gate_weighs_a_rejected_challengers_shadow_evidence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from zalando import cli, registry
    from zalando.lake import Lake
    from zalando.lake.commit import replace_partition
    from zalando.settings import load_settings

    monkeypatch.setenv("ZALANDO_LAKE_URI", (tmp_path / "lake").as_uri())
    monkeypatch.setenv("ZALANDO_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setattr(cli, "setup_logging", lambda verbose: None)
    lake = Lake.from_settings(load_settings())
    for version, f1 in (("v1", 0.90), ("v2", 0.95)):
        registry.register_model(
            lake, model_version=version, experiment="e", metrics=_gate_metrics(version, f1), spec={},
            dataset_version="ds1", code_version="c", bundle_key=f"models/e/{version}",
        )  # fmt: skip
    registry.promote(lake, "v1", reason="first", actor="test")
    registry.reject(lake, "v2", reason="an earlier night", actor="test")
    rows = agreement_rows(np.array([0] * 10), np.array([0] * 9 + [1]))
    table = agreement_table(
        rows, batch_id="b1", batch_date=date(2026, 5, 1), champion_version="v1", challenger_version="v2"
    )
    replace_partition(
        lake.catalog(), "shadow_agreement", table, {"batch_id": "b1", "challenger_version": "v2"}
    )
    r = CliRunner().invoke(cli.app, ["gate", "v2"])
    assert r.exit_code == 0, r.output
    assert (
        "PROMOTE" in r.output
        and "| shadow_agreement | 0.9 | reported (10 images of 1 shadowed batch(es))" in r.output
    )
    assert registry.get_champion(lake)["model_version"] == "v1"  # nothing recorded without --apply
    r = CliRunner().invoke(cli.app, ["gate", "v2", "--apply"])
    assert r.exit_code == 0 and "promoted: v2; champion v2" in r.output, r.output
    assert registry.get_champion(lake)["model_version"] == "v2"
    r = CliRunner().invoke(cli.app, ["gate", "v2"])
    assert r.exit_code == 2 and "it is the champion" in r.output, r.output
