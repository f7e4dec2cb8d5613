"""Ingest: source files -> verified, parsed, validated -> the raw_images and quarantine tables.

Everything is checked before anything is written, so a bad input commits nothing. The run id
is derived from the input bytes, so re-ingesting the same source replaces the same rows: the
quarantine rows of the run (one commit), then both raw splits (one commit replacing the
``split`` partitions: readers see the old splits or the new ones, never a mix).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from zalando.data.arrays import RAW_SCHEMA, images_to_arrow, raw_table
from zalando.data.idx import read_split
from zalando.data.sources import FILES, SourceFiles
from zalando.data.validate import REASONS, check_images
from zalando.errors import NotCommittedError
from zalando.labels import GROUP_NAMES, LABEL_TO_GROUP
from zalando.lake import Lake

log = logging.getLogger(__name__)

RAW_TABLE = "raw_images"
QUARANTINE_TABLE = "quarantine"
SPLITS = ("train", "test")


def ingest_run_id(digest: str) -> str:
    return f"ingest-{digest}"


def parse_source(src: SourceFiles) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Both splits as (images uint8 (N,28,28), labels int64); strict, raises DataError."""
    out = {}
    for split in SPLITS:
        img_name, lab_name = FILES[f"{split}_images"], FILES[f"{split}_labels"]
        images, labels = read_split(img_name, src.files[img_name], lab_name, src.files[lab_name])
        out[split] = (images, labels.astype(np.int64))
    return out


def ingested_digest(lake: Lake, split: str = "train") -> str | None:
    """The digest of the source whose rows the raw split holds (None: nothing ingested)."""
    from zalando.lake.commit import scan

    rows = scan(lake.catalog(), RAW_TABLE, {"split": split}, columns=["source_digest"], limit=1)
    return rows.column("source_digest")[0].as_py() if rows.num_rows else None


def is_ingested(lake: Lake, digest: str) -> bool:
    """True when the raw splits of exactly this source are committed."""
    return all(ingested_digest(lake, split) == digest for split in SPLITS)


def ingest(lake: Lake, src: SourceFiles, *, force: bool = False) -> dict[str, Any]:
    """Validate and write the raw tables and the quarantine. Returns a small summary dict."""
    t0 = time.perf_counter()
    digest = src.digest
    run_id = ingest_run_id(digest)
    if not force and is_ingested(lake, digest):
        log.info("source %s (digest %s) already ingested; skipping", src.source, digest)
        return summarize(lake, run_id, skipped=True)

    splits = parse_source(src)
    codes = list(REASONS)
    accepted: dict[str, pa.Table] = {}
    quarantined: list[pa.Table] = []
    train_images = splits["train"][0]
    for split in SPLITS:
        images, labels = splits[split]
        ids = np.char.add(f"{split}-", np.char.zfill(np.arange(len(images)).astype(str), 5))
        reason, other = check_images(images, reference=train_images if split != "train" else None)
        good = reason < 0
        accepted[split] = raw_table(ids[good], images[good], labels[good])
        bad = np.flatnonzero(~good)
        if len(bad):
            ref_split = np.where(
                np.asarray([codes[r] for r in reason[bad]]) == "duplicate_across_splits", "train", split
            )
            detail = [
                REASONS[codes[r]] + (f" (same as {s}-{o:05d})" if o >= 0 else "")
                for r, o, s in zip(reason[bad], other[bad], ref_split, strict=True)
            ]
            quarantined.append(
                _quarantine_rows(
                    {
                        "run_id": pa.array([run_id] * len(bad), pa.string()),
                        "image_id": pa.array(ids[bad].tolist(), pa.string()),
                        "source": pa.array([src.source] * len(bad), pa.string()),
                        "split": pa.array([split] * len(bad), pa.string()),
                        "label": pa.array(labels[bad].astype(np.int8)),
                        "row": pa.array(bad.astype(np.int64)),
                        "reason": pa.array([codes[r] for r in reason[bad]], pa.string()),
                        "detail": pa.array(detail, pa.string()),
                        "image": images_to_arrow(images[bad]).cast(pa.binary()),
                    },
                    len(bad),
                )
            )
    _commit(lake, run_id, digest, accepted, quarantined)
    log.info("ingested %s in %.1fs", src.source, time.perf_counter() - t0)
    return summarize(lake, run_id, skipped=False, seconds=time.perf_counter() - t0)


def _commit(
    lake: Lake, run_id: str, digest: str, accepted: dict[str, pa.Table], quarantined: list[pa.Table]
) -> None:
    """The run's quarantine rows, then both raw splits in one commit (the commit point)."""
    from pyiceberg.expressions import In

    from zalando.lake.commit import replace_partition

    cat = lake.catalog()
    props = {"zalando.run-id": run_id, "zalando.source-digest": digest}
    q = pa.concat_tables(quarantined) if quarantined else _quarantine_rows({}, 0)
    replace_partition(cat, QUARANTINE_TABLE, q, {"run_id": run_id}, properties=props)
    raw = pa.concat_tables(
        [
            t.append_column("split", pa.array([split] * t.num_rows, pa.string())).append_column(
                "source_digest", pa.array([digest] * t.num_rows, pa.string())
            )
            for split, t in accepted.items()
        ]
    )
    replace_partition(cat, RAW_TABLE, raw, In("split", SPLITS), properties=props)


def put_raw_split(
    lake: Lake, split: str, image_ids: list[str], images: np.ndarray, labels: np.ndarray, *, digest: str
) -> None:
    """Replace one raw split with these images in one commit, as ingest would (no validation: for
    callers that hold parsed, known-good arrays, such as benchmarks and tests of the demo batch)."""
    from zalando.lake.commit import replace_partition

    t = raw_table(image_ids, images, labels)
    t = t.append_column("split", pa.array([split] * t.num_rows, pa.string())).append_column(
        "source_digest", pa.array([digest] * t.num_rows, pa.string())
    )
    replace_partition(
        lake.catalog(), RAW_TABLE, t, {"split": split}, properties={"zalando.source-digest": digest}
    )


def _quarantine_rows(columns: dict[str, pa.Array], n: int) -> pa.Table:
    """Rows of the quarantine table from ingest's columns; scoring's own columns are null."""
    from zalando.lake.tables import TABLES

    schema = TABLES[QUARANTINE_TABLE].schema
    return pa.table(
        {f.name: columns[f.name] if f.name in columns else pa.nulls(n, f.type) for f in schema}, schema=schema
    )


def summarize(lake: Lake, run_id: str, *, skipped: bool, seconds: float | None = None) -> dict[str, Any]:
    """Counts per split and group, and quarantine counts by reason, read back from the tables."""
    from zalando.lake.commit import scan

    cat = lake.catalog()
    summary: dict[str, Any] = {"run_id": run_id, "skipped": skipped, "splits": {}, "quarantine": {}}
    for split in SPLITS:
        groups = scan(cat, RAW_TABLE, {"split": split}, columns=["group"]).column("group").to_numpy()
        counts = np.bincount(groups.astype(np.int64), minlength=len(GROUP_NAMES))
        summary["splits"][split] = {
            "rows": int(len(groups)),
            "groups": dict(zip(GROUP_NAMES, counts.tolist(), strict=True)),
        }
    reasons = scan(cat, QUARANTINE_TABLE, {"run_id": run_id}, columns=["reason"]).column("reason").to_pylist()
    summary["quarantine"] = {r: reasons.count(r) for r in sorted(set(reasons))}
    summary["source_digest"] = ingested_digest(lake)
    if seconds is not None:
        summary["seconds"] = round(seconds, 2)
    return summary


def load_raw(lake: Lake, split: str, columns: list[str] | None = None) -> pa.Table:
    """The committed images of one split, in image-id order (the order they were ingested in);
    by default the columns of :data:`zalando.data.arrays.RAW_SCHEMA`."""
    from zalando.lake.commit import scan

    want = list(columns or RAW_SCHEMA.names)
    read = want if "image_id" in want else [*want, "image_id"]
    table = scan(lake.catalog(), RAW_TABLE, {"split": split}, columns=read)
    if table.num_rows == 0:
        raise NotCommittedError(
            f"no {split} images in table {lake.catalog().identifier(RAW_TABLE)} of {lake.uri()}: "
            "run `zalando ingest` first"
        )
    return table.sort_by("image_id").select(want)


def raw_split_files(lake: Lake, split: str) -> list[tuple[str, int, int]]:
    """The committed data files of one raw split as (lake key, bytes, rows), in key order: plain
    Parquet files with the raw columns (``image_id``, ``image``, ...), e.g. for scoring the test
    split as a batch. Only files of the current snapshot: never a replaced or uncommitted one."""
    from zalando.lake.commit import live_data_files

    return live_data_files(lake.catalog(), RAW_TABLE, {"split": split})


def group_counts(labels: np.ndarray) -> dict[str, int]:
    counts = np.bincount(LABEL_TO_GROUP[labels], minlength=len(GROUP_NAMES))
    return dict(zip(GROUP_NAMES, counts.tolist(), strict=True))
