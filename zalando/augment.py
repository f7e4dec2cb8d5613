"""Training-batch augmentation: random flip, affine (shift, rotate, zoom) and erasing, drawn seeded.

The draw (:class:`AugmentDraw`, :func:`draw_augment`) happens on the CPU from one generator, so a seed
gives the same batches on every device; :func:`apply_augment` applies it on the batch's device. The
policy (which transforms, how strong) is :class:`zalando.models.experiments.AugmentPolicy`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zalando.models.experiments import AugmentPolicy
from zalando.models.hardware import to_device


@dataclass(frozen=True)
class AugmentDraw:
    """One batch's random augmentation, drawn on the CPU: the same seed gives the same draw on every device.

    ``flip`` (N,) bool; ``theta`` (N, 2, 3) affine matrices; ``erase`` (N, 5): do (0/1), height, width,
    top, left in pixels. A field is None where the policy does not use it.
    """

    flip: torch.Tensor | None
    theta: torch.Tensor | None
    erase: torch.Tensor | None

    def to(self, device: torch.device) -> AugmentDraw:
        """The draw on ``device`` (pinned and non-blocking on a GPU)."""
        return AugmentDraw(
            *(None if t is None else to_device(t, device) for t in (self.flip, self.theta, self.erase))
        )


def draw_augment(n: int, h: int, w: int, policy: AugmentPolicy, gen: torch.Generator) -> AugmentDraw:
    """Random flip / affine (shift, rotate, zoom) / erase parameters for ``n`` images of ``h`` x ``w``."""
    flip = theta = erase = None
    if policy.hflip:
        flip = torch.rand(n, generator=gen) < 0.5
    if policy.shift > 0 or policy.rotate > 0 or policy.scale > 0:
        ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(policy.rotate)
        s = 1 + (torch.rand(n, generator=gen) * 2 - 1) * policy.scale
        max_px = round(policy.shift * w)
        tx = torch.randint(-max_px, max_px + 1, (n,), generator=gen).float() * 2 / w
        ty = torch.randint(-max_px, max_px + 1, (n,), generator=gen).float() * 2 / h
        cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    if policy.erase > 0:
        do = torch.rand(n, generator=gen) < policy.erase
        eh = (torch.rand(n, generator=gen) * 0.3 + 0.1) * h
        ew = (torch.rand(n, generator=gen) * 0.3 + 0.1) * w
        y0 = torch.rand(n, generator=gen) * (h - eh)
        x0 = torch.rand(n, generator=gen) * (w - ew)
        erase = torch.stack([do.float(), eh, ew, y0, x0], 1)
    return AugmentDraw(flip, theta, erase)


def apply_augment(x: torch.Tensor, draw: AugmentDraw) -> torch.Tensor:
    """Apply a draw to a (N, 1, H, W) batch in [0, 1], on the batch's device (grid sampling at 28x28)."""
    _, _, h, w = x.shape
    if draw.flip is not None:
        x = torch.where(draw.flip[:, None, None, None], x.flip(-1), x)
    if draw.theta is not None:
        grid = F.affine_grid(draw.theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if draw.erase is not None:
        do, eh, ew, y0, x0 = draw.erase.unbind(1)
        rows = torch.arange(h, device=x.device).float()[None, :, None]
        cols = torch.arange(w, device=x.device).float()[None, None, :]
        box = (
            (rows >= y0[:, None, None])
            & (rows < (y0 + eh)[:, None, None])
            & (cols >= x0[:, None, None])
            & (cols < (x0 + ew)[:, None, None])
            & (do > 0)[:, None, None]
        )
        x = x.masked_fill(box[:, None], 0.0)
    return x


def augment_batch(x: torch.Tensor, policy: AugmentPolicy, gen: torch.Generator) -> torch.Tensor:
    """Random flip / affine (shift, rotate, zoom) / erase of a (N, 1, H, W) batch in [0, 1]."""
    n, _, h, w = x.shape
    return apply_augment(x, draw_augment(n, h, w, policy, gen).to(x.device))
