"""Retraining learns from feedback (issue 15): accepted labels -> a new dataset version (its id hashes
the rows, weights and hold-out), the engine's per-image weights and group-only mask, and the
feedback gate."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.scoring_support import mnist_like
from tests.ui_support import VERSION, scored_batch
from zalando.data.feedback_data import (
    FEEDBACK_ROWS_SCHEMA,
    FeedbackDataConfig,
    FeedbackItems,
    accepted_decisions,
    decision_keys,
    extend_dataset_arrays,
    feedback_holdout_metrics,
    feedback_version_id,
    holdout_mask,
)
from zalando.errors import DataError
from zalando.feedback import UNUSABLE, Decision, Proposal, record_decisions
from zalando.gates import GateConfig, evaluate_gates
from zalando.labels import GROUP_LABELS, GROUP_NAMES, LABEL_TO_GROUP
from zalando.lake import Lake
from zalando.models.experiments import ExperimentSpec, ProfileParams
from zalando.train import (
    SampleWeights,
    TrainingLoss,
    balanced_class_weights,
    select_training_data,
    setup_training,
    train_experiment,
)
from zalando.ui.store import LakeStore
from zalando.validation import group_log_probs

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
CFG = FeedbackDataConfig()


def _decision(batch: str, image: str, label: str, minute: int = 0, reviewer: str = "r") -> Decision:
    return Decision(
        image_id=image, batch_id=batch, model_version=VERSION, predicted_group="Bags", label=label,
        reviewer=reviewer, decided_at=T0 + timedelta(minutes=minute), source="ui",
    )  # fmt: skip


def _items(n: int, batch: str = "2026-03-01-shop", groups: list[int] | None = None) -> FeedbackItems:
    g = np.asarray(groups if groups is not None else [i % 5 for i in range(n)], dtype=np.int64)
    return FeedbackItems(
        batch_ids=[batch] * n, image_ids=[f"img-{i:05d}" for i in range(n)], model_versions=[VERSION] * n,
        groups=g, images=mnist_like(n, seed=n),
    )  # fmt: skip


def _base(n_train: int = 60, n_val: int = 20) -> dict:
    x, y = mnist_like(n_train + n_val, seed=1), np.arange(n_train + n_val) % 10
    return {
        "dataset_version": "ds-base", "mean": 0.2, "std": 0.3,
        "x_train": x[:n_train], "y_train": y[:n_train], "x_val": x[n_train:], "y_val": y[n_train:],
        "x_test": x[:5], "y_test": y[:5],
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- choosing


def test_accepted_decisions_first_per_image_without_unusable() -> None:
    ds = [
        _decision("2026-03-02-b", "x", "Bags"),
        _decision("2026-03-01-a", "y", "Footwear", minute=3, reviewer="late"),
        _decision("2026-03-01-a", "y", "One piece", minute=1),  # earlier: this one counts
        _decision("2026-03-01-a", "z", UNUSABLE),
        _decision("2026-03-01-a", "w", "Footwear"),
    ]
    got = accepted_decisions(ds)
    assert [(d.batch_id, d.image_id, d.label) for d in got] == [
        ("2026-03-01-a", "w", "Footwear"), ("2026-03-01-a", "y", "One piece"), ("2026-03-02-b", "x", "Bags"),
    ]  # fmt: skip
    assert decision_keys(got)[1] == ("2026-03-01-a", "y", "One piece")


def test_the_holdout_is_a_stable_share_chosen_by_image_id() -> None:
    ids = [f"img-{i}" for i in range(3000)]
    hold = holdout_mask(["b"] * 3000, ids, 0.2)
    assert 0.17 < hold.mean() < 0.23
    np.testing.assert_array_equal(hold[:100], holdout_mask(["b"] * 100, ids[:100], 0.2))  # stable as it grows
    assert not holdout_mask(["b"] * 3000, ids, 0.0).any()
    assert not np.array_equal(hold, holdout_mask(["other"] * 3000, ids, 0.2))  # the batch is part of the key


def test_the_version_id_hashes_base_rows_weight_and_holdout() -> None:
    keys = [("b", "1", "Bags"), ("b", "2", "Footwear")]
    vid = feedback_version_id("ds-base", keys, CFG)
    assert vid.startswith("dsf-") and vid == feedback_version_id("ds-base", keys[::-1], CFG)
    assert vid != feedback_version_id("ds-other", keys, CFG)
    assert vid != feedback_version_id("ds-base", keys[:1], CFG)  # new feedback, new data
    assert vid != feedback_version_id("ds-base", [("b", "1", "Bags"), ("b", "2", "Bags")], CFG)
    assert vid != feedback_version_id("ds-base", keys, FeedbackDataConfig(weight=3.0))
    assert vid != feedback_version_id("ds-base", keys, FeedbackDataConfig(holdout=0.5))


def test_extend_adds_weighted_feedback_and_a_holdout_keeping_the_split() -> None:
    base, items = _base(), _items(200)
    out, vid = extend_dataset_arrays(base, items, FeedbackDataConfig(weight=2.5, holdout=0.2))
    assert (
        vid
        == out["dataset_version"]
        == feedback_version_id("ds-base", items.keys(), CFG.model_copy(update={"weight": 2.5}))
    )
    assert out["base_dataset_version"] == "ds-base"
    for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert out[k] is base[k]  # the split's roles are untouched
    hold = holdout_mask(items.batch_ids, items.image_ids, 0.2)
    assert len(out["x_feedback"]) == (~hold).sum() and len(out["x_feedback_val"]) == hold.sum() > 20
    assert set(out["ids_feedback"]).isdisjoint(out["ids_feedback_val"])
    assert (out["w_feedback"] == 2.5).all() and out["w_feedback"].dtype == np.float32
    np.testing.assert_array_equal(out["g_feedback_val"], items.groups[hold])
    np.testing.assert_array_equal(out["x_feedback"], items.images[~hold])
    same, base_id = extend_dataset_arrays(base, _items(0), CFG)
    assert base_id == "ds-base" and "x_feedback" not in same


def test_feedback_rows_round_trip_as_a_table() -> None:
    items = _items(30)
    table = items.to_table(CFG)
    assert table.schema.equals(FEEDBACK_ROWS_SCHEMA)
    hold = holdout_mask(items.batch_ids, items.image_ids, CFG.holdout)
    assert table.column("subset").to_pylist() == ["feedback_val" if h else "train" for h in hold]
    back = FeedbackItems.from_table(table)
    assert back.keys() == items.keys() and np.array_equal(back.images, items.images)
    with pytest.raises(DataError, match="columns"):
        FeedbackItems.from_table(table.drop(["group"]))


def test_holdout_metrics_are_the_group_accuracy_on_held_out_items() -> None:
    data = {"x_feedback_val": mnist_like(4), "g_feedback_val": np.array([0, 1, 2, 3])}

    def predict(x: np.ndarray) -> tuple[np.ndarray, None]:
        return np.eye(5)[[0, 1, 4, 4]], None

    assert feedback_holdout_metrics(predict, data) == {"feedback_accuracy": 0.5, "feedback_items": 4}
    assert feedback_holdout_metrics(predict, {}) == {"feedback_accuracy": None, "feedback_items": 0}


# ---------------------------------------------------------------------------------------------- the step


@pytest.fixture(scope="module")
def base_lake(tmp_path_factory: pytest.TempPathFactory, mini_dir: Path) -> tuple[Lake, object]:
    from zalando.data.ingest import ingest
    from zalando.data.sources import fetch_source
    from zalando.data.split import preprocess

    root = tmp_path_factory.mktemp("fb")
    lake = Lake.local(root / "lake")
    ingest(lake, fetch_source(str(mini_dir), cache_dir=root))
    return lake, preprocess(lake, seed=3)


def test_feedback_makes_a_new_dataset_version_that_training_loads(base_lake: tuple[Lake, object]) -> None:
    from zalando.steps.feedback import add_feedback_labels, load_training_arrays

    lake, dv = base_lake
    store = LakeStore(lake)
    assert add_feedback_labels(lake, dv, CFG, run_id="r").dataset == dv  # no feedback: the base as it is
    batch = scored_batch(lake, 40)
    ids = sorted(store.batch_predictions(batch).predicted)
    labels = {i: GROUP_NAMES[n % 5] for n, i in enumerate(ids[:30])} | {ids[30]: UNUSABLE}
    record_decisions(
        store,
        [Proposal(where="t", image_id=i, batch_id=batch, label=lab) for i, lab in labels.items()],
        source="ui",
    )
    out = add_feedback_labels(lake, dv, CFG, run_id="r")
    new = out.dataset.dataset_version
    assert new.startswith("dsf-") and new != dv.dataset_version and not out.reused
    assert out.base_dataset_version == dv.dataset_version and out.items == 30  # unusable left out
    assert out.train_items + out.holdout_items == 30 and out.holdout_items > 0
    assert out.dataset.mean == dv.mean and out.key == f"reviewed_images/dataset_version={new}"

    arrays = load_training_arrays(lake, new)
    plain = load_training_arrays(lake, dv.dataset_version)
    assert arrays["dataset_version"] == new and "x_feedback" not in plain
    np.testing.assert_array_equal(arrays["x_train"], plain["x_train"])
    assert len(arrays["x_feedback"]) == out.train_items and (arrays["w_feedback"] == 2.0).all()
    assert len(arrays["x_feedback_val"]) == out.holdout_items
    pixels = store.batch_pixels(batch, ids[:30])
    first = arrays["ids_feedback"][0].split("/", 1)[1]
    np.testing.assert_array_equal(arrays["x_feedback"][0], pixels[first])

    again = add_feedback_labels(lake, dv, CFG, run_id="r2")
    assert again.dataset.dataset_version == new and again.reused  # nothing changed: the same version
    record_decisions(
        store, [Proposal(where="t", image_id=ids[35], batch_id=batch, label="Bags")], source="ui"
    )
    assert add_feedback_labels(lake, dv, CFG, run_id="r3").dataset.dataset_version not in (
        new,
        dv.dataset_version,
    )
    assert (
        add_feedback_labels(lake, dv, FeedbackDataConfig(weight=4), run_id="r4").dataset.dataset_version
        != new
    )


def test_feedback_images_gone_from_their_inputs_are_left_out(tmp_path: Path) -> None:
    from zalando.data.split import DatasetVersion
    from zalando.steps.feedback import add_feedback_labels

    lake = Lake.local(tmp_path / "lake")
    store = LakeStore(lake)
    batch = scored_batch(lake, 12)
    ids = sorted(store.batch_predictions(batch).predicted)
    record_decisions(
        store, [Proposal(where="t", image_id=i, batch_id=batch, label="Bags") for i in ids], source="ui"
    )
    lake.delete_prefix("incoming/shop")  # the batch's input file is gone
    dv = DatasetVersion(
        dataset_version="ds-x", mean=0.3, std=0.3, n_train=1, n_val=1, n_test=1, seed=1, val_fraction=0.2,
        source_digest="d",
    )  # fmt: skip
    out = add_feedback_labels(lake, dv, CFG, run_id="r")
    assert out.dataset == dv and out.missing == 12 and out.items == 0


# ---------------------------------------------------------------------------------------------- the engine


def test_unit_weights_give_the_plain_loss() -> None:
    torch.manual_seed(0)
    logits, y = torch.randn(12, 10), torch.randint(0, 10, (12,))
    cw = balanced_class_weights(y.numpy(), 10)
    gw = balanced_class_weights(np.asarray(LABEL_TO_GROUP)[y.numpy()], 5)
    ones = SampleWeights(torch.ones(12), torch.ones(12, dtype=torch.bool))
    for loss in (TrainingLoss("labels", cw, gw, 0.1, 0.5), TrainingLoss("labels", None, None, 0.0, 0.0)):
        assert torch.allclose(loss(logits, y, sample_weights=ones), loss(logits, y), atol=1e-6)
    g = torch.as_tensor(np.asarray(LABEL_TO_GROUP)[y.numpy()])
    group_loss = TrainingLoss("groups", gw, None, 0.1, 0.0)
    assert torch.allclose(
        group_loss(logits[:, :5], g, sample_weights=ones), group_loss(logits[:, :5], g), atol=1e-6
    )


def test_an_image_without_a_fine_label_trains_the_group_term_only() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, 10)
    known = torch.tensor([True, True, False])
    sw = SampleWeights(torch.ones(3), known)
    loss = TrainingLoss("labels", None, None, 0.0, 0.0)
    a = loss(logits, torch.tensor([1, 8, 5]), sample_weights=sw)  # image 3: Footwear, fine label unknown
    b = loss(logits, torch.tensor([1, 8, 9]), sample_weights=sw)  # any label of the group: the same loss
    assert torch.allclose(a, b)
    expected = (
        F.cross_entropy(logits[:2], torch.tensor([1, 8]), reduction="sum")
        + F.nll_loss(group_log_probs(logits[2:]), torch.tensor([3]), reduction="sum")
    ) / 3
    assert torch.allclose(a, expected)
    known_all = loss(
        logits,
        torch.tensor([1, 8, 5]),
        sample_weights=SampleWeights(torch.ones(3), torch.ones(3, dtype=torch.bool)),
    )
    assert not torch.allclose(a, known_all)


@pytest.mark.parametrize("target", ["labels", "groups"])
def test_a_weight_of_two_counts_an_image_twice(target: str) -> None:
    torch.manual_seed(2)
    k = 10 if target == "labels" else 5
    logits, y = torch.randn(4, k), torch.tensor([0, 3, 4, 2])
    loss = TrainingLoss(target, None, None, 0.05, 0.3)
    known = torch.tensor([True, True, True, target == "groups"])
    weighted = loss(logits, y, sample_weights=SampleWeights(torch.tensor([1.0, 1, 1, 2]), known))
    idx = torch.tensor([0, 1, 2, 3, 3])
    twice = loss(logits[idx], y[idx], sample_weights=SampleWeights(torch.ones(5), known[idx]))
    assert torch.allclose(weighted, twice, atol=1e-6)


TINY = ProfileParams(
    name="tiny", experiments=("t",), max_train_images=60, max_val_images=20, pretrained=False
)


def _spec(**kw: object) -> ExperimentSpec:
    base = dict(
        name="t", architecture="fashion_cnn", arch_params={"c1": 4, "c2": 8, "c3": 8, "n2": 1, "n3": 1, "embed_dim": 8},
        input_size=28, batch_size=20, epochs=1, lr=1e-3, scheduler="none", profile="tiny",
    )  # fmt: skip
    base.update(kw)
    return ExperimentSpec(**base)


def test_training_data_appends_every_feedback_image_with_its_weight_and_mask() -> None:
    data, _ = extend_dataset_arrays(_base(), _items(40, groups=[3] * 40), FeedbackDataConfig(weight=2.0))
    n_fb = len(data["x_feedback"])
    td = select_training_data(data, TINY, "labels", 0.2, 0.3, seed=1)
    assert td.n_train == 60 + n_fb and td.n_val == 20
    sw = td.sample_weights
    assert sw is not None and sw.weight[:60].eq(1).all() and sw.weight[60:].eq(2).all()
    assert sw.label_known[:60].all() and not sw.label_known[60:].any()
    assert set(td.y_train[60:].tolist()) <= set(GROUP_LABELS[3]) and (td.y_train_groups[60:] == 3).all()
    torch.testing.assert_close(td.x_train[60:, 0], torch.from_numpy(data["x_feedback"]))
    groups = select_training_data(data, TINY, "groups", 0.2, 0.3, seed=1)
    assert groups.sample_weights.label_known.all() and (groups.y_train[60:] == 3).all()
    # class weights count the images whose fine label is known: the placeholder labels do not
    setup = setup_training(
        _spec(class_weighting="balanced"), TINY, td, seed=1, device=torch.device("cpu"), lake=None,
        allow_download=False,
    )  # fmt: skip
    expected = balanced_class_weights(td.y_train[:60].numpy(), 10)
    torch.testing.assert_close(setup.loss_fn.class_weights, expected)
    assert select_training_data(_base(), TINY, "labels", 0.2, 0.3, seed=1).sample_weights is None


def test_training_with_feedback_learns_from_it_and_checks_its_arrays() -> None:
    base = _base()
    plain = train_experiment(_spec(), TINY, base, 0.2, 0.3, seed=3, threads=1, device="cpu")
    data, _ = extend_dataset_arrays(base, _items(40), CFG)
    fed = train_experiment(_spec(), TINY, data, 0.2, 0.3, seed=3, threads=1, device="cpu")
    assert fed.n_train == 60 + len(data["x_feedback"]) and fed.n_val == plain.n_val == 20
    assert fed.history[0]["train_loss"] != plain.history[0]["train_loss"]
    for bad, message in (
        ({"g_feedback": data["g_feedback"] + 5}, "g_feedback groups must be in 0..4"),
        ({"w_feedback": np.zeros_like(data["w_feedback"])}, "finite and > 0"),
        ({"x_feedback": data["x_feedback"].astype(np.float32)}, "x_feedback must be uint8"),
        ({"w_feedback": data["w_feedback"][:1]}, "one group and one weight"),
    ):
        with pytest.raises(DataError, match=message):
            train_experiment(_spec(), TINY, {**data, **bad}, 0.2, 0.3, seed=3, threads=1, device="cpu")


# ---------------------------------------------------------------------------------------------- the gate


def _gm(acc: float | None, n: int, version: str = "v-new", f1: float = 0.95) -> dict:
    return {
        "model_version": version, "dataset_version": "dsf-1", "per_group": {}, "macro_f1": f1,
        "canary_accuracy": 0.8, "feedback_accuracy": acc, "feedback_items": n,
    }  # fmt: skip


CONFIG = GateConfig(floors={}, max_latency_ms_per_1000=None, max_size_mb=None, canary_floor=None)


def test_the_feedback_gate_refuses_a_drop_on_the_held_out_feedback() -> None:
    assert GateConfig().max_feedback_drop == 0.0
    champion = _gm(0.85, 40, "v-old", f1=0.9)
    ok = evaluate_gates(_gm(0.85, 40), champion, CONFIG)
    assert ok.promote and "feedback_accuracy_vs_champion" in [r["check"] for r in ok.rows]
    bad = evaluate_gates(_gm(0.825, 40), champion, CONFIG)
    assert not bad.promote
    assert bad.reasons == [
        "accuracy on the 40 held-out feedback items 0.8250 is more than 0.0000 below the champion's 0.8500"
    ]
    lenient = CONFIG.model_copy(update={"max_feedback_drop": 0.05})
    assert evaluate_gates(_gm(0.825, 40), champion, lenient).promote


def _ga(acc: float | None, n: int, version: str = "v-new", f1: float = 0.95, grouped: float = 0.99) -> dict:
    return {**_gm(acc, n, version, f1), "accuracy": grouped}


def test_a_clear_gain_on_the_feedback_items_relaxes_the_f1_margin_to_a_bounded_drop() -> None:
    """A retrain that learns the reviewers' corrections may lose at most 0.2 points of grouped
    accuracy on the original validation split (whatever its macro F1 does); without the gain (or
    on too few items) the macro-F1 margin rule stands."""
    champion = _ga(0.46, 200, "v-old", f1=0.990, grouped=0.9900)
    learned = evaluate_gates(_ga(0.95, 200, f1=0.980, grouped=0.9885), champion, CONFIG)
    assert learned.promote
    row = next(r for r in learned.rows if r["check"] == "accuracy_vs_champion")
    assert "feedback items +0.4900" in row["rule"] and row["threshold"] == pytest.approx(0.988)
    assert "macro_f1_vs_champion" not in [r["check"] for r in learned.rows]
    too_much = evaluate_gates(_ga(0.95, 200, f1=0.999, grouped=0.9875), champion, CONFIG)
    assert not too_much.promote
    assert too_much.reasons == [
        "grouped accuracy 0.9875 is more than 0.002 below the champion's 0.9900 "
        "(allowed because it gains 0.4900 on the held-out feedback items)"
    ]
    # records without accuracy: the same bound on macro F1
    f1_only = evaluate_gates(_gm(0.95, 200, f1=0.9875), _gm(0.46, 200, "v-old", f1=0.990), CONFIG)
    assert not f1_only.promote and f1_only.reasons[0].startswith("macro F1 0.9875 is more than 0.002")
    assert evaluate_gates(_gm(0.95, 200, f1=0.9885), _gm(0.46, 200, "v-old", f1=0.990), CONFIG).promote
    small_gain = evaluate_gates(_gm(0.465, 200, f1=0.9885), champion, CONFIG)
    assert not small_gain.promote and "does not beat the champion's" in small_gain.reasons[0]
    few = evaluate_gates(_gm(0.95, 10, f1=0.9885), _gm(0.46, 10, "v-old", f1=0.990), CONFIG)
    assert not few.promote
    strict = CONFIG.model_copy(update={"min_feedback_gain": None})
    assert not evaluate_gates(_gm(0.95, 200, f1=0.9885), champion, strict).promote


@pytest.mark.parametrize(
    ("challenger", "champion", "config"),
    [
        (_gm(None, 0), _gm(None, 0, "v-old", 0.9), CONFIG),  # no feedback items in the dataset version
        (_gm(0.1, 40), None, CONFIG),  # no champion
        (_gm(0.1, 40), {**_gm(None, 0, "v-old", 0.9)}, CONFIG),  # the champion has no number
        (_gm(0.1, 40), _gm(0.9, 40, "v-old", 0.9), CONFIG.model_copy(update={"max_feedback_drop": None})),
    ],
)
def test_the_feedback_gate_is_off_without_held_out_feedback(
    challenger: dict, champion: dict | None, config: GateConfig
) -> None:
    d = evaluate_gates(challenger, champion, config)
    assert "feedback_accuracy_vs_champion" not in [r["check"] for r in d.rows] and d.promote


def test_gate_metrics_carry_the_held_out_feedback_numbers() -> None:
    import pandas as pd

    from zalando.gates import gate_metrics

    per_group = pd.DataFrame(
        [{"group_name": g, "recall": 0.9, "precision": 0.9, "npv": 0.9} for g in GROUP_NAMES]
    )
    summary = pd.DataFrame([{"macro_f1": 0.9, "accuracy": 0.9}])
    m = gate_metrics(
        per_group,
        summary,
        model_version="v",
        dataset_version="dsf-1",
        feedback_accuracy=0.7,
        feedback_items=3,
    )
    assert (m["feedback_accuracy"], m["feedback_items"]) == (0.7, 3)
    plain = gate_metrics(per_group, summary, model_version="v", dataset_version="ds-1")
    assert (plain["feedback_accuracy"], plain["feedback_items"]) == (None, 0)


@pytest.mark.parametrize("steps", [4, 5, 6])
def test_onecycle_survives_a_warm_up_of_exactly_one_step(steps: int) -> None:
    """0.2 x 5 steps is one warm-up step, where OneCycleLR divided by zero (feedback images change the
    number of steps an epoch has)."""
    from zalando.train import make_scheduler

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sch, when = make_scheduler(_spec(scheduler="onecycle", warmup_frac=0.2, lr=0.01), opt, steps)
    assert when == "step"
    for _ in range(steps):
        opt.step()
        sch.step()
    assert opt.param_groups[0]["lr"] < 0.01
