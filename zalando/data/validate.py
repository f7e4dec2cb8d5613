"""Image-level checks with reason codes. Every check is vectorised over the whole split."""

from __future__ import annotations

import numpy as np

# reason code -> what it means (the quarantine table stores the code and a detail string)
REASONS = {
    "blank_image": "every pixel has the same value",
    "near_empty": "fewer than 20 non-zero pixels: no article drawn",
    "low_contrast": "brightest pixel below 64: too dark to show an article",
    "duplicate_within_split": "byte-identical to an earlier image of the same split",
    "duplicate_across_splits": "byte-identical to an image of the training split",
}
MIN_NONZERO_PIXELS = 20
MIN_MAX_PIXEL = 64


def _row_keys(images: np.ndarray) -> np.ndarray:
    """One opaque void scalar per image, so np.unique / np.isin compare whole images."""
    flat = np.ascontiguousarray(images.reshape(len(images), -1))
    return flat.view(np.dtype((np.void, flat.shape[1]))).ravel()


def check_images(images: np.ndarray, reference: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (reason_index, detail_index) per image: -1 for a good image, else an index into REASONS.

    `reference` (the training split) enables the across-splits duplicate check. The first failing
    check wins, in the order of REASONS.
    """
    n = len(images)
    codes = list(REASONS)
    reason = np.full(n, -1, dtype=np.int64)
    other = np.full(n, -1, dtype=np.int64)  # index of the image it duplicates, when relevant
    if n == 0:
        return reason, other
    flat = images.reshape(n, -1)
    mx, mn = flat.max(axis=1), flat.min(axis=1)
    nonzero = np.count_nonzero(flat, axis=1)

    def mark(mask: np.ndarray, code: str) -> None:
        reason[(reason < 0) & mask] = codes.index(code)

    mark(mx == mn, "blank_image")
    mark(nonzero < MIN_NONZERO_PIXELS, "near_empty")
    mark(mx < MIN_MAX_PIXEL, "low_contrast")

    keys = _row_keys(images)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    first_of = first[inverse]
    dup = first_of != np.arange(n)
    other[dup & (reason < 0)] = first_of[dup & (reason < 0)]
    mark(dup, "duplicate_within_split")

    if reference is not None and len(reference):
        ref_keys = _row_keys(reference)
        ref_sorted_idx = np.argsort(ref_keys, kind="stable")
        ref_sorted = ref_keys[ref_sorted_idx]
        pos = np.clip(np.searchsorted(ref_sorted, keys), 0, len(ref_sorted) - 1)
        across = ref_sorted[pos] == keys
        other[across & (reason < 0)] = ref_sorted_idx[pos][across & (reason < 0)]
        mark(across, "duplicate_across_splits")
    return reason, other
