"""`zalando score --from --to`: the library backfill, with the flow (here a fake) scoring each day;
`zalando predictions BATCH_ID [--as-of]`: a batch read back through the predictions table."""

from __future__ import annotations

import sys
import types
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.scoring_support import mnist_like, raw_parquet
from zalando import cli, cli_score
from zalando.lake import Lake
from zalando.scoring import BatchResult, ScoringError

V = "v-cli"


@pytest.fixture
def lake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Lake:
    monkeypatch.setenv("ZALANDO_LAKE_URI", (tmp_path / "lake").as_uri())
    monkeypatch.setenv("ZALANDO_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setattr(cli_score, "setup_logging", lambda verbose: None)  # keep pytest's log handlers
    monkeypatch.setattr(cli_score, "flow_env", lambda settings: None)  # no Prefect environment needed
    lake = Lake.local(tmp_path / "lake")
    for day in ("2026-05-01", "2026-05-03"):
        lake.write_bytes(f"inbox/batch_date={day}/a.parquet", raw_parquet([f"{day}-0"], mnist_like(1)))
    return lake


def _fake_flow(calls: list[dict[str, Any]], fail_on: date | None = None) -> Any:
    def score_one(lake: Lake, settings: Any, location: str, *, batch_date: Any, **kw: Any) -> dict[str, Any]:
        calls.append({"location": location, "batch_date": batch_date, **kw})
        if batch_date == fail_on:
            raise ScoringError(f"batch {batch_date}: 1 of 1 shards not committed")
        batch_id = f"{batch_date}-inbox-{batch_date}"
        r = BatchResult(
            batch_id=batch_id, batch_date=batch_date, model_version=kw["model_version"],
            predictions_table="zalando.predictions",
            records=1, scored=1, quarantined=0, group_counts={"bags": 1},
        )  # fmt: skip
        return {**r.model_dump(mode="json"), "predictions_uri": "file:///p", "drift": None}

    return score_one


def test_backfill_scores_days_with_input_and_says_which_days_had_none(
    lake: Lake, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(cli_score, "score_one", _fake_flow(calls))
    r = CliRunner().invoke(
        cli.app,
        ["score", "--from", "2026-05-01", "--to", "2026-05-03", "--model-version", V, "--workers", "2"],
    )
    assert r.exit_code == 0, r.output
    assert [(c["location"], c["batch_date"]) for c in calls] == [
        ("inbox/batch_date=2026-05-01", date(2026, 5, 1)),
        ("inbox/batch_date=2026-05-03", date(2026, 5, 3)),
    ]
    assert all(c["model_version"] == V and c["workers"] == 2 and c["runner"] == "local" for c in calls)
    out = " ".join(r.output.split())
    assert "2026-05-02: no input at inbox/batch_date=2026-05-02, skipped" in out
    assert f"batch 2026-05-01-inbox-2026-05-01 with model {V} (scored)" in out
    assert f"batch 2026-05-03-inbox-2026-05-03 with model {V} (scored)" in out
    assert out.index("2026-05-01-inbox") < out.index("2026-05-02: no input") < out.index("2026-05-03-inbox")


def test_backfill_stops_at_the_first_failed_day_with_exit_code_2(
    lake: Lake, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(cli_score, "score_one", _fake_flow(calls, fail_on=date(2026, 5, 1)))
    r = CliRunner().invoke(
        cli.app, ["score", "--from", "2026-05-01", "--to", "2026-05-03", "--model-version", V]
    )
    assert r.exit_code == 2
    assert "error: batch 2026-05-01: 1 of 1 shards not committed" in " ".join(r.output.split())
    assert [c["batch_date"] for c in calls] == [date(2026, 5, 1)]


# ------------------------------------------------------------------ the batch boundary, empty batches, tables


class _FakeFlowModule(types.ModuleType):
    """Stands in for flows.batch_scoring (no Prefect): records the flow's parameters, returns a summary."""

    def __init__(self, batch_id: str = "2026-05-01-x") -> None:
        super().__init__("flows.batch_scoring")
        self.calls: list[dict[str, Any]] = []
        self.batch_id = batch_id

    def batch_scoring(self, **params: Any) -> dict[str, Any]:
        self.calls.append(params)
        bdate, version = params["batch_date"], params["model_version"]
        r = BatchResult(
            batch_id=self.batch_id, batch_date=bdate, model_version=version,
            predictions_table="zalando.predictions",
            records=0, scored=0, quarantined=0, seconds=1.06,
        )  # fmt: skip
        return {**r.model_dump(mode="json"), "predictions_uri": "file:///p", "drift": None}


@pytest.fixture
def fake_flow(lake: Lake, monkeypatch: pytest.MonkeyPatch) -> _FakeFlowModule:
    module = _FakeFlowModule()
    monkeypatch.setitem(sys.modules, "flows.batch_scoring", module)
    return module


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def test_score_refuses_a_folder_outside_the_batch_roots_before_reading_it(
    tmp_path: Path, fake_flow: _FakeFlowModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    inside = tmp_path / "batches"
    inside.mkdir()
    outside = tmp_path / "etc"
    outside.mkdir()
    (outside / "passwd.png").write_bytes(b"root:x:0:0\n")
    monkeypatch.setenv("ZALANDO_BATCH_ROOTS", str(inside))
    r = CliRunner().invoke(cli.app, ["score", outside.as_uri(), "--model-version", V])
    assert r.exit_code == 2, r.output
    lines = _error_lines(r.output)
    assert len(lines) == 1 and lines[0].startswith("error: batch location"), r.output
    assert outside.as_uri() in lines[0] and str(inside) in lines[0] and "ZALANDO_BATCH_ROOTS" in lines[0]
    assert fake_flow.calls == []


def test_score_of_an_empty_folder_is_one_error_line_unless_allowed(
    tmp_path: Path, fake_flow: _FakeFlowModule
) -> None:
    empty = tmp_path / "batches" / "empty"
    empty.mkdir(parents=True)
    r = CliRunner().invoke(cli.app, ["score", empty.as_uri(), "--model-version", V])
    assert r.exit_code == 2, r.output
    lines = _error_lines(r.output)
    assert len(lines) == 1 and empty.as_uri() in lines[0] and "no input files" in lines[0], r.output
    assert "--allow-empty" in lines[0] and fake_flow.calls == []
    r = CliRunner().invoke(cli.app, ["score", empty.as_uri(), "--model-version", V, "--allow-empty"])
    assert r.exit_code == 0, r.output
    assert [c["allow_empty"] for c in fake_flow.calls] == [True]


def test_every_table_keeps_long_ids_whole_when_stdout_is_not_a_terminal(
    lake: Lake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zalando import registry

    monkeypatch.delenv("COLUMNS", raising=False)  # a log file: rich would fall back to 80 columns
    experiment = "fashion_cnn_with_a_rather_long_descriptive_experiment_name"
    version = "20261201T020000Z-1a2b3c4d"
    registry.register_model(
        lake, model_version=version, experiment=experiment, dataset_version="20261201T010000Z-dv0123",
        metrics={"accuracy": 0.9123, "macro_f1": 0.9012, "latency_ms_per_1000": 12.5, "size_mb": 1.2},
        spec={}, code_version="test", bundle_key=f"models/{experiment}/{version}",
    )  # fmt: skip
    r = CliRunner().invoke(cli.app, ["models"])
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if version in line)
    assert experiment in row and "20261201T010000Z-dv0123" in row, r.output
    # the scoring summary: title on one line, the batch id whole, the seconds column says what it is
    batch_id = "2026-12-01-shop-with-a-rather-long-name-for-its-nightly-inbox"
    monkeypatch.setitem(sys.modules, "flows.batch_scoring", _FakeFlowModule(batch_id))
    src = tmp_path / "batches" / "one"
    src.mkdir(parents=True)
    (src / "a.parquet").write_bytes(raw_parquet(["a-0"], mnist_like(1)))
    r = CliRunner().invoke(
        cli.app, ["score", src.as_uri(), "--model-version", version, "--date", "2026-12-01"]
    )
    assert r.exit_code == 0, r.output
    assert f"batch {batch_id} with model {version} (scored)" in r.output, r.output
    # the table's header row (a log line of the batch's description may also say "records")
    header = next(line for line in r.output.splitlines() if "records" in line and "scored" in line)
    assert "batch wall s" in header, r.output
    assert "1.06" in r.output


def test_predictions_reads_a_batch_now_and_as_of_a_time_or_a_snapshot(
    lake: Lake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time
    from datetime import UTC, datetime

    from tests.scoring_support import FakePredictor
    from zalando.lake.catalog import open_catalog
    from zalando.scoring import score_batch
    from zalando.settings import load_settings

    cat = open_catalog(load_settings(), lake=lake)
    before_any = datetime.now(UTC)
    time.sleep(0.05)
    location = "inbox/batch_date=2026-05-01"
    first = score_batch(cat, location, predictor=FakePredictor(), model_version=V, batch_date="2026-05-01")
    time.sleep(0.05)
    between = datetime.now(UTC)
    time.sleep(0.05)
    lake.write_bytes(f"{location}/b.parquet", raw_parquet(["2026-05-01-1", "2026-05-01-2"], mnist_like(2, 1)))
    second = score_batch(
        cat, location, predictor=FakePredictor(), model_version=V, batch_date="2026-05-01", force=True
    )
    assert (first.scored, second.scored) == (1, 3)
    run = CliRunner()

    def show(*extra: str) -> tuple[int, str]:
        r = run.invoke(cli.app, ["predictions", first.batch_id, "--rows", "2", *extra])
        return r.exit_code, " ".join(r.output.split())

    code, out = show()
    assert code == 0 and "reconciliation: records 3, scored 3, quarantined 0" in out, out
    for as_of in (between.isoformat(), str(first.snapshot_id)):
        code, out = show("--as-of", as_of)
        assert code == 0 and "reconciliation: records 1, scored 1, quarantined 0" in out, out
        assert f"snapshot {first.snapshot_id}" in out
    code, out = show("--as-of", str(second.snapshot_id))
    assert code == 0 and "records 3" in out
    # a bad value, a time before the table existed, a snapshot that never was: one error line each
    for bad, says in (
        ("yesterday", "neither an ISO timestamp nor a snapshot id"),
        (before_any.isoformat(), "no snapshot at or before"),
        ("4913349759761406980", "no snapshot of the table and no time"),
    ):
        r = run.invoke(cli.app, ["predictions", first.batch_id, "--as-of", bad])
        lines = [line for line in r.output.splitlines() if line.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and says in lines[0], r.output


def test_score_shadow_passes_the_flag_to_the_flow_and_prints_the_agreement(
    tmp_path: Path, fake_flow: _FakeFlowModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "batches" / "shadowed"
    src.mkdir(parents=True)
    (src / "a.parquet").write_bytes(raw_parquet(["a-0"], mnist_like(1)))
    scored = fake_flow.batch_scoring
    shadow = {"status": "scored", "challenger_version": "v-challenger", "agreement": 0.875}
    monkeypatch.setattr(fake_flow, "batch_scoring", lambda **p: {**scored(**p), "shadow": shadow})
    r = CliRunner().invoke(cli.app, ["score", src.as_uri(), "--model-version", V, "--shadow"])
    assert r.exit_code == 0, r.output
    assert fake_flow.calls[-1]["shadow"] is True
    assert "shadow: challenger v-challenger scored, agreement with the champion 87.50%" in r.output
    r = CliRunner().invoke(cli.app, ["score", src.as_uri(), "--model-version", V])
    assert r.exit_code == 0 and fake_flow.calls[-1]["shadow"] is False, r.output
