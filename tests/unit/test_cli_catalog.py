"""`zalando experiments` and `zalando profiles`: what the catalogue holds, read from the real command."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from zalando.cli import app
from zalando.models.architectures import build_model, count_macs, count_parameters
from zalando.models.experiments import NUMERIC_FIELDS, ProfileParams, load_catalog

runner = CliRunner()
NO_USER_FILE = {"ZALANDO_EXPERIMENTS_FILE": None}


def _invoke(*args: str, env: dict[str, str | None] | None = None) -> str:
    result = runner.invoke(app, list(args), env={**NO_USER_FILE, **(env or {})})
    assert result.exit_code == 0, result.output
    return result.stdout


def _cells(line: str, bar: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip(bar).split(bar)]


def _rows(text: str) -> dict[str, list[str]]:
    """First line of each table row, by its first cell (continuation lines of a multi-line row skipped)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("│"):
            cells = _cells(line, "│")
            if cells[0]:
                rows[cells[0]] = cells[1:]
    return rows


def _header(text: str) -> list[str]:
    return _cells(next(line for line in text.splitlines() if line.startswith("┃")), "┃")


def _trained_by(catalog: object, name: str) -> str:
    return ", ".join(p.name for p in catalog.profiles.values() if name in p.experiments) or "–"


def test_experiments_lists_every_experiment_with_its_cost_and_profiles() -> None:
    out = _invoke("experiments")
    catalog = load_catalog()
    assert _header(out) == [
        "experiment", "architecture", "parameters", "input px (profile)", "MFLOP/img", "trained by",
    ]  # fmt: skip
    assert "2 x the multiply-accumulates" in out  # the convention is said
    rows = _rows(out)
    assert list(rows) == list(catalog.experiments)  # every built-in experiment, in catalogue order
    for name, spec in catalog.experiments.items():
        assert rows[name][0] == spec.architecture
        assert rows[name][-1] == _trained_by(catalog, name), name
    spec = catalog.experiment("fashion_cnn")
    model = build_model(spec.architecture, spec.num_outputs, spec.input_size, spec.arch_params)
    architecture, params, size, mflop, trained_by = rows["fashion_cnn"]
    assert params == f"{count_parameters(model):,}" and count_parameters(model) > 100_000
    assert size == f"{spec.input_size} ({', '.join(catalog.profiles)})"
    assert mflop == f"{2 * count_macs(model) / 1e6:,.1f}"
    assert trained_by == "paper, cpu, quick"
    assert rows["mobilenet_v2_full"][-1] == "paper, quick"  # cpu lists it in overrides, does not train it
    assert rows["mobilenet_v2_full"][2] == "224 (paper)"  # the first of its sizes: 224 for paper, 32 after
    assert "32 (cpu, quick)" in out


def test_a_pipe_gets_whole_columns() -> None:
    out = _invoke("experiments", env={"COLUMNS": "40"})
    assert "…" not in out and "mobilenet_v2_frozen_aug" in out
    assert max(len(line) for line in out.splitlines()) > 40


def test_experiments_and_profiles_read_the_users_file(tmp_path: Path) -> None:
    extra = tmp_path / "experiments.yaml"
    extra.write_text(
        "experiments:\n"
        "  - name: my_cnn\n"
        "    extends: fashion_cnn\n"
        "    arch_params: {c1: 8, c2: 16, c3: 32, n1: 1, n2: 1, n3: 1, pool_to: 3, embed_dim: 64}\n"
        "profiles:\n"
        "  cpu:\n"
        "    add_experiments: [my_cnn]\n"
        "    max_epochs: 12\n"
    )
    env = {"ZALANDO_EXPERIMENTS_FILE": str(extra)}
    out = _invoke("experiments", env=env)
    rows = _rows(out)
    assert "my_cnn" in rows and "fashion_cnn" in rows and str(extra) in out
    model = build_model("fashion_cnn", 10, 28, {"c1": 8, "c2": 16, "c3": 32, "n1": 1, "n2": 1, "n3": 1, "pool_to": 3, "embed_dim": 64})  # fmt: skip
    assert rows["my_cnn"][1] == f"{count_parameters(model):,}"
    assert rows["my_cnn"][-1] == "cpu"
    assert rows["fashion_cnn"][1] != rows["my_cnn"][1]

    profiles = _rows(_invoke("profiles", env=env))
    assert profiles["max_epochs"] == ["–", "12", "1"]


def test_profiles_show_what_each_profile_changes() -> None:
    out = _invoke("profiles")
    catalog = load_catalog()
    assert _header(out) == ["setting", *catalog.profiles]
    assert {"paper", "cpu", "quick"} <= set(catalog.profiles)
    rows = _rows(out)
    assert set(rows) == set(ProfileParams.model_fields) - {"name"}
    paper, cpu, quick = (list(catalog.profiles).index(p) for p in ("paper", "cpu", "quick"))
    # a number that differs between the profiles: quick caps the images, paper and cpu do not
    assert rows["max_train_images"][quick] == "256" and rows["max_train_images"][paper] == "–"
    assert rows["max_input_size"][cpu] == "32" and rows["max_input_size"][paper] == "–"
    assert rows["pretrained"][paper] == "yes" and rows["pretrained"][cpu] == "no"
    for field in ("max_input_size", "max_epochs", "batch_size", "max_train_images", "max_val_images"):
        for i, profile in enumerate(catalog.profiles.values()):
            value = getattr(profile, field)
            assert rows[field][i] == ("–" if value is None else str(value)), (field, profile.name)
    # the first line of each list: the first experiment, the first override
    assert rows["experiments"][cpu] == catalog.profile("cpu").experiments[0]
    first, numbers = next(iter(catalog.profile("cpu").overrides.items()))
    assert rows["overrides"][cpu].startswith(f"{first}: ") and rows["overrides"][quick] == "–"
    assert all(f"{k}=" in rows["overrides"][cpu] for k in numbers) and set(numbers) <= set(NUMERIC_FIELDS)


@pytest.mark.parametrize("command", ["experiments", "profiles"])
def test_a_broken_users_file_is_one_error_line(command: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiments:\n  - name: x\n    architecture: no_such_net\n")
    result = runner.invoke(app, [command], env={"ZALANDO_EXPERIMENTS_FILE": str(bad)})
    assert result.exit_code == 2
    assert "unknown architecture" in result.stderr and result.stdout == ""
