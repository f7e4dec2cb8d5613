"""A lake written by the code before the Iceberg tables (manifest partitions, decision objects):
refused in one line until `zalando lake migrate` moves it; the migration moves the committed files
only (checksums verified), leaves a crashed writer's files out, and is idempotent."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tests.conftest import make_images
from zalando import evaluate as ev
from zalando.data.arrays import raw_table
from zalando.data.ingest import ingest, load_raw
from zalando.data.split import load_dataset_arrays, read_dataset_version
from zalando.errors import LakeError
from zalando.labels import group_of
from zalando.lake import Lake, keys, table_to_parquet_bytes
from zalando.lake import commit as lc
from zalando.lake.migrate import SCORING_SOURCES, migrate_lake
from zalando.lake.tables import PROB_COLUMNS
from zalando.registry import champion_history, decision_log
from zalando.steps.training import read_metric_tables

DIGEST = "0123456789abcdef"
RUN = "20260101T020000Z-aaaaaa"
VERSION = "ds-legacy000001"

# the old scoring's prediction part files and partition keys, as it wrote them
OLD_PREDICTIONS = pa.schema(
    [
        ("image_id", pa.string()),
        ("pred_group", pa.int8()),
        ("pred_group_name", pa.string()),
        *[(c, pa.float32()) for c in PROB_COLUMNS],
        ("confidence", pa.float32()),
        ("model_version", pa.string()),
        ("batch_id", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
    ]
)


def _old_predictions_key(batch_date: date, model_version: str, batch_id: str) -> str:
    return (
        f"{keys.LEGACY_PREDICTIONS}/batch_date={batch_date}/model_version={model_version}/batch_id={batch_id}"
    )


def _old_quarantine_key(batch_id: str, model_version: str) -> str:
    return f"{keys.LEGACY_QUARANTINE}/run_id=score-{batch_id}/model_version={model_version}"


# the old code's schemas, as it wrote them (ingest's quarantine had no run_id, row or batch columns)
OLD_QUARANTINE = pa.schema(
    [
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("label", pa.int8()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("image", pa.binary()),
    ]
)


def _raw(split: str, n: int, first: int = 0) -> pa.Table:
    images, labels = make_images(n, seed=first + len(split))
    return raw_table([f"{split}-{i:05d}" for i in range(first, first + n)], images, labels)


def build_legacy_lake(lake: Lake) -> dict[str, int]:
    """Write every training-side table as the old code did (lake.commit_partition, decision objects),
    plus what a crashed writer leaves: a file no manifest lists, a partition without a manifest."""
    extra = {"source": "/data", "source_digest": DIGEST, "checksums": {}}
    run_id = f"ingest-{DIGEST}"
    lake.commit_partition(
        "raw/fashion-mnist/split=train", {"part-00000": _raw("train", 30), "part-00001": _raw("train", 10, 30)},
        run_id, {**extra, "split": "train"},
    )  # fmt: skip
    lake.commit_partition("raw/fashion-mnist/split=test", {"part-00000": _raw("test", 12)}, run_id, extra)
    # a crashed re-ingest's part file, never listed by the manifest
    lake.write_bytes(
        "raw/fashion-mnist/split=train/part-00099.parquet", table_to_parquet_bytes(_raw("train", 5, 900))
    )
    q = pa.table(
        {
            "image_id": ["train-00040"], "source": ["/data"], "split": ["train"], "label": pa.array([3], pa.int8()),
            "reason": ["blank_image"], "detail": ["blank"], "image": [bytes(784)],
        },
        schema=OLD_QUARANTINE,
    )  # fmt: skip
    lake.commit_partition(f"quarantine/run_id={run_id}", {"quarantine": q}, run_id, extra)
    ids = [f"train-{i:05d}" for i in range(40)]
    subset = pa.array(["val" if i % 5 == 0 else "train" for i in range(40)])
    stats = {
        "dataset_version": VERSION, "mean": 0.3, "std": 0.35, "n_train": 32, "n_val": 8, "n_test": 12,
        "seed": 1, "val_fraction": 0.2, "source_digest": DIGEST,
    }  # fmt: skip
    lake.commit_partition(
        f"datasets/{VERSION}",
        {"split": pa.table({"image_id": ids, "subset": subset})},
        VERSION,
        {"stats": stats},
    )
    y = group_of(np.arange(50) % 10)
    frames = ev.metric_tables(RUN, "cnn", "v1", y, y, split="test")
    lake.commit_partition(f"metrics/run_id={RUN}/experiment=cnn", ev.metric_arrow_tables(frames), RUN)
    # a crashed evaluation: its files, no manifest
    other = ev.metric_arrow_tables(ev.metric_tables("20260102T020000Z-bbbbbb", "cnn", "v2", y, y))
    lake.write_bytes(
        "metrics/run_id=20260102T020000Z-bbbbbb/experiment=cnn/per_group.parquet",
        table_to_parquet_bytes(other["per_group"]),
    )
    drift = pa.table(
        {
            "batch_id": ["b1", "b1"], "model_version": ["v1", "v1"], "statistic": ["pixel_mean", "mmd"],
            "value": [0.1, 0.2], "threshold": [0.5, 0.5], "p_value": [0.9, 0.8], "alarm": [False, False],
            "batch_value": ["0.3", "x"], "reference_value": ["0.3", "y"], "detail": ["", ""],
        }
    )  # fmt: skip
    lake.commit_partition(
        "monitoring/batch_date=2026-01-01/model_version=v1/batch_id=b1", {"drift": drift}, "r"
    )
    for i, (action, version, prev) in enumerate([("promote", "v1", None), ("reject", "v2", "v1")]):
        decision_id = f"20260101T02000{i}.000000Z-{i:012d}"
        lake.write_json(
            f"registry/decisions/{decision_id}.json",
            {
                "decision_id": decision_id, "at": f"2026-01-01T02:00:0{i}+00:00", "action": action,
                "model_version": version, "experiment": "cnn", "previous_champion": prev,
                "champion_after": "v1", "actor": "flow", "reason": "why", "decision": {"promote": action == "promote"},
            },
        )  # fmt: skip
    return {"train": 40, "test": 12, "per_group": 5, "drift": 2, "decisions": 2}


@pytest.fixture
def legacy(tmp_path: Path) -> Lake:
    lake = Lake.local(tmp_path / "lake")
    build_legacy_lake(lake)
    return lake


def _reopened(lake: Lake) -> Lake:
    """The same lake and catalog as another process sees them (nothing cached)."""
    return Lake.local(lake.root)


def test_every_reader_and_writer_refuses_a_legacy_lake_in_one_line(legacy: Lake, mini_dir: Path) -> None:
    from zalando.data.sources import fetch_source

    calls = {
        "load_raw": lambda: load_raw(legacy, "train"),
        "decision_log": lambda: decision_log(legacy),
        "read_metric_tables": lambda: read_metric_tables(legacy),
        "ingest": lambda: ingest(legacy, fetch_source(str(mini_dir), cache_dir=Path(legacy.root) / "../c")),
        "scan": lambda: lc.scan(legacy.catalog(), "raw_images"),
    }
    for name, call in calls.items():
        with pytest.raises(LakeError, match=r"layout before Iceberg .*run `zalando lake migrate`") as e:
            call()
        assert "\n" not in str(e.value), name
    assert "raw/fashion-mnist/split=" in str(e.value)
    assert not any(k.startswith("zalando/") for k in legacy.list_keys())  # nothing was written


def test_migrate_moves_the_committed_rows_and_leaves_uncommitted_files_out(legacy: Lake) -> None:
    report = migrate_lake(legacy)
    assert report.rows == {
        "raw_images": 52, "quarantine": 1, "datasets": 40, "dataset_versions": 1, "monitoring": 2,
        "metrics_per_group": 5, "metrics_confusion": 25, "metrics_summary": 1, "metrics_performance": 0,
        "metrics_energy": 0, "registry_decisions": 2,
    }  # fmt: skip
    assert len(report.partitions) == 6 and report.decisions == 2
    assert sorted(report.left_out) == [
        "metrics/run_id=20260102T020000Z-bbbbbb/experiment=cnn/per_group.parquet",
        "raw/fashion-mnist/split=train/part-00099.parquet",
    ]

    lake = _reopened(legacy)  # a reader of another process: no refusal now
    train = load_raw(lake, "train")
    assert train.num_rows == 40 and "train-00900" not in set(train.column("image_id").to_pylist())
    assert train.column("image_id").to_pylist() == [f"train-{i:05d}" for i in range(40)]
    assert load_raw(lake, "test").num_rows == 12
    raw = lc.scan(lake.catalog(), "raw_images", columns=["split", "source_digest"])
    assert set(raw.column("source_digest").to_pylist()) == {DIGEST}
    q = lc.scan(lake.catalog(), "quarantine").to_pylist()
    assert [(r["run_id"], r["image_id"], r["reason"]) for r in q] == [
        (f"ingest-{DIGEST}", "train-00040", "blank_image")
    ]
    dv = read_dataset_version(lake, VERSION)
    assert (dv.n_train, dv.n_val, dv.source_digest) == (32, 8, DIGEST)
    arrays = load_dataset_arrays(lake, dv)
    assert len(arrays["x_train"]) == 32 and len(arrays["x_val"]) == 8 and len(arrays["x_test"]) == 12
    metrics = read_metric_tables(lake, RUN)
    assert len(metrics["per_group"]) == 5 and set(metrics["summary"]["run_id"]) == {RUN}
    assert metrics["summary"]["accuracy"].tolist() == [1.0]
    drift = lc.scan(lake.catalog(), "monitoring").to_pylist()
    assert {r["batch_date"] for r in drift} == {date(2026, 1, 1)} and {r["statistic"] for r in drift} == {
        "pixel_mean",
        "mmd",
    }
    log = decision_log(lake)
    assert log["action"].tolist() == ["promote", "reject"] and json.loads(log["decision"][0]) == {
        "promote": True
    }
    assert log["at"].tolist() == ["2026-01-01T02:00:00+00:00", "2026-01-01T02:00:01+00:00"]
    assert champion_history(lake) == ["v1"]
    # the legacy files stay, their manifests renamed; the decision objects moved aside
    assert lake.exists(f"raw/fashion-mnist/split=train/{keys.MIGRATED_MANIFEST}")
    assert not lake.is_committed("raw/fashion-mnist/split=train")
    assert not lake.list_keys("registry/decisions/2026") and len(lake.list_keys(keys.MIGRATED_DECISIONS)) == 2
    assert lake.exists(keys.MIGRATED_MARKER)


def test_migrate_twice_changes_nothing(legacy: Lake) -> None:
    migrate_lake(legacy)
    lake = _reopened(legacy)
    before = {
        name: lc.scan(lake.catalog(), name).num_rows
        for name in ("raw_images", "datasets", "registry_decisions")
    }
    snapshots = len(lc.snapshot_log(lake.catalog(), "raw_images"))
    again = migrate_lake(lake)
    assert again.nothing_to_do and again.rows == {}
    after = {name: lc.scan(lake.catalog(), name).num_rows for name in before}
    assert after == before == {"raw_images": 52, "datasets": 40, "registry_decisions": 2}
    assert len(lc.snapshot_log(lake.catalog(), "raw_images")) == snapshots


def test_a_migration_stopped_half_way_is_finished_by_a_second_run(
    legacy: Lake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after the rows were committed but before the manifest was renamed: the second run
    replaces the same rows again (the replace is keyed on the partition), never duplicates them."""
    real_delete = Lake.delete
    crashed = []

    def crash_once(self: Lake, key: str) -> None:
        if key.endswith("split=test/_MANIFEST.json") and not crashed:
            crashed.append(key)
            raise LakeError("simulated crash")
        real_delete(self, key)

    monkeypatch.setattr(Lake, "delete", crash_once)
    with pytest.raises(LakeError, match="simulated crash"):
        migrate_lake(legacy)
    lake = _reopened(legacy)
    with pytest.raises(LakeError, match="zalando lake migrate"):
        load_raw(lake, "test")
    migrate_lake(lake)
    lake = _reopened(legacy)
    assert load_raw(lake, "test").num_rows == 12 and load_raw(lake, "train").num_rows == 40


def test_a_committed_file_that_does_not_match_its_checksum_is_not_migrated(legacy: Lake) -> None:
    key = "raw/fashion-mnist/split=test/part-00000.parquet"
    legacy.write_bytes(key, table_to_parquet_bytes(_raw("test", 3, 500)))  # swapped after the commit
    with pytest.raises(LakeError, match="sha256 does not match its manifest"):
        migrate_lake(legacy)
    assert legacy.is_committed("raw/fashion-mnist/split=test")  # left as it was, still refused
    with pytest.raises(LakeError, match="zalando lake migrate"):
        decision_log(_reopened(legacy))


def test_scorings_legacy_partitions_become_predictions_and_quarantine_rows(tmp_path: Path) -> None:
    """Scoring's sources: a lake with only old predictions is refused until migrated; then a committed
    batch and its rejected inputs move, and an uncommitted batch stays out."""
    lake = Lake.local(tmp_path / "lake")
    day, version = date(2026, 1, 5), "v1"
    for batch, committed in (("2026-01-05-inbox", True), ("2026-01-05-crashed", False)):
        n = 7
        rows = {"image_id": [f"{batch}-{i}" for i in range(n)], "pred_group": pa.array([1] * n, pa.int8())}
        rows |= {
            "pred_group_name": ["Bottom part"] * n,
            **{c: pa.array([0.2] * n, pa.float32()) for c in PROB_COLUMNS},
        }
        rows |= {"confidence": pa.array([0.9] * n, pa.float32()), "model_version": [version] * n}
        rows |= {
            "batch_id": [batch] * n,
            "scored_at": pa.array([datetime(2026, 1, 5, tzinfo=UTC)] * n, pa.timestamp("us", tz="UTC")),
        }
        part = pa.table(rows, schema=OLD_PREDICTIONS)
        key = _old_predictions_key(day, version, batch)
        if committed:
            lake.commit_partition(key, {"part-00000": part}, "score")
            q = pa.table(
                {"image_id": ["x"], "source": ["a.png"], "row": [0], "reason": ["not_an_image"], "detail": ["html"],
                 "image": pa.array([None], pa.binary()), "batch_id": [batch], "shard_id": pa.array([0], pa.int32())}
            )  # fmt: skip
            lake.commit_partition(_old_quarantine_key(batch, version), {"part-00000": q}, "score")
        else:
            lake.write_bytes(f"{key}/part-00000.parquet", table_to_parquet_bytes(part))
    with pytest.raises(LakeError, match=r"layout before Iceberg .*run `zalando lake migrate`"):
        lc.scan(_reopened(lake).catalog(), "predictions")
    report = migrate_lake(lake, SCORING_SOURCES)
    assert report.rows == {"predictions": 7, "quarantine": 1}
    assert report.left_out == [
        f"{_old_predictions_key(day, version, '2026-01-05-crashed')}/part-00000.parquet"
    ]
    preds = lc.scan(lake.catalog(), "predictions").to_pylist()
    assert {(r["batch_id"], r["batch_date"], r["shadow"]) for r in preds} == {
        ("2026-01-05-inbox", day, False)
    }
    (q,) = lc.scan(lake.catalog(), "quarantine").to_pylist()
    assert (q["run_id"], q["model_version"], q["batch_id"], q["split"]) == (
        "score-2026-01-05-inbox",
        "v1",
        "2026-01-05-inbox",
        None,
    )
