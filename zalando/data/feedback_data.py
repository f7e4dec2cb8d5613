"""Feedback labels as training data: a dataset version plus every accepted feedback label is a new
dataset version (issue 15, "retraining learns").

* **Which labels.** Per image of a batch the decision that counts (:func:`zalando.feedback.first_decisions`:
  the earliest; later conflicting ones lose), without ``unusable`` ones (no group to learn).
* **The version id** hashes the base dataset version, every accepted row (batch, image, label) and
  the weight and hold-out share: new feedback is new data, so the train task's cache (keyed on the
  dataset version) misses because the data changed, not because the run was forced.
* **Targets.** Reviewers give a group; the models learn the 10 Fashion-MNIST labels and sum them per
  group. A feedback image has no fine label, so a labels-target model learns it through the
  group-level loss only (:class:`zalando.train.SampleWeights` masks its label term), and a
  groups-target model learns it as any image. Mapping a group to a representative label (every
  Footwear item a Sneaker) would teach wrong fine labels and pull the fine classes apart.
* **Weights.** A feedback image weighs ``weight`` (the ``feedback_weight`` setting, default 2) in the
  loss, a split image 1: the reviewed items are few and are the ones the model got wrong or doubted.
* **Hold-out.** A share (``feedback_holdout``, default 20%) is held out as ``feedback_val``, chosen by a
  hash of (batch id, image id): an item stays on its side as feedback grows. It is never trained on,
  and the feedback gate (:mod:`zalando.gates`) compares challenger and champion on it. Feedback
  images never enter the validation or test split, so early stopping, calibration, the metric tables
  and the canary set are measured as before.

Nothing here touches storage: the step (:mod:`zalando.steps.feedback`) reads the decisions and
pixels through a store and commits the feedback rows of a new version.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from zalando.errors import DataError
from zalando.feedback import UNUSABLE, Decision, first_decisions
from zalando.labels import GROUP_NAMES, group_index

log = logging.getLogger(__name__)

FEEDBACK_VERSION_PREFIX = "dsf-"
TRAIN_SUBSET, HOLDOUT_SUBSET = "train", "feedback_val"

FEEDBACK_ROWS_SCHEMA = pa.schema(
    [
        ("batch_id", pa.string()),
        ("image_id", pa.string()),
        ("model_version", pa.string()),  # the model whose prediction the reviewer judged
        ("group_name", pa.string()),  # the reviewer's label
        ("group", pa.int8()),
        ("image", pa.binary(784)),
        ("subset", pa.string()),  # train | feedback_val
        ("weight", pa.float32()),  # the loss weight (train rows)
    ]
)


class FeedbackDataConfig(BaseModel):
    """How a retrain uses feedback images: their loss weight and the share held out to validate on."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    weight: float = Field(default=2.0, gt=0.0, le=100.0)
    holdout: float = Field(default=0.2, ge=0.0, lt=1.0)


class FeedbackDataStore(Protocol):
    """What :func:`collect_feedback_items` reads (``zalando.ui.store.LakeStore`` implements it)."""

    def batch_pixels(
        self, batch_id: str, image_ids: Sequence[str], model_version: str | None = None
    ) -> dict[str, np.ndarray]:
        """The 28x28 uint8 images of scored rows of one batch (the ones its inputs still give)."""
        ...


@dataclass(frozen=True)
class FeedbackItems:
    """Accepted feedback images, one row each, in (batch id, image id) order."""

    batch_ids: list[str]
    image_ids: list[str]
    model_versions: list[str]
    groups: np.ndarray  # int64 (N,): the reviewers' groups
    images: np.ndarray  # uint8 (N, 28, 28)

    def __len__(self) -> int:
        return len(self.image_ids)

    def keys(self) -> list[tuple[str, str, str]]:
        """(batch id, image id, group name) per row: what the version id hashes."""
        return [
            (b, i, GROUP_NAMES[int(g)])
            for b, i, g in zip(self.batch_ids, self.image_ids, self.groups, strict=True)
        ]

    def to_table(self, config: FeedbackDataConfig) -> pa.Table:
        """The rows as :data:`FEEDBACK_ROWS_SCHEMA` (subset and weight as ``config`` gives them)."""
        hold = holdout_mask(self.batch_ids, self.image_ids, config.holdout)
        return pa.table(
            {
                "batch_id": pa.array(self.batch_ids, pa.string()),
                "image_id": pa.array(self.image_ids, pa.string()),
                "model_version": pa.array(self.model_versions, pa.string()),
                "group_name": pa.array([GROUP_NAMES[int(g)] for g in self.groups], pa.string()),
                "group": pa.array(self.groups.astype(np.int8), pa.int8()),
                "image": pa.array([x.tobytes() for x in self.images], pa.binary(784)),
                "subset": pa.array(np.where(hold, HOLDOUT_SUBSET, TRAIN_SUBSET).tolist(), pa.string()),
                "weight": pa.array(np.where(hold, 0.0, config.weight).astype(np.float32), pa.float32()),
            },
            schema=FEEDBACK_ROWS_SCHEMA,
        )

    @classmethod
    def from_table(cls, table: pa.Table) -> FeedbackItems:
        missing = set(FEEDBACK_ROWS_SCHEMA.names) - set(table.column_names)
        if missing:
            raise DataError(f"feedback rows: columns {sorted(missing)} missing")
        raw = b"".join(table.column("image").to_pylist())
        return cls(
            batch_ids=table.column("batch_id").to_pylist(),
            image_ids=table.column("image_id").to_pylist(),
            model_versions=table.column("model_version").to_pylist(),
            groups=np.asarray(table.column("group").to_pylist(), dtype=np.int64),
            images=np.frombuffer(raw, np.uint8).reshape(table.num_rows, 28, 28).copy(),
        )


# ---------------------------------------------------------------------------------------------- choose


def accepted_decisions(decisions: Sequence[Decision]) -> list[Decision]:
    """The decisions a retrain learns from: per (batch, image) the one that counts, ``unusable``
    ones left out; in (batch id, image id) order."""
    by_batch: dict[str, list[Decision]] = defaultdict(list)
    for d in decisions:
        by_batch[d.batch_id].append(d)
    out = []
    for batch_id in sorted(by_batch):
        firsts = first_decisions(by_batch[batch_id])
        out.extend(firsts[i] for i in sorted(firsts) if firsts[i].label != UNUSABLE)
    return out


def decision_keys(decisions: Sequence[Decision]) -> list[tuple[str, str, str]]:
    """(batch id, image id, group name) per accepted decision: what the version id hashes."""
    return [(d.batch_id, d.image_id, GROUP_NAMES[group_index(d.label)]) for d in decisions]


def holdout_mask(batch_ids: Sequence[str], image_ids: Sequence[str], share: float) -> np.ndarray:
    """True for the items held out as ``feedback_val``: the hash of (batch id, image id) below ``share``.

    The same item is on the same side whatever else was labelled, so it never moves between training
    and validation as feedback grows.
    """
    out = np.zeros(len(image_ids), dtype=bool)
    for n, (b, i) in enumerate(zip(batch_ids, image_ids, strict=True)):
        h = hashlib.sha256(f"{b}/{i}".encode()).digest()
        out[n] = int.from_bytes(h[:8], "big") / 2.0**64 < share
    return out


def feedback_version_id(
    base_version: str, keys: Sequence[tuple[str, str, str]], config: FeedbackDataConfig
) -> str:
    """The id of ``base_version`` plus these feedback rows, weighted and held out as ``config`` says."""
    blob = json.dumps(
        [base_version, config.weight, config.holdout, sorted(list(k) for k in keys)], separators=(",", ":")
    )
    return FEEDBACK_VERSION_PREFIX + hashlib.sha256(blob.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------- collect


def collect_feedback_items(
    store: FeedbackDataStore, decisions: Sequence[Decision]
) -> tuple[FeedbackItems, list[tuple[str, str]]]:
    """The pixels of accepted decisions, read once per batch; and the (batch, image) whose inputs no
    longer give them (gone or changed since scoring), which are left out with a warning."""
    by_batch: dict[tuple[str, str], list[Decision]] = defaultdict(list)
    for d in decisions:
        by_batch[(d.batch_id, d.model_version)].append(d)
    rows: dict[tuple[str, str], tuple[Decision, np.ndarray]] = {}
    for (batch_id, version), ds in sorted(by_batch.items()):
        pixels = store.batch_pixels(batch_id, [d.image_id for d in ds], version)
        for d in ds:
            if d.image_id in pixels and (batch_id, d.image_id) not in rows:
                rows[(batch_id, d.image_id)] = (d, pixels[d.image_id])
    missing = sorted({(d.batch_id, d.image_id) for d in decisions} - rows.keys())
    if missing:
        log.warning(
            "%d feedback image(s) left out: their batch inputs no longer give them (first: %s/%s)",
            len(missing), *missing[0],
        )  # fmt: skip
    picked = [rows[k] for k in sorted(rows)]
    items = FeedbackItems(
        batch_ids=[d.batch_id for d, _ in picked],
        image_ids=[d.image_id for d, _ in picked],
        model_versions=[d.model_version for d, _ in picked],
        groups=np.asarray([group_index(d.label) for d, _ in picked], dtype=np.int64),
        images=np.stack([x for _, x in picked]).astype(np.uint8)
        if picked
        else np.zeros((0, 28, 28), np.uint8),
    )
    return items, missing


# ---------------------------------------------------------------------------------------------- extend


def extend_dataset_arrays(
    base: Mapping[str, Any], items: FeedbackItems, config: FeedbackDataConfig
) -> tuple[dict[str, Any], str]:
    """The arrays of a base dataset version (``zalando.data.split.load_dataset_arrays``) plus the
    feedback items, and the new version's id; the base unchanged, with its own id, when there are none.

    Added keys: ``x_feedback``, ``g_feedback`` (groups), ``w_feedback`` (weights), ``ids_feedback``
    (``batch/image``) for training; ``x_feedback_val``, ``g_feedback_val``, ``ids_feedback_val`` held
    out; ``base_dataset_version``. The split's own arrays (train, val, test) are left as they are.
    """
    base_version = str(base["dataset_version"])
    if len(items) == 0:
        return dict(base), base_version
    version = feedback_version_id(base_version, items.keys(), config)
    hold = holdout_mask(items.batch_ids, items.image_ids, config.holdout)
    ids = np.asarray(
        [f"{b}/{i}" for b, i in zip(items.batch_ids, items.image_ids, strict=True)], dtype=object
    )
    out = dict(base)
    out.update(
        dataset_version=version,
        base_dataset_version=base_version,
        x_feedback=np.ascontiguousarray(items.images[~hold]),
        g_feedback=items.groups[~hold],
        w_feedback=np.full(int((~hold).sum()), config.weight, dtype=np.float32),
        ids_feedback=ids[~hold],
        x_feedback_val=np.ascontiguousarray(items.images[hold]),
        g_feedback_val=items.groups[hold],
        ids_feedback_val=ids[hold],
    )
    log.info(
        "dataset version %s = %s + %d feedback images (%d to train on, weight %g; %d held out)",
        version, base_version, len(items), int((~hold).sum()), config.weight, int(hold.sum()),
    )  # fmt: skip
    return out, version


def feedback_holdout_metrics(
    predict: Callable[[np.ndarray], tuple[np.ndarray, Any]], data: Mapping[str, Any]
) -> dict[str, float | int | None]:
    """Group accuracy on the held-out feedback items (the feedback gate's number), and how many there
    are; ``feedback_accuracy`` is None when the dataset version has none. ``predict`` returns group
    probabilities first (a ``zalando.models.predictor`` predictor's ``predict``)."""
    x = data.get("x_feedback_val")
    if x is None or len(x) == 0:
        return {"feedback_accuracy": None, "feedback_items": 0}
    probs, _ = predict(np.asarray(x))
    truth = np.asarray(data["g_feedback_val"], dtype=np.int64)
    return {
        "feedback_accuracy": float((np.asarray(probs).argmax(axis=1) == truth).mean()),
        "feedback_items": len(truth),
    }
