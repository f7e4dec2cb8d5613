"""Which reduced-precision runtimes a model may score with: admitted on validation, once, at build time.

Issue 16: int8 (``onnx-int8``) and bf16 (``torch-bf16``) may score only if the model's grouped
accuracy on the validation split, run that way, is within :data:`MAX_ACCURACY_DROP` (0.05 points)
of fp32's (``torch``, the reference). When a bundle is built (:func:`zalando.models.bundle.save_bundle`
given :class:`RuntimeCheckData`) every runtime available on that machine scores the validation split
and the verdicts go into the model card under :data:`CARD_KEY`; the champion loader reads them and
offers ``auto`` only admitted runtimes. A bundle without the entry (built before, or without data)
keeps the old behaviour: bf16 by its warm-up check, int8 never.

int8 results depend on the CPU's int8 kernels: ONNX Runtime's x86 kernels without VNNI (AVX2, or
AVX512 without VNNI) add pairs of uint8 x int8 products in saturating 16-bit sums, which VNNI (and
AMX) do not. The same int8 graph scored 0.9856 there against 0.9881 in fp32 (-0.25 points) on a
2-core AMD EPYC with AVX2 only (2026-12-02). So the verdict records the kernels it was measured on
(:func:`int8_kernels`), and an int8 verdict admits int8 only on a CPU with the same kernels.

Torch-free: the loader of a torch-free ONNX worker reads the verdicts too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

from zalando.errors import DataError, ModelError
from zalando.labels import group_of
from zalando.quantize import calibration_images, int8_kernels
from zalando.runtime import REDUCED_PRECISION, Predictor

log = logging.getLogger(__name__)

MAX_ACCURACY_DROP = 0.0005  # grouped accuracy, as a fraction: 0.05 points
REFERENCE_RUNTIME = "torch"  # fp32 torch: the weights as trained
CARD_KEY = "runtime_admission"


@dataclass(frozen=True)
class RuntimeCheckData:
    """What building a bundle needs to make and admit its reduced-precision runtimes.

    ``x_calibration``: training images the int8 activation ranges are calibrated on (never the
    validation images that then judge the result); ``x_val`` / ``y_val``: the validation split
    (uint8 images, label ids 0-9).
    """

    x_calibration: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray

    @classmethod
    def from_training(cls, data: Mapping[str, Any], seed: int = 0) -> RuntimeCheckData:
        """From training arrays (x_train, x_val, y_val): a seeded calibration subset of x_train."""
        for key in ("x_train", "x_val", "y_val"):
            if key not in data:
                raise DataError(f"runtime checks need {key!r} in the training data")
        return cls(
            calibration_images(data["x_train"], seed=seed),
            np.asarray(data["x_val"]),
            np.asarray(data["y_val"]),
        )


class RuntimeVerdict(BaseModel):
    """One runtime on the validation split."""

    val_group_acc: float
    diff_points: float  # (acc - reference acc) x 100: negative is worse than fp32
    admitted: bool


class RuntimeAdmission(BaseModel):
    """The card's entry: the reference, the rule and each runtime's verdict."""

    reference: str
    max_drop_points: float
    val_images: int
    runtimes: dict[str, RuntimeVerdict]
    # the int8 kernels the onnx-int8 verdict was measured with (None: not recorded, cards before it)
    int8_kernels: str | None = None

    def admits(self, runtime: str) -> bool:
        """Whether the verdict admits ``runtime`` (on the machine it was measured on)."""
        verdict = self.runtimes.get(runtime)
        return verdict is not None and verdict.admitted

    def admits_here(self, runtime: str, kernels: str | None = None) -> bool:
        """Whether ``runtime`` may score on this CPU (``kernels``: default :func:`int8_kernels`)."""
        if not self.admits(runtime):
            return False
        return (
            runtime != "onnx-int8"
            or self.int8_kernels is None
            or self.int8_kernels == (kernels or int8_kernels())
        )

    def refusal(self, runtime: str, kernels: str | None = None) -> str:
        """One line: why ``runtime`` may not score this model on this CPU."""
        verdict, ref = self.runtimes.get(runtime), self.runtimes.get(self.reference)
        if runtime == "onnx-int8" and verdict is not None and verdict.admitted:  # admitted elsewhere
            return (
                f"runtime {runtime} was admitted on a CPU with {self.int8_kernels} int8 kernels; this "
                f"CPU has {kernels or int8_kernels()}, where its accuracy was not checked; score with "
                f"onnx or torch"
            )
        if verdict is None:
            return (
                f"runtime {runtime} was not checked on validation when this model was built "
                f"(not available on that machine); score with onnx or torch"
            )
        ref_acc = f"{ref.val_group_acc:.4f}" if ref else "?"
        return (
            f"runtime {runtime} is not admitted for this model: validation grouped accuracy "
            f"{verdict.val_group_acc:.4f} vs fp32 ({self.reference}) {ref_acc}, {verdict.diff_points:+.3f} "
            f"points (at most -{self.max_drop_points:g} allowed); score with onnx or torch"
        )


def admit_runtimes(
    predictors: Mapping[str, Predictor],
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    reference: str = REFERENCE_RUNTIME,
    max_drop: float | None = None,
) -> RuntimeAdmission:
    """Score the validation split with every runtime; admit reduced precision within ``max_drop``
    (default :data:`MAX_ACCURACY_DROP`) of ``reference``'s grouped accuracy.

    fp32 runtimes other than the reference are recorded too and always admitted (ONNX fp32 is
    checked against torch to 1e-4 when the bundle is built).
    """
    max_drop = MAX_ACCURACY_DROP if max_drop is None else float(max_drop)
    if reference not in predictors:
        raise ModelError(f"runtime checks need the reference runtime {reference!r}")
    if len(x_val) == 0:
        raise DataError("runtime checks need validation images, got none")
    groups = group_of(np.asarray(y_val))
    accuracy = {}
    for name, predictor in predictors.items():
        probs, _ = predictor.predict(x_val)
        accuracy[name] = float((probs.argmax(1) == groups).mean())
    ref = accuracy[reference]
    verdicts = {
        name: RuntimeVerdict(
            val_group_acc=round(acc, 6),
            diff_points=round((acc - ref) * 100, 4),
            # rounded: k/n accuracies make exactly 0.05 points a float a hair above 0.0005
            admitted=name not in REDUCED_PRECISION or round(ref - acc, 9) <= max_drop,
        )
        for name, acc in accuracy.items()
    }
    admission = RuntimeAdmission(
        reference=reference,
        max_drop_points=max_drop * 100,
        val_images=len(x_val),
        runtimes=verdicts,
        int8_kernels=int8_kernels() if "onnx-int8" in predictors else None,
    )
    log.info(
        "runtimes on %d validation images: %s",
        len(x_val),
        ", ".join(
            f"{n} {v.val_group_acc:.4f} ({v.diff_points:+.3f} pts{'' if v.admitted else ', not admitted'})"
            for n, v in verdicts.items()
        ),
    )
    return admission


def admission_of(card: Mapping[str, Any], where: str = "model card") -> RuntimeAdmission | None:
    """The card's runtime verdicts; None for a bundle built without them (ModelError when malformed)."""
    entry = card.get(CARD_KEY)
    if entry is None:
        return None
    try:
        return RuntimeAdmission.model_validate(entry)
    except ValidationError as e:
        raise ModelError(f"{where}: {CARD_KEY} is malformed ({e.errors()[0]['msg']})") from None
