"""Shadow scoring (issue 15) against a real SeaweedFS S3 server with real (tiny) bundles: a second,
unpromoted bundle scores the batch beside the champion into ``shadow_predictions``, never into
``predictions``; the agreement table's numbers; a re-run leaves one row per image in both; a broken
challenger still lets the batch commit; the gate uses the agreement and the reviewed items. And the
same through the ``batch_scoring`` flow."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import pytest

from tests.conftest import MINI_DIR
from tests.scoring_support import make_champion, mnist_like, raw_parquet
from zalando.data.idx import read_idx_images, read_idx_labels
from zalando.data.ingest import put_raw_split
from zalando.feedback import Decision
from zalando.gates import GateConfig, evaluate_gates
from zalando.labels import GROUP_NAMES, NUM_GROUPS, group_of
from zalando.lake import Lake
from zalando.lake.catalog import LakeCatalog, RetryPolicy, open_catalog
from zalando.lake.commit import scan
from zalando.scoring import clear_predictor_cache, find_demo_batch, score_batch
from zalando.scoring.shadow import OVERALL, shadow_evidence
from zalando.settings import Settings
from zalando.steps.promotion import with_shadow_evidence

pytestmark = pytest.mark.integration


@pytest.fixture
def cat(s3_settings: Settings, s3_lake: Lake) -> LakeCatalog:
    import torch

    torch.set_num_threads(1)
    clear_predictor_cache()
    return open_catalog(
        s3_settings, lake=s3_lake, retry=RetryPolicy(attempts=6, base_delay=0.05, max_delay=1.0)
    )


def _mini_test() -> tuple[np.ndarray, np.ndarray]:
    images = read_idx_images(str(MINI_DIR / "t10k-images-idx3-ubyte.gz"))
    return images, np.asarray(read_idx_labels(str(MINI_DIR / "t10k-labels-idx1-ubyte.gz")))


def _ingest_mini_test(lake: Lake) -> np.ndarray:
    """The mini test split as the demo batch; returns the true groups, in id order."""
    images, labels = _mini_test()
    ids = [f"test-{i:05d}" for i in range(len(images))]
    put_raw_split(lake, "test", ids, images, labels, digest="ingest-mini")
    return group_of(np.asarray(labels))


def _head_fitted_to(images: np.ndarray, labels: np.ndarray) -> Callable[[Any], None]:
    """A ``make_champion`` hook: the random model's head fitted (least squares) to the labels of its
    embeddings, so that its groups follow the images (a random tiny model puts every image in one)."""

    def fit(model: Any) -> None:
        import torch

        x = torch.tensor((images / 255.0 - 0.286) / 0.353, dtype=torch.float32)[:, None]
        with torch.no_grad():
            emb = model.forward_both(x)[1].double().numpy()
            a = np.c_[emb, np.ones(len(emb))]
            w = np.linalg.lstsq(a, np.eye(10)[labels], rcond=None)[0]
            head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
            head.weight.copy_(torch.tensor(w[:-1].T * 20.0))
            head.bias.copy_(torch.tensor(w[-1] * 20.0))

    return fit


def _break_bundle(lake: Lake, version: str) -> None:
    """Overwrite a bundle's model.onnx after its commit: its checksum no longer matches."""
    lake.write_bytes(f"models/tiny_cnn/{version}/model.onnx", b"not an onnx model")


def _groups(cat: LakeCatalog, table: str, flt: dict) -> dict[str, int]:
    t = scan(cat, table, flt, columns=["image_id", "pred_group"])
    return dict(zip(t.column("image_id").to_pylist(), t.column("pred_group").to_pylist(), strict=True))


def test_shadow_scores_beside_the_champion_exactly_once_and_the_gate_uses_it(
    s3_lake: Lake, cat: LakeCatalog
) -> None:
    lake = s3_lake
    champion = make_champion(lake, seed=0)
    # registered after the champion: the newest registered version that is not the champion
    challenger = make_champion(lake, seed=1, promote=False, prepare=_head_fitted_to(*_mini_test()))
    truth = _ingest_mini_test(lake)
    n = len(truth)
    kw = dict(batch_date="2026-05-02", shard_size=128, runtime="onnx", threads=1, shadow=True)
    r = score_batch(cat, find_demo_batch(lake), **kw)
    b = r.batch_id
    assert (r.model_version, r.scored) == (champion, n) and r.shadow is not None
    assert (r.shadow.status, r.shadow.challenger_version, r.shadow.scored) == ("scored", challenger, n)
    assert r.shadow.challenger_decision is None  # registered, never decided on: a pending challenger

    preds = scan(cat, "predictions", {"batch_id": b})
    assert preds.num_rows == n and set(preds.column("model_version").to_pylist()) == {champion}
    assert not any(preds.column("shadow").to_pylist())  # no shadow row is ever a prediction of the batch
    shadow = scan(cat, "shadow_predictions", {"batch_id": b})
    assert shadow.num_rows == n and set(shadow.column("model_version").to_pylist()) == {challenger}
    assert all(shadow.column("shadow").to_pylist())
    assert set(shadow.column("champion_model_version").to_pylist()) == {champion}
    champ_g, chall_g = (
        _groups(cat, "predictions", {"batch_id": b}),
        _groups(cat, "shadow_predictions", {"batch_id": b}),
    )
    assert set(champ_g) == set(chall_g) and len(chall_g) == n

    # the agreement table, counted here from the two tables' rows
    ids = sorted(champ_g)
    a = np.array([champ_g[i] for i in ids])
    c = np.array([chall_g[i] for i in ids])
    rows = {r["group_name"]: r for r in scan(cat, "shadow_agreement", {"batch_id": b}).to_pylist()}
    assert set(rows) == {*GROUP_NAMES, OVERALL}
    for g, name in enumerate(GROUP_NAMES):
        row = rows[name]
        assert (row["n_champion"], row["n_challenger"], row["n_agree"]) == (
            int((a == g).sum()), int((c == g).sum()), int(((a == g) & (c == g)).sum())
        ), name  # fmt: skip
        assert (row["champion_version"], row["challenger_version"], row["group"]) == (champion, challenger, g)
    overall = rows[OVERALL]
    assert 0 < overall["n_agree"] < n  # a challenger that agrees on some images, not all
    assert (overall["n_champion"], overall["n_agree"]) == (n, int((a == c).sum())) and overall[
        "group"
    ] is None
    assert overall["agreement_rate"] == pytest.approx((a == c).mean()) == r.shadow.agreement

    # re-runs: skipped as a whole, then forced: exactly one row per image in both tables
    again = score_batch(cat, find_demo_batch(lake), **kw)
    assert again.skipped and again.shadow is not None and again.shadow.status == "skipped"
    forced = score_batch(cat, find_demo_batch(lake), **kw, force=True)
    assert not forced.skipped and forced.shadow is not None and forced.shadow.status == "scored"
    for table in ("predictions", "shadow_predictions"):
        ids_now = scan(cat, table, {"batch_id": b}, columns=["image_id"]).column("image_id").to_pylist()
        assert len(ids_now) == n == len(set(ids_now)), table
    assert scan(cat, "shadow_agreement", {"batch_id": b}).num_rows == NUM_GROUPS + 1

    # reviewers label 30 of the champion's rows: the gate compares both models on those items
    reviewed = ids[:30]
    truth_by_id = {f"test-{i:05d}": int(g) for i, g in enumerate(truth)}
    decisions = [
        Decision(
            image_id=i,
            batch_id=b,
            model_version=champion,
            predicted_group=GROUP_NAMES[champ_g[i]],
            label=GROUP_NAMES[truth_by_id[i]],
            reviewer="t",
            decided_at=datetime(2026, 5, 2, tzinfo=UTC),
            source="import",
        )  # fmt: skip
        for i in reviewed
    ]
    from zalando.ui.store import LakeStore

    LakeStore(lake).append_feedback(decisions)
    ev = shadow_evidence(lake, challenger, champion)
    assert ev is not None and ev.batches == [b] and ev.items == n
    assert ev.agreement == pytest.approx((a == c).mean()) and ev.reviewed_items == 30
    t = np.array([truth_by_id[i] for i in reviewed])
    assert ev.champion_reviewed_accuracy == pytest.approx(
        (np.array([champ_g[i] for i in reviewed]) == t).mean()
    )
    assert ev.challenger_reviewed_accuracy == pytest.approx(
        (np.array([chall_g[i] for i in reviewed]) == t).mean()
    )
    assert shadow_evidence(lake, challenger, "another-champion") is None

    metrics = with_shadow_evidence(lake, {"macro_f1": 0.9}, challenger, champion)
    assert metrics["shadow"]["agreement"] == ev.agreement  # what decide_promotion gates with
    d = evaluate_gates(
        metrics,
        {"model_version": champion, "macro_f1": 0.8},
        GateConfig(min_shadow_agreement=min(ev.agreement + 0.01, 1.0)),
    )
    row = next(r for r in d.rows if r["check"] == "shadow_agreement")
    assert (
        not row["passed"]
        and row["value"] == ev.agreement
        and f"{n} images of 1 shadowed batch" in row["rule"]
    )
    assert any(reason.startswith("shadow agreement with the champion") for reason in d.reasons)
    row = next(r for r in d.rows if r["check"] == "reviewed_accuracy_vs_champion")
    assert (
        row["value"] == ev.challenger_reviewed_accuracy and row["threshold"] == ev.champion_reviewed_accuracy
    )


def test_a_broken_challenger_still_lets_the_batch_commit(
    s3_lake: Lake, cat: LakeCatalog, caplog: pytest.LogCaptureFixture
) -> None:
    lake = s3_lake
    champion = make_champion(lake, seed=0)
    broken = make_champion(lake, seed=2, promote=False)
    _break_bundle(lake, broken)
    n = len(_ingest_mini_test(lake))
    caplog.set_level(logging.WARNING, logger="zalando.scoring.shadow")
    r = score_batch(
        cat,
        find_demo_batch(lake),
        batch_date="2026-05-03",
        shard_size=128,
        runtime="onnx",
        threads=1,
        shadow=True,
    )
    assert (r.model_version, r.scored) == (champion, n)
    assert r.shadow is not None and r.shadow.status == "failed" and r.shadow.challenger_version == broken
    assert "ModelError" in (r.shadow.error or "")
    warnings = [rec.getMessage() for rec in caplog.records if rec.name == "zalando.scoring.shadow"]
    assert len(warnings) == 1 and broken in warnings[0] and "committed" in warnings[0]
    assert scan(cat, "predictions", {"batch_id": r.batch_id}).num_rows == n  # the batch is committed
    assert scan(cat, "shadow_predictions", {"batch_id": r.batch_id}).num_rows == 0
    assert scan(cat, "shadow_agreement", {"batch_id": r.batch_id}).num_rows == 0


def test_the_batch_scoring_flow_shadows_on_request_and_survives_a_broken_challenger(
    prefect_harness: None, flow_env: dict[str, str]
) -> None:
    from flows.batch_scoring import batch_scoring
    from zalando.settings import load_settings

    settings = load_settings()
    lake = Lake.from_settings(settings)
    lake.ensure_ready()
    clear_predictor_cache()
    champion = make_champion(lake, seed=5)
    challenger = make_champion(lake, seed=6, promote=False)
    lake.write_bytes(
        "incoming/shadowed/a.parquet", raw_parquet([f"s{i}" for i in range(30)], mnist_like(30, 7))
    )
    kw = dict(batch_uri="incoming/shadowed", shard_size=10, runtime="onnx", monitor=False)
    plain = batch_scoring(**kw, batch_date=date(2026, 5, 10))
    assert plain["shadow"] is None and plain["scored"] == 30  # off by default
    summary = batch_scoring(**kw, batch_date=date(2026, 5, 11), shadow=True)
    assert summary["model_version"] == champion and summary["scored"] == 30
    assert summary["shadow"]["status"] == "scored" and summary["shadow"]["challenger_version"] == challenger
    cat = lake.catalog()
    assert scan(cat, "shadow_predictions", {"batch_id": summary["batch_id"]}).num_rows == 30
    assert scan(cat, "predictions", {"batch_id": summary["batch_id"]}).num_rows == 30
    _break_bundle(lake, challenger)
    clear_predictor_cache()
    broken = batch_scoring(**kw, batch_date=date(2026, 5, 12), shadow=True)
    assert broken["scored"] == 30 and broken["shadow"]["status"] == "failed"
    assert scan(cat, "predictions", {"batch_id": broken["batch_id"]}).num_rows == 30
