"""Preprocess: a seeded, stratified train/validation split and normalisation statistics.

Stored as a dataset version in the lake so that training, evaluation and scoring all use the same
split and the same numbers: the ``datasets`` table holds which training image is in 'train' or
'val' (partitioned by dataset version), the ``dataset_versions`` table one row of statistics per
version, committed last (a version exists once its row does). The version id is a function of the
raw data and the split parameters, so re-running gives the same version.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from zalando.data.arrays import images_from_table, labels_from_table
from zalando.data.ingest import ingested_digest, load_raw
from zalando.errors import NotCommittedError
from zalando.lake import Lake

log = logging.getLogger(__name__)

SPLITS_TABLE = "datasets"
VERSIONS_TABLE = "dataset_versions"


class DatasetVersion(BaseModel):
    """A split and its normalisation statistics (small, serialisable: what the preprocess step returns)."""

    model_config = ConfigDict(frozen=True)

    dataset_version: str
    mean: float
    std: float
    n_train: int
    n_val: int
    n_test: int
    seed: int
    val_fraction: float
    source_digest: str


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows: val_fraction of every class (rounded), seeded."""
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_val = int(round(len(idx) * val_fraction))
        is_val[rng.permutation(idx)[:n_val]] = True
    return is_val


def pixel_stats(images: np.ndarray) -> tuple[float, float]:
    """Mean and std of pixels/255 (float64 accumulation, chunked to bound memory)."""
    total, total_sq, n = 0.0, 0.0, 0
    for i in range(0, len(images), 8192):
        chunk = images[i : i + 8192].astype(np.float64) / 255.0
        total += chunk.sum()
        total_sq += np.square(chunk).sum()
        n += chunk.size
    mean = total / n
    return float(mean), float(np.sqrt(max(total_sq / n - mean**2, 0.0)))


def dataset_version_id(source_digest: str, seed: int, val_fraction: float) -> str:
    h = hashlib.sha256(f"{source_digest}|{seed}|{val_fraction}".encode()).hexdigest()[:12]
    return f"ds-{h}"


def preprocess(lake: Lake, *, seed: int, val_fraction: float = 0.2, force: bool = False) -> DatasetVersion:
    """Split the committed raw training table and store the dataset version."""
    from zalando.lake.commit import replace_partition

    digest = ingested_digest(lake)
    if digest is None:
        raise NotCommittedError(f"no training images in {lake.uri()}: run `zalando ingest` first")
    version = dataset_version_id(digest, seed, val_fraction)
    if not force and (existing := _version_rows(lake, version)):
        log.info("dataset version %s already exists; reusing", version)
        return existing[0]
    train = load_raw(lake, "train", columns=["image_id", "image", "label"])
    labels = labels_from_table(train)
    is_val = stratified_split(labels, val_fraction, seed)
    mean, std = pixel_stats(images_from_table(train)[~is_val])
    n_test = load_raw(lake, "test", columns=["image_id"]).num_rows
    dv = DatasetVersion(
        dataset_version=version,
        mean=mean,
        std=std,
        n_train=int((~is_val).sum()),
        n_val=int(is_val.sum()),
        n_test=int(n_test),
        seed=seed,
        val_fraction=val_fraction,
        source_digest=digest,
    )
    split_table = pa.table(
        {
            "dataset_version": pa.array([version] * train.num_rows, pa.string()),
            "image_id": train.column("image_id"),
            "subset": pa.array(np.where(is_val, "val", "train"), pa.string()),
        }
    )
    cat, flt = lake.catalog(), {"dataset_version": version}
    replace_partition(cat, SPLITS_TABLE, split_table, flt)
    stats = {**dv.model_dump(), "created_at": datetime.now(UTC)}
    replace_partition(cat, VERSIONS_TABLE, pa.Table.from_pylist([stats]), flt)  # the version exists now
    log.info(
        "dataset version %s: %d train / %d val, mean %.4f std %.4f", version, dv.n_train, dv.n_val, mean, std
    )
    return dv


def _version_rows(lake: Lake, version: str | None = None) -> list[DatasetVersion]:
    """The committed dataset versions (one, or all), newest first."""
    from zalando.lake.commit import scan

    rows = scan(lake.catalog(), VERSIONS_TABLE, {"dataset_version": version} if version else None)
    rows = rows.sort_by([("created_at", "descending")])
    fields = set(DatasetVersion.model_fields)
    return [DatasetVersion(**{k: v for k, v in r.items() if k in fields}) for r in rows.to_pylist()]


def read_dataset_version(lake: Lake, version: str) -> DatasetVersion:
    found = _version_rows(lake, version)
    if not found:
        raise NotCommittedError(
            f"dataset version {version!r} does not exist in table "
            f"{lake.catalog().identifier(VERSIONS_TABLE)} of {lake.uri()}; run preprocess"
        )
    return found[0]


def latest_dataset_version(lake: Lake) -> DatasetVersion:
    """The newest dataset version made from the currently ingested raw data (else the newest one)."""
    versions = _version_rows(lake)
    if not versions:
        raise NotCommittedError("no dataset version in the lake; run `zalando ingest` (it also preprocesses)")
    digest = ingested_digest(lake)
    return next((v for v in versions if v.source_digest == digest), versions[0])


def load_dataset_arrays(lake: Lake, version: str | DatasetVersion) -> dict[str, Any]:
    """x_train, y_train, x_val, y_val, x_test, y_test (uint8 images, int64 labels) and the ids."""
    from zalando.lake.commit import scan

    dv = version if isinstance(version, DatasetVersion) else read_dataset_version(lake, version)
    split = scan(
        lake.catalog(), SPLITS_TABLE, {"dataset_version": dv.dataset_version}, columns=["image_id", "subset"]
    ).sort_by("image_id")
    train = load_raw(lake, "train", columns=["image_id", "image", "label"])
    if (
        train.num_rows != split.num_rows
        or not pc.all(pc.equal(train.column("image_id"), split.column("image_id"))).as_py()
    ):
        raise NotCommittedError(
            f"dataset version {dv.dataset_version} does not match the raw training table; re-run preprocess"
        )
    is_val = split.column("subset").to_numpy(zero_copy_only=False) == "val"
    x, y = images_from_table(train), labels_from_table(train)
    ids = np.asarray(train.column("image_id").to_pylist(), dtype=object)
    test = load_raw(lake, "test", columns=["image_id", "image", "label"])
    return {
        "dataset_version": dv.dataset_version,
        "mean": dv.mean,
        "std": dv.std,
        "x_train": x[~is_val],
        "y_train": y[~is_val],
        "ids_train": ids[~is_val],
        "x_val": x[is_val],
        "y_val": y[is_val],
        "ids_val": ids[is_val],
        "x_test": images_from_table(test),
        "y_test": labels_from_table(test),
        "ids_test": np.asarray(test.column("image_id").to_pylist(), dtype=object),
    }
