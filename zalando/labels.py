"""The 10 Fashion-MNIST labels, the 5 article groups, and the mapping between them."""

from __future__ import annotations

import numpy as np

from zalando.errors import ConfigError, DataError

LABEL_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
GROUP_NAMES: tuple[str, ...] = ("Upper part", "Bottom part", "One piece", "Footwear", "Bags")
NUM_LABELS = len(LABEL_NAMES)
NUM_GROUPS = len(GROUP_NAMES)

# label id -> group id
LABEL_TO_GROUP: np.ndarray = np.array([0, 1, 0, 2, 0, 3, 0, 3, 4, 3], dtype=np.int64)
LABEL_TO_GROUP.setflags(write=False)

# group id -> label ids it contains
GROUP_LABELS: tuple[tuple[int, ...], ...] = tuple(
    tuple(int(i) for i in np.flatnonzero(LABEL_TO_GROUP == g)) for g in range(NUM_GROUPS)
)

# a column-friendly short name per group (for Parquet columns such as prob_upper_part)
GROUP_KEYS: tuple[str, ...] = tuple(n.lower().replace(" ", "_") for n in GROUP_NAMES)


def group_of(labels: np.ndarray) -> np.ndarray:
    """Map an array of label ids (0-9) to group ids (0-4)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_LABELS):
        raise ValueError(f"label ids must be in 0..{NUM_LABELS - 1}, got {labels.min()}..{labels.max()}")
    return LABEL_TO_GROUP[labels]


def group_index(name: str | int) -> int:
    """Group id (0-4) of a group name ('One piece'), key ('one_piece') or id."""
    if isinstance(name, int | np.integer) and not isinstance(name, bool):
        if 0 <= int(name) < NUM_GROUPS:
            return int(name)
    elif isinstance(name, str):
        for i, (n, k) in enumerate(zip(GROUP_NAMES, GROUP_KEYS, strict=True)):
            if name in (n, k) or name.strip().lower() in (n.lower(), k):
                return i
    raise ConfigError(
        f"group {name!r}: unknown; use one of {', '.join(GROUP_NAMES)} (or {', '.join(GROUP_KEYS)})"
    )


def check_group_probs(probs: np.ndarray, n: int, who: str) -> np.ndarray:
    """``probs`` as float64 (n, NUM_GROUPS) group probabilities; DataError naming ``who`` otherwise."""
    p = np.asarray(probs, dtype=np.float64)
    if p.shape != (n, NUM_GROUPS):
        raise DataError(f"{who}: expected shape ({n}, {NUM_GROUPS}), got {p.shape}")
    if not np.isfinite(p).all():
        raise DataError(f"{who}: contains NaN or infinite values")
    return p


def label_probs_to_group_probs(label_probs: np.ndarray) -> np.ndarray:
    """Sum (N, 10) label probabilities into (N, 5) group probabilities."""
    out = np.zeros((label_probs.shape[0], NUM_GROUPS), dtype=label_probs.dtype)
    np.add.at(out.T, LABEL_TO_GROUP, label_probs.T)
    return out
