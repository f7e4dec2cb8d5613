"""Grad-CAM heat maps for a torch image classifier: where did the model look when it chose a class?

A small hook-based implementation (Selvaraju et al., 2017): one forward hook keeps the target layer's
activations A (N, K, h, w); ``torch.autograd.grad`` gives dScore/dA without touching parameter .grad;
the map is ReLU(sum_k mean(dScore/dA_k) * A_k), upsampled to 28x28 and scaled to 0..1 per image.
The ``grad-cam`` package was not used: it requires opencv-python-headless, scikit-learn, scipy and
ttach, heavy dependencies for about 40 lines of torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from zalando.errors import DataError, ModelError

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

Preprocess = Callable[[np.ndarray], "torch.Tensor"]
ScoreFn = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


def last_conv_layer(model: nn.Module) -> nn.Module:
    """The last ``nn.Conv2d`` in ``model.modules()`` order (the usual Grad-CAM target)."""
    from torch import nn

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ModelError(f"grad-cam: model {type(model).__name__} has no nn.Conv2d layer to explain")
    return convs[-1]


def raw_pixels(images: np.ndarray) -> torch.Tensor:
    """Default preprocessing: uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) raw 0..255 (ScoringModel input)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)[:, None])


def _default_score(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return output.gather(1, target[:, None])[:, 0]


def gradcam(
    model: nn.Module,
    images: np.ndarray,
    target_class: int | Sequence[int] | np.ndarray,
    preprocess: Preprocess = raw_pixels,
    target_layer: nn.Module | None = None,
    score_fn: ScoreFn | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Grad-CAM heat maps (N, 28, 28) float32 in 0..1 for uint8 ``images`` (N, 28, 28).

    ``preprocess`` turns a uint8 batch into the model's input tensor (default: raw pixels, which is what
    ``ScoringModel`` takes). ``target_class``: one class for all images or one per image, an index into
    the model's output (the first element when the model returns a tuple, e.g. ScoringModel's group
    probabilities). ``score_fn(output, targets) -> (N,)`` overrides the explained score. The model's
    training flag is restored afterwards; parameter gradients are not touched.
    """
    import torch
    import torch.nn.functional as F

    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DataError(f"grad-cam images: expected uint8 (N, 28, 28), got {images.dtype} {images.shape}")
    n = images.shape[0]
    targets = np.broadcast_to(np.asarray(target_class, dtype=np.int64), (n,)).copy()
    layer = target_layer if target_layer is not None else last_conv_layer(model)
    score = score_fn or _default_score
    captured: list[torch.Tensor] = []

    def keep_activation(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        captured.append(output)

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    handle = layer.register_forward_hook(keep_activation)
    was_training = model.training
    model.eval()
    out = np.zeros((n, 28, 28), dtype=np.float32)
    try:
        with torch.enable_grad():
            for start in range(0, n, batch_size):
                captured.clear()
                x = preprocess(images[start : start + batch_size]).detach().to(device).requires_grad_(True)
                output = model(x)
                if isinstance(output, tuple | list):
                    output = output[0]
                if output.ndim != 2:
                    raise ModelError(f"grad-cam: expected model output (N, C), got {tuple(output.shape)}")
                t = torch.as_tensor(targets[start : start + batch_size], device=output.device)
                if int(t.min()) < 0 or int(t.max()) >= output.shape[1]:
                    raise DataError(
                        f"grad-cam target_class: must be in 0..{output.shape[1] - 1}, "
                        f"got {int(t.min())}..{int(t.max())}"
                    )
                if not captured:
                    raise ModelError("grad-cam: the target layer was not used in the forward pass")
                activation = captured[0]  # the first call: with test-time flips, the unflipped view
                (grads,) = torch.autograd.grad(score(output, t).sum(), activation)
                weights = grads.mean(dim=(2, 3), keepdim=True)
                cam = F.relu((weights * activation).sum(dim=1, keepdim=True))
                cam = F.interpolate(cam, size=(28, 28), mode="bilinear", align_corners=False)[:, 0]
                peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
                out[start : start + batch_size] = (cam / peak).detach().cpu().numpy()
    finally:
        handle.remove()
        model.train(was_training)
    return out


def gradcam_png(
    images: np.ndarray,
    heatmaps: np.ndarray,
    titles: Sequence[str] | None = None,
    ncols: int = 4,
    alpha: float = 0.5,
    suptitle: str | None = None,
) -> bytes:
    """A PNG gallery: each image in gray beside the same image with its heat map overlaid."""
    from zalando.figures import figure_png, new_figure

    images = np.asarray(images)
    heatmaps = np.asarray(heatmaps)
    if images.shape != heatmaps.shape or images.ndim != 3:
        raise DataError(
            f"gradcam_png: images {images.shape} and heatmaps {heatmaps.shape} must both be (N, H, W)"
        )
    n = images.shape[0]
    if n == 0:
        raise DataError("gradcam_png: no images to draw")
    titles = list(titles) if titles is not None else [""] * n
    if len(titles) != n:
        raise DataError(f"gradcam_png: {len(titles)} titles for {n} images")
    pairs_per_row = max(1, min(ncols, n))
    rows = -(-n // pairs_per_row)
    fig = new_figure(figsize=(2.0 * 2 * pairs_per_row, 2.3 * rows))
    axes = fig.subplots(rows, 2 * pairs_per_row, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, pairs_per_row)
        left, right = axes[r, 2 * c], axes[r, 2 * c + 1]
        left.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        left.set_title(titles[i], fontsize=7)
        right.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        right.imshow(heatmaps[i], cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0)
        right.set_title("Grad-CAM", fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return figure_png(fig)


def confused_pair_gradcams(
    model: nn.Module,
    images: np.ndarray,
    y_true_group: np.ndarray,
    group_probs: np.ndarray,
    pairs: Sequence[tuple[int, int]] = ((2, 0), (0, 2)),
    k: int = 8,
    preprocess: Preprocess = raw_pixels,
    target_layer: nn.Module | None = None,
    y_true_label: np.ndarray | None = None,
) -> dict[str, bytes]:
    """Grad-CAM galleries of the k most confident mistakes of each (true group, predicted group) pair.

    The explained class is the wrongly predicted group (what made the model choose it), so ``model``
    must output group scores: pass a ``ScoringModel`` (or any net with 5 outputs). Default pairs:
    One piece taken for Upper part and the reverse. Returns {"gradcam_<true>_as_<pred>.png": bytes};
    a pair with no such mistake is left out.
    """
    from zalando.labels import GROUP_KEYS, GROUP_NAMES, LABEL_NAMES

    y_true_group = np.asarray(y_true_group)
    group_probs = np.asarray(group_probs)
    if group_probs.ndim != 2 or len({group_probs.shape[0], y_true_group.shape[0], images.shape[0]}) != 1:
        raise DataError(
            f"confused_pair_gradcams: images {images.shape}, y_true_group {y_true_group.shape} and "
            f"group_probs {group_probs.shape} must have the same number of rows"
        )
    pred = group_probs.argmax(axis=1)
    files: dict[str, bytes] = {}
    for true_g, pred_g in pairs:
        idx = np.flatnonzero((y_true_group == true_g) & (pred == pred_g))
        if idx.size == 0:
            continue
        idx = idx[np.argsort(-group_probs[idx, pred_g], kind="stable")[:k]]
        maps = gradcam(model, images[idx], pred_g, preprocess=preprocess, target_layer=target_layer)
        names = [LABEL_NAMES[int(lbl)] for lbl in y_true_label[idx]] if y_true_label is not None else None
        titles = [
            f"{names[j] if names else GROUP_NAMES[true_g]} -> {GROUP_NAMES[pred_g]} {group_probs[i, pred_g]:.2f}"
            for j, i in enumerate(idx)
        ]
        png = gradcam_png(
            images[idx], maps, titles, suptitle=f"{GROUP_NAMES[true_g]} predicted as {GROUP_NAMES[pred_g]}"
        )
        files[f"gradcam_{GROUP_KEYS[true_g]}_as_{GROUP_KEYS[pred_g]}.png"] = png
    return files
