"""Every plain object's key in zalando/lake/keys.py, every table's name in zalando/lake/tables.py:
the key functions, their checks, and a guard that no other module spells a lake key itself."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from zalando.errors import LakeError
from zalando.lake import keys
from zalando.lake.tables import TABLES

REPO = Path(__file__).resolve().parents[2]
LAKE_KEY = re.compile(
    r"^(raw|quarantine|datasets|metrics|monitoring|models|registry|reports|predictions|scoring|feedback|kpis)/"
)


def test_object_keys() -> None:
    assert (
        keys.bundle_key("fashion_cnn", "20260101T020000Z-ab12") == "models/fashion_cnn/20260101T020000Z-ab12"
    )
    assert keys.model_record_key("v1") == "registry/models/v1.json"
    assert keys.reference_key("v1") == "registry/references/model_version=v1"
    assert keys.report_key("r1") == "reports/run_id=r1"
    assert keys.eda_key("r1") == "reports/run_id=r1/eda"
    assert keys.eval_key("r1", "cnn") == "reports/run_id=r1/eval/experiment=cnn"
    for bad in ("a/b", "..", "", "x=y", " x"):
        with pytest.raises(LakeError, match="must be 1-128 characters"):
            keys.report_key(bad)
    assert keys.shard_marker_key("2026-01-02", "v1", "b1", 3) == (
        "scoring/batch_date=2026-01-02/model_version=v1/batch_id=b1/_shards/shard-00003.json"
    )
    assert keys.embeddings_key("2026-01-02", "v1", "b1", "w", 0).endswith(
        "/embeddings/run_id=w/part-00000.parquet"
    )
    # the legacy prefixes name tables that exist
    for names in keys.LEGACY:
        assert any(t == names or (names.endswith("*") and t.startswith(names[:-1])) for t in TABLES), names


def _string_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, text) of every string constant and f-string head that is not a docstring."""
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                docstrings.add(id(body[0].value))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            out.append((node.lineno, str(node.values[0].value)))
            for v in node.values:
                docstrings.add(id(v))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            out.append((node.lineno, node.value))
    return out


def test_no_module_outside_the_lake_spells_a_lake_key() -> None:
    found = []
    for path in sorted((REPO / "zalando").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("zalando/lake/"):
            continue
        for line, text in _string_literals(ast.parse(path.read_text())):
            if LAKE_KEY.match(text) and "<" not in text:  # '<experiment>' placeholders are messages
                found.append(f"{rel}:{line}: {text!r}")
    assert found == [], "lake keys belong in zalando/lake/keys.py:\n" + "\n".join(found)
