"""Ingest: source files -> verified, parsed, validated -> raw tables and quarantine in the lake.

Everything is checked before anything is written, so a bad input commits nothing. The run id
is derived from the input bytes, so re-ingesting the same source replaces the same partitions.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from zalando.data.arrays import images_to_arrow, raw_table
from zalando.data.idx import read_split
from zalando.data.sources import FILES, SourceFiles
from zalando.data.validate import REASONS, check_images
from zalando.labels import GROUP_NAMES, LABEL_TO_GROUP
from zalando.lake import Lake

log = logging.getLogger(__name__)

RAW_PREFIX = "raw/fashion-mnist"
PART_ROWS = 10_000
SPLITS = ("train", "test")

QUARANTINE_SCHEMA = pa.schema(
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


def raw_key(split: str) -> str:
    return f"{RAW_PREFIX}/split={split}"


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


def is_ingested(lake: Lake, digest: str) -> bool:
    """True when the raw tables of exactly this source are committed."""
    for split in SPLITS:
        if not lake.is_committed(raw_key(split)):
            return False
        if lake.read_manifest(raw_key(split))["extra"].get("source_digest") != digest:
            return False
    return True


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
                pa.table(
                    {
                        "image_id": pa.array(ids[bad].tolist(), pa.string()),
                        "source": pa.array([src.source] * len(bad), pa.string()),
                        "split": pa.array([split] * len(bad), pa.string()),
                        "label": pa.array(labels[bad].astype(np.int8)),
                        "reason": pa.array([codes[r] for r in reason[bad]], pa.string()),
                        "detail": pa.array(detail, pa.string()),
                        "image": images_to_arrow(images[bad]).cast(pa.binary()),
                    },
                    schema=QUARANTINE_SCHEMA,
                )
            )
    extra = {"source": src.source, "source_digest": digest, "checksums": src.checksums}
    # write: quarantine first, then the raw splits (each partition commits its own manifest last)
    q = pa.concat_tables(quarantined) if quarantined else QUARANTINE_SCHEMA.empty_table()
    lake.commit_partition(f"quarantine/run_id={run_id}", {"quarantine": q}, run_id, extra)
    for split, table in accepted.items():
        parts = {
            f"part-{i // PART_ROWS:05d}": table.slice(i, PART_ROWS)
            for i in range(0, max(table.num_rows, 1), PART_ROWS)
        }
        lake.commit_partition(raw_key(split), parts, run_id, {**extra, "split": split})
    log.info("ingested %s in %.1fs", src.source, time.perf_counter() - t0)
    return summarize(lake, run_id, skipped=False, seconds=time.perf_counter() - t0)


def summarize(lake: Lake, run_id: str, *, skipped: bool, seconds: float | None = None) -> dict[str, Any]:
    """Counts per split and group, and quarantine counts by reason, read back from the lake."""
    summary: dict[str, Any] = {"run_id": run_id, "skipped": skipped, "splits": {}, "quarantine": {}}
    for split in SPLITS:
        groups = lake.read_partition(raw_key(split), columns=["group"]).column("group").to_numpy()
        counts = np.bincount(groups.astype(np.int64), minlength=len(GROUP_NAMES))
        summary["splits"][split] = {
            "rows": int(len(groups)),
            "groups": dict(zip(GROUP_NAMES, counts.tolist(), strict=True)),
        }
    qkey = f"quarantine/run_id={run_id}"
    if lake.is_committed(qkey):
        reasons = lake.read_partition(qkey, columns=["reason"]).column("reason").to_pylist()
        summary["quarantine"] = {r: reasons.count(r) for r in sorted(set(reasons))}
    summary["source_digest"] = lake.read_manifest(raw_key("train"))["extra"].get("source_digest")
    if seconds is not None:
        summary["seconds"] = round(seconds, 2)
    return summary


def load_raw(lake: Lake, split: str, columns: list[str] | None = None) -> pa.Table:
    return lake.read_partition(raw_key(split), columns=columns)


def group_counts(labels: np.ndarray) -> dict[str, int]:
    counts = np.bincount(LABEL_TO_GROUP[labels], minlength=len(GROUP_NAMES))
    return dict(zip(GROUP_NAMES, counts.tolist(), strict=True))
