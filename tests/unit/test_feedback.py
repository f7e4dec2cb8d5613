"""Feedback labels: Label Studio's formats round-trip, bad rows are rejected with a reason and good
ones kept, decisions are append-only rows in the lake, and the `zalando labels` commands."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.ui_support import VERSION, scored_batch
from zalando.feedback import (
    FEEDBACK_SCHEMA,
    LABEL_STUDIO_CONFIG,
    LABELS,
    UNUSABLE,
    Decision,
    FeedbackFileError,
    Proposal,
    clean_reviewer,
    first_decisions,
    label_studio_tasks,
    normalise_label,
    parse_csv,
    read_feedback_file,
    record_decisions,
)
from zalando.lake import Lake
from zalando.lake.keys import CATALOG_FILE
from zalando.ui.links import image_url
from zalando.ui.store import FEEDBACK_PREFIX, LakeStore

BASE = "http://desk.example:8765"


@pytest.fixture
def store(tmp_path: Path) -> LakeStore:
    return LakeStore(Lake.local(tmp_path / "lake"))


@pytest.fixture
def batch(store: LakeStore) -> str:
    return scored_batch(store.lake, 12)


def _ls_export(tasks: list[dict], labels: list[str], *, drop_ids_every: int = 2) -> list[dict]:
    """What Label Studio's JSON export looks like after annotators chose ``labels`` on our tasks."""
    out = []
    for i, (task, label) in enumerate(zip(tasks, labels, strict=True)):
        data = dict(task["data"])
        if i % drop_ids_every == 0:  # the ids then come from the image URL alone
            data.pop("image_id")
            data.pop("batch_id")
        out.append(
            {
                "id": 100 + i,
                "data": data,
                "annotations": [
                    {
                        "id": 500 + i,
                        "completed_by": {"id": 7, "email": "ann@example.com"},
                        "result": [
                            {
                                "id": f"r{i}",
                                "from_name": "group",
                                "to_name": "image",
                                "type": "choices",
                                "value": {"choices": [label]},
                                "origin": "manual",
                            }
                        ],
                        "was_cancelled": False,
                        "ground_truth": False,
                        "created_at": "2026-03-02T10:00:00.000000Z",
                        "lead_time": 2.5,
                    }
                ],
                "predictions": task["predictions"],
            }
        )
    return out


def test_label_studio_export_then_import_round_trips(store: LakeStore, batch: str, tmp_path: Path) -> None:
    rows = store.prediction_rows(batch, needs_review_only=False).to_pylist()
    tasks = label_studio_tasks(rows, lambda b, i: image_url(BASE, b, i))
    assert len(tasks) == 12
    t = tasks[0]
    assert t["data"]["image"] == f"{BASE}/images/{batch}/{rows[0]['image_id']}.png"
    assert t["data"]["image_id"] == rows[0]["image_id"] and t["data"]["batch_id"] == batch
    assert t["data"]["predicted_group"] == rows[0]["pred_group_name"]
    assert set(t["data"]["probabilities"]) == set(LABELS[:5])
    (pred,) = t["predictions"]
    assert pred["model_version"] == VERSION and 0 <= pred["score"] <= 1
    (res,) = pred["result"]
    assert res == {
        "from_name": "group",
        "to_name": "image",
        "type": "choices",
        "value": {"choices": [rows[0]["pred_group_name"]]},
    }
    # the labeling config names the same controls and every label
    assert (
        '<Choices name="group" toName="image"' in LABEL_STUDIO_CONFIG
        and '<Image name="image"' in LABEL_STUDIO_CONFIG
    )
    assert all(f'<Choice value="{label}"/>' in LABEL_STUDIO_CONFIG for label in LABELS)

    chosen = [LABELS[i % len(LABELS)] for i in range(len(tasks))]
    export = tmp_path / "project-1-at-2026-03-02.json"
    export.write_text(json.dumps(_ls_export(tasks, chosen)))
    parsed = read_feedback_file(export)
    assert parsed.kind == "label-studio" and len(parsed.proposals) == 12 and parsed.unlabelled == 0
    result = record_decisions(store, parsed.proposals, source="import")
    assert (len(result.accepted), len(result.repeated), result.rejected) == (12, 0, [])

    stored = {d.image_id: d for d in store.read_feedback(batch)}
    assert {i: d.label for i, d in stored.items()} == {
        r["image_id"]: c for r, c in zip(rows, chosen, strict=True)
    }
    d = stored[rows[0]["image_id"]]
    assert d.reviewer == "labelstudio:ann@example.com" and d.source == "import" and d.model_version == VERSION
    assert d.predicted_group == rows[0]["pred_group_name"]
    assert d.decided_at == datetime(2026, 3, 2, 10, 0, tzinfo=UTC)

    # importing the same export again changes nothing: every row is a repeat
    again = record_decisions(store, read_feedback_file(export).proposals, source="import")
    assert (len(again.accepted), len(again.repeated), again.rejected) == (0, 12, [])
    assert len(store.read_feedback(batch)) == 12


def test_label_studio_cancelled_unlabelled_and_ambiguous_annotations(store: LakeStore, batch: str) -> None:
    from zalando.feedback import parse_label_studio

    rows = store.prediction_rows(batch, needs_review_only=False).to_pylist()
    tasks = _ls_export(
        label_studio_tasks(rows[:4], lambda b, i: image_url(BASE, b, i)), ["Bags"] * 4, drop_ids_every=99
    )
    tasks[0]["annotations"][0]["was_cancelled"] = True  # skipped like an unlabelled task
    tasks[1]["annotations"] = []
    tasks[2]["annotations"][0]["result"][0]["value"]["choices"] = ["Bags", "Footwear"]
    tasks[3]["annotations"].append(
        {**tasks[3]["annotations"][0], "result": [{"type": "choices", "value": {"choices": ["Footwear"]}}]}
    )
    parsed = parse_label_studio(tasks)
    assert parsed.unlabelled == 2 and len(parsed.proposals) == 3
    result = record_decisions(store, parsed.proposals, source="import")
    reasons = {r.where: r.reason for r in result.rejected}
    assert "one expected" in reasons["task 102"]
    assert [d.label for d in result.accepted] == ["Bags"]  # task 103's first annotation
    assert reasons["task 103 annotation 2"].startswith("conflicts with the earlier decision 'Bags'")


def test_bad_rows_are_rejected_with_a_reason_and_good_rows_kept(store: LakeStore, batch: str) -> None:
    ids = store.prediction_rows(batch, needs_review_only=False).column("image_id").to_pylist()
    earlier = record_decisions(
        store,
        [Proposal(where="page", image_id=ids[5], batch_id=batch, label="Bags", reviewer="bob")],
        source="ui",
    )
    assert len(earlier.accepted) == 1
    text = (
        "image_id,batch_id,label,reviewer\n"
        f"{ids[0]},{batch},Footwear,ann\n"  # good
        f"{ids[1]},{batch},one_piece,\n"  # good: group keys work too, reviewer defaults
        f"{ids[2]},{batch},not a fashion article,ann\n"  # good: unusable
        f"no-such-image,{batch},Footwear,ann\n"
        f"{ids[3]},{batch},Hats,ann\n"
        f"{ids[4]},2026-01-01-nowhere,Footwear,ann\n"
        f"{ids[4]},,Footwear,ann\n"
        f"{ids[5]},{batch},Footwear,ann\n"  # conflicts with bob's earlier 'Bags'
        f"{ids[5]},{batch},Bags,carl\n"  # the same as before: a repeat, not an error
        f"{ids[0]},{batch},Bags,dan\n"  # conflicts with line 2 of this file
        "\n"
    )
    parsed = parse_csv(text, name="f.csv")
    result = record_decisions(store, parsed.proposals, source="import", default_reviewer="import:f.csv")
    assert [d.image_id for d in result.accepted] == ids[:3]
    assert [d.label for d in result.accepted] == ["Footwear", "One piece", UNUSABLE]
    assert result.accepted[1].reviewer == "import:f.csv"
    assert len(result.repeated) == 1 and result.repeated[0].reviewer == "carl"
    reasons = {r.where: r.reason for r in result.rejected}
    assert reasons["line 5"] == f"unknown image id 'no-such-image' in batch {batch!r}"
    assert reasons["line 6"].startswith("unknown label 'Hats'; expected one of: Upper part")
    assert reasons["line 7"] == "unknown batch '2026-01-01-nowhere'"
    assert reasons["line 8"] == "missing batch_id"
    assert reasons["line 9"].startswith("conflicts with the earlier decision 'Bags' by bob")
    assert reasons["line 11"].startswith("conflicts with the earlier decision 'Footwear' by ann")
    assert len(reasons) == 6
    stored = store.read_feedback(batch)
    assert len(stored) == 4 and {d.source for d in stored} == {"ui", "import"}


def test_a_model_version_the_batch_was_not_scored_with_is_rejected(store: LakeStore, batch: str) -> None:
    ids = store.prediction_rows(batch).column("image_id").to_pylist()
    p = Proposal(where="line 2", image_id=ids[0], batch_id=batch, label="Bags", model_version="other-v1")
    (r,) = record_decisions(store, [p], source="import").rejected
    assert r.reason == f"unknown batch {batch!r} (or not scored with model 'other-v1')"


def test_feedback_is_append_only_partitions_in_the_lake(store: LakeStore, batch: str) -> None:
    ids = store.prediction_rows(batch).column("image_id").to_pylist()
    first = record_decisions(
        store, [Proposal(where="a", image_id=ids[0], batch_id=batch, label="Bags")], source="ui"
    )
    manifest = store.lake.read_manifest(first.written[0])
    second = record_decisions(
        store, [Proposal(where="b", image_id=ids[1], batch_id=batch, label="Bags")], source="ui"
    )
    assert first.written != second.written
    parts = store.lake.list_partitions(f"{FEEDBACK_PREFIX}/batch_id={batch}")
    assert parts == sorted(first.written + second.written)
    assert store.lake.read_manifest(first.written[0]) == manifest  # the first write was not touched
    table = store.lake.read_partition(first.written[0])
    assert table.schema.equals(FEEDBACK_SCHEMA)
    # a fresh store (another process) reads the same rows from the lake
    assert [d.image_id for d in LakeStore(store.lake).read_feedback(batch)] == ids[:2]


def test_unreadable_files_raise_one_error(tmp_path: Path) -> None:
    cases = {
        "missing.csv": None,
        "bad.json": "[{not json",
        "cols.csv": "image,label\nx,Bags\n",
        "obj.json": '{"data": {}}',
    }
    for name, text in cases.items():
        p = tmp_path / name
        if text is not None:
            p.write_text(text)
        with pytest.raises(FeedbackFileError) as e:
            read_feedback_file(p)
        assert str(p) in str(e.value), name
    (tmp_path / "latin.csv").write_bytes("image_id,batch_id,label\n\xe9\n".encode("latin-1"))
    with pytest.raises(FeedbackFileError, match="UTF-8"):
        read_feedback_file(tmp_path / "latin.csv")


def test_labels_and_reviewers_are_normalised() -> None:
    assert normalise_label("  footwear ") == "Footwear" and normalise_label("bottom_part") == "Bottom part"
    assert (
        normalise_label("UNUSABLE") == UNUSABLE
        and normalise_label("3") is None
        and normalise_label(None) is None
    )
    assert clean_reviewer("  ann\x00 \n smith ") == "ann smith" and clean_reviewer("") == "anonymous"
    assert len(clean_reviewer("x" * 500)) == 120
    t0, t1 = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)
    common = {"batch_id": "b", "model_version": "v", "predicted_group": "Bags", "source": "ui"}
    later = Decision(image_id="i", label="Bags", reviewer="b", decided_at=t1, **common)
    first = Decision(image_id="i", label="Footwear", reviewer="a", decided_at=t0, **common)
    assert first_decisions([later, first]) == {"i": first}


def test_cli_import_prints_counts_and_reasons_and_export_writes_tasks(
    store: LakeStore, batch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zalando.cli import app

    monkeypatch.setenv("ZALANDO_LAKE_URI", store.lake.uri_root)
    # the CLI opens the catalog the fixture's Lake.local made (not one in the work folder)
    monkeypatch.setenv("ZALANDO_ICEBERG_CATALOG_URI", f"sqlite:///{store.lake.root}/{CATALOG_FILE}")
    monkeypatch.setenv("ZALANDO_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("ZALANDO_UI_BASE_URL", BASE)
    monkeypatch.delenv("ZALANDO_UI_TOKEN", raising=False)
    runner = CliRunner()
    out = tmp_path / "tasks.json"
    res = runner.invoke(app, ["labels", "export", batch, "--out", str(out)])
    assert res.exit_code == 0, res.output
    tasks = json.loads(out.read_text())
    assert len(tasks) == store.batch(batch).needs_review == 12
    assert tasks[0]["data"]["image"].startswith(f"{BASE}/images/{batch}/")

    ids = [t["data"]["image_id"] for t in tasks]
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text(f"image_id,batch_id,label\n{ids[0]},{batch},Bags\n{ids[1]},{batch},Hats\n")
    res = runner.invoke(app, ["labels", "import", str(csv_file)])
    assert res.exit_code == 0, res.output
    assert "2 decisions read (csv): 1 recorded, 0 already recorded, 1 rejected" in res.output
    assert "rejected line 3: unknown label 'Hats'" in res.output
    assert [d.reviewer for d in store.read_feedback(batch)] == ["import:labels.csv"]

    res = runner.invoke(app, ["labels", "import", str(tmp_path / "nope.csv")])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(app, ["labels", "config"])
    assert res.exit_code == 0 and res.output == LABEL_STUDIO_CONFIG
