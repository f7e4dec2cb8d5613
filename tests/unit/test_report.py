"""The run report from small synthetic inputs, the Markdown/rich tables, and Grad-CAM."""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd
import pytest
import torch
from rich.console import Console
from torch import nn

from zalando import evaluate as ev
from zalando import report as rp
from zalando.errors import DataError, ModelError
from zalando.gradcam import confused_pair_gradcams, gradcam, gradcam_png, last_conv_layer
from zalando.labels import group_of

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(experiments=("cnn_small", "squeezenet1_1_full"), n: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    y = group_of(labels)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    frames: dict[str, list[pd.DataFrame]] = {}
    pr = {}
    for i, experiment in enumerate(experiments):
        logits = rng.normal(size=(n, 5))
        logits[np.arange(n), y] += 2.0 + i
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        perf = [{"runtime": rt, "params": 100_000 * (i + 1), "size_mb_torch": 0.4, "size_mb_onnx": 0.45,
                 "n_images": n, "batch_size": 128, "wall_s": 0.1, "images_per_s": n / 0.1, "p50_ms": 3.0,
                 "p95_ms": 4.0} for rt in ("torch", "onnx")]  # fmt: skip
        energy = [{"label": "train", "country_iso_code": "DEU", "duration_s": 10.0, "cpu_power_w": 5.0,
                   "gpu_power_w": 0.0, "ram_power_w": 20.0, "cpu_energy_kwh": 1e-5, "gpu_energy_kwh": 0.0,
                   "ram_energy_kwh": 5e-5, "energy_kwh": 6e-5, "emissions_kg": 2e-5, "images": None,
                   "kwh_per_1000_images": None, "power_method": "estimated (TDP x load / constant RAM)"}]  # fmt: skip
        t = ev.metric_tables("r1", experiment, f"v{i}", y, probs.argmax(1), performance=perf, energy=energy)
        for name, frame in t.items():
            frames.setdefault(name, []).append(frame)
        pr[experiment] = ev.pr_curves(y, probs)
    tables = {name: pd.concat(parts, ignore_index=True) for name, parts in frames.items()}
    idx = ev.worst_mistakes(y, probs, group=2, k=6)
    worst = rp.worst_one_piece_items(images, labels, probs, idx)
    histories = {
        e: [{"epoch": k, "train_loss": 1 / k, "val_loss": 1.1 / k, "val_acc": 1 - 1 / (k + 1), "lr": 1e-3}
            for k in range(1, 4)]
        for e in experiments
    }  # fmt: skip
    return tables, pr, histories, worst


def test_build_run_report_has_the_sections_and_png_files() -> None:
    tables, pr, histories, worst = _run()
    gradcam_file = gradcam_png(np.zeros((1, 28, 28), np.uint8), np.zeros((1, 28, 28)), ["a"])
    files = rp.build_run_report(
        "r1",
        tables["per_group"],
        tables["performance"],
        tables["energy"],
        tables["confusion"],
        pr,
        histories,
        worst,
        {"one_piece_as_upper_part": gradcam_file},
        summary=tables["summary"],
    )
    expected_png = {
        "confusion_cnn_small.png", "confusion_squeezenet1_1_full.png", "pr_cnn_small.png",
        "pr_squeezenet1_1_full.png", "training_curves.png", "worst_one_piece.png",
        "gradcam_one_piece_as_upper_part.png",
    }  # fmt: skip
    assert set(files) == expected_png | {"report.md"}
    for name in expected_png:
        assert files[name].startswith(PNG_MAGIC), name
    md = files["report.md"].decode("utf-8")
    for section in (
        "# Run report `r1`",
        "## Classical metrics per group (test split)",
        "### Summary",
        "## Performance",
        "## Energy",
        "### Confusion matrices",
        "### Precision-recall curves",
        "### Training curves",
        "### Worst One piece mistakes",
        "### Grad-CAM",
    ):
        assert section in md, section
    # the study's best model is the reference row of each group
    assert "| One piece | study best (reference) | 0.960 | 0.860 | 1.000 |" in md
    assert md.count("study best (reference)") >= 5 + 1  # five groups + the performance table
    assert "estimated (TDP x load / constant RAM)" in md and "no RAPL" in md
    # every linked picture is one of the files
    links = set(re.findall(r"\]\(([^)]+\.png)\)", md))
    assert links == expected_png
    # one row per group x (reference + 2 experiments)
    assert len(rp.per_group_display(tables["per_group"])) == 5 * 3


def test_report_without_optional_inputs_still_has_its_sections() -> None:
    tables, *_ = _run(experiments=("cnn_small",))
    files = rp.build_run_report("r2", tables["per_group"])
    assert set(files) == {"report.md"}
    md = files["report.md"].decode()
    assert "## Performance" in md and "_No energy was measured in this run._" in md
    assert "_No One piece mistakes to show._" in md
    with pytest.raises(DataError, match="per_group"):
        rp.build_run_report("r3", tables["per_group"].iloc[0:0])


def test_summary_from_per_group_counts_matches_the_summary_table() -> None:
    tables, *_ = _run()
    from_counts = rp.summary_display(tables["per_group"])
    from_table = rp.summary_display(tables["per_group"], tables["summary"])
    pd.testing.assert_frame_equal(from_counts, from_table)


def test_markdown_table_formats_missing_values_and_escapes_pipes() -> None:
    df = pd.DataFrame({"name": ["a|b", "c"], "x": [0.12345, np.nan], "n": pd.array([3, None], dtype="Int64")})
    text = rp.markdown_table(df, {"x": ".2f"})
    lines = text.strip().splitlines()
    assert lines[0] == "| name | x | n |"
    assert lines[1] == "| --- | ---: | ---: |"
    assert lines[2] == "| a\\|b | 0.12 | 3 |"
    assert lines[3] == "| c | – | – |"


def test_render_tables_prints_every_table_with_rich() -> None:
    tables, *_ = _run()
    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None)
    rp.render_tables(console, rp.display_tables(tables["per_group"], tables["performance"], tables["energy"]))
    text = out.getvalue()
    for word in ("per group", "summary", "performance", "energy", "One piece", "squeezenet1_1_full", "onnx"):
        assert word in text, word


# --- Grad-CAM ---------------------------------------------------------------------------------------


class _Net(nn.Module):
    """conv -> inplace ReLU -> pool -> conv -> inplace ReLU -> mean -> linear; returns (probs, embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(inplace=True),
        )  # fmt: skip
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.features(x / 255.0).mean(dim=(2, 3))
        return torch.softmax(self.head(z), dim=1), z


class _BlockDetector(nn.Module):
    """Class 0's score is the sum of a 1x1 conv (identity) over the image: it looks where pixels are bright."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1, bias=False)
        nn.init.ones_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.conv(x / 255.0).sum(dim=(1, 2, 3))
        return torch.stack([s, -s], dim=1)


def test_gradcam_points_at_the_evidence_and_cleans_up() -> None:
    torch.manual_seed(0)
    model = _BlockDetector()
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    images[:, 4:10, 16:24] = 200
    heat = gradcam(model, images, target_class=0)
    assert heat.shape == (3, 28, 28) and heat.dtype == np.float32
    assert heat.max() == pytest.approx(1.0) and heat.min() >= 0.0
    assert heat[:, 4:10, 16:24].mean() > 0.9 and heat[:, 20:, :10].max() < 0.05
    # class 1's score falls with brightness: no positive evidence, an all-zero map (no NaN)
    assert np.all(gradcam(model, images, target_class=1) == 0.0)
    assert not model.conv._forward_hooks and model.conv.weight.grad is None


def test_gradcam_on_a_tuple_output_model_with_frozen_weights_and_inplace_relu() -> None:
    torch.manual_seed(0)
    model = _Net().train()
    for p in model.parameters():
        p.requires_grad_(False)
    assert last_conv_layer(model) is model.features[3]
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    heat = gradcam(model, images, [0, 1, 2, 3, 4], batch_size=2)
    assert heat.shape == (5, 28, 28) and np.isfinite(heat).all()
    assert model.training  # restored
    with pytest.raises(DataError, match="target_class"):
        gradcam(model, images, 7)
    with pytest.raises(DataError, match="uint8"):
        gradcam(model, images.astype(np.float32), 0)
    with pytest.raises(ModelError, match="Conv2d"):
        gradcam(nn.Linear(784, 5), images, 0)


def test_confused_pair_gradcams_makes_one_png_per_pair_with_mistakes() -> None:
    model = _Net()
    images = np.random.default_rng(1).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    y_true = np.array([2, 2, 0, 1])
    probs = np.array(
        [[0.7, 0, 0.3, 0, 0], [0.1, 0, 0.9, 0, 0], [0.2, 0, 0.8, 0, 0], [0, 1.0, 0, 0, 0]], dtype=float
    )
    files = confused_pair_gradcams(model, images, y_true, probs, y_true_label=np.array([3, 3, 6, 1]))
    assert set(files) == {"gradcam_one_piece_as_upper_part.png", "gradcam_upper_part_as_one_piece.png"}
    assert all(v.startswith(PNG_MAGIC) for v in files.values())


def test_report_says_how_each_model_decides() -> None:
    tables, *_ = _run(experiments=("cnn_small",))
    cards = [
        {
            "experiment": "fashion_cnn", "model_version": "v1", "tta": "hflip", "temperature": 0.8519,
            "training": {"device": "cpu", "precision": "bf16", "epochs_run": 60, "best_epoch": 60},
            "operating_point": {"weights": [1.0, 1.0, 1.21, 1.0, 1.0], "met": True},
        },
        {"experiment": "resnet18_full", "model_version": "v2", "tta": "none", "temperature": 1.2, "training": {}},
    ]  # fmt: skip
    md = rp.build_run_report("r4", tables["per_group"], models=cards)["report.md"].decode()
    assert "### How each model decides" in md
    row = next(line for line in md.splitlines() if line.startswith("| fashion_cnn"))
    assert "cpu bf16, 60 epochs (best 60)" in row and "hflip" in row and "0.852" in row
    assert "One piece x1.21" in row and "Upper part" not in row
    other = next(line for line in md.splitlines() if line.startswith("| resnet18_full"))
    assert "argmax" in other and "cpu fp32" in other


def test_report_sections_come_in_their_order_with_their_figures() -> None:
    from datetime import UTC, datetime

    tables, pr, histories, worst = _run()
    gradcam_file = gradcam_png(np.zeros((1, 28, 28), np.uint8), np.zeros((1, 28, 28)), ["a"])
    files = rp.build_run_report(
        "r5", tables["per_group"], tables["performance"], tables["energy"], tables["confusion"], pr, histories,
        worst, {"one_piece_as_upper_part": gradcam_file}, summary=tables["summary"],
        label_group={"cnn_small": np.arange(50).reshape(10, 5)}, champion="cnn_small",
        created_at=datetime(2026, 12, 1, 8, 0, tzinfo=UTC), models=[{"experiment": "cnn_small"}],
    )  # fmt: skip
    md = files["report.md"].decode()
    assert [line for line in md.splitlines() if line.startswith("#")] == [
        "# Run report `r5`",
        "## Classical metrics per group (test split)",
        "### Summary",
        "### How each model decides (all chosen on the validation split)",
        "### Original labels by predicted group",
        "## Performance",
        "## Energy",
        "## Figures",
        "### Confusion matrices (test split)",
        "### Precision-recall curves (test split)",
        "### Training curves",
        "### Worst One piece mistakes",
        "### Grad-CAM: where the model looked",
    ]
    assert md.splitlines()[2:5] == [
        "Generated 2026-12-01 08:00 UTC. Experiments: `cnn_small`, `squeezenet1_1_full`.",
        "",
        "Champion after this run: **`cnn_small`**.",
    ]
    # the figures in the order the report shows them, the Markdown last
    assert list(files) == [
        "confusion_cnn_small.png", "confusion_squeezenet1_1_full.png", "pr_cnn_small.png",
        "pr_squeezenet1_1_full.png", "training_curves.png", "worst_one_piece.png",
        "gradcam_one_piece_as_upper_part.png", "report.md",
    ]  # fmt: skip
    assert md.count("### Precision-recall curves") == 1 and "\n\n\n" not in md


def test_how_each_model_decides_names_the_experiment_of_a_real_model_card() -> None:
    """The card as build_bundle writes it (the experiment's name under "model"), not a hand-made dict."""
    from types import SimpleNamespace

    from zalando.models.bundle import build_bundle
    from zalando.models.experiments import ExperimentSpec

    spec = ExperimentSpec(name="fashion_cnn_wide", architecture="fashion_cnn", weights="none")
    result = SimpleNamespace(
        spec=spec, model=nn.Linear(2, 2), temperature=0.9, operating_point=None,
        weights=SimpleNamespace(to_dict=lambda: {}), params=6, macs=4, n_train=10, n_val=5, epochs_run=3,
        best_epoch=2, best_val_loss=0.5, stopped_early=False, wall_s=1.0, seed=0, resumed_from_epoch=None,
        device="cpu", precision="fp32", val_metrics={}, tta_scores={}, history=[],
    )  # fmt: skip
    card = build_bundle(result, mean=0.3, std=0.35, dataset_version="dv", model_version="v9").card
    row = rp.models_display([card]).iloc[0]
    assert row["Experiment"] == "fashion_cnn_wide" and row["Model version"] == "v9"
    assert row["Reduced precision (validation)"] == "not checked"  # saved without runtime checks
    verdict = {"val_group_acc": 0.98, "admitted": True}
    card["runtime_admission"] = {
        "reference": "torch", "max_drop_points": 0.05, "val_images": 10,
        "runtimes": {"torch": {**verdict, "diff_points": 0.0}, "onnx-int8": {**verdict, "diff_points": -0.02},
                     "torch-bf16": {"val_group_acc": 0.9, "diff_points": -8.0, "admitted": False}},
    }  # fmt: skip
    row = rp.models_display([card]).iloc[0]
    assert row["Reduced precision (validation)"] == "onnx-int8 -0.02 pts, torch-bf16 -8.00 pts (not admitted)"
    assert row["TTA"] == "none"
    card.update(tta="hflip", tta_flip={"below": 0.95, "share": 0.0371})
    assert rp.models_display([card]).iloc[0]["TTA"] == "hflip below 0.95 (3.7% of validation rows)"
    assert row["Screen"] == "none"
    card["screen"] = {"below": 0.99, "macs_per_image": 2_900_000, "validation": {"share": 0.183}}
    assert (
        rp.models_display([card]).iloc[0]["Screen"]
        == "below 0.99: 18.3% of validation rows to the full net, 2.9 MMAC"
    )
