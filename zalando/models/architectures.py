"""Architecture registry: name -> builder of a classifier for normalised (N, 1, 28, 28) images.

Every built network is a :class:`ClassifierNet`: it adapts the 28x28 grayscale input to its
architecture (resize to ``input_size``, repeat to 3 channels where needed), and exposes
``forward_both(x) -> (logits, embedding)`` so scoring can return the penultimate layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zalando.errors import ConfigError

MIN_INPUT_SIZE = 28
MAX_INPUT_SIZE = 224


class ClassifierNet(nn.Module):
    """Base class: input adapter + body (feature map) + head (logits), with the embedding exposed."""

    def __init__(self, input_size: int, in_channels: int) -> None:
        super().__init__()
        if not MIN_INPUT_SIZE <= input_size <= MAX_INPUT_SIZE:
            raise ConfigError(f"input_size must be in {MIN_INPUT_SIZE}..{MAX_INPUT_SIZE}, got {input_size}")
        self.input_size = int(input_size)
        self.in_channels = int(in_channels)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) normalised -> (N, C, S, S) as the architecture expects."""
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False
            )
        if self.in_channels != 1:
            x = x.expand(-1, self.in_channels, -1, -1)
        return x

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_both(x)[0]

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters frozen by ``freeze: backbone`` (everything but the classification head)."""
        head = {id(p) for p in self.head_parameters()}
        return [p for p in self.parameters() if id(p) not in head]

    def head_parameters(self) -> list[nn.Parameter]:  # pragma: no cover
        raise NotImplementedError


class _PooledNet(ClassifierNet):
    """body -> global average pool -> embedding -> head (a Linear, maybe behind dropout)."""

    def __init__(self, body: nn.Module, head: nn.Module, input_size: int, in_channels: int) -> None:
        super().__init__(input_size, in_channels)
        self.body = body
        self.head = head

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.body(self.adapt(x))
        emb = torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)
        return self.head(emb), emb

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())


class MobileNetV2Net(_PooledNet):
    def __init__(self, num_classes: int, input_size: int, dropout: float = 0.2) -> None:
        from torchvision.models import mobilenet_v2

        tv = mobilenet_v2(weights=None)
        head = nn.Sequential(nn.Dropout(dropout), nn.Linear(tv.last_channel, num_classes))
        super().__init__(tv.features, head, input_size, in_channels=3)


class ResNet18Net(_PooledNet):
    def __init__(self, num_classes: int, input_size: int) -> None:
        from torchvision.models import resnet18

        tv = resnet18(weights=None)
        body = nn.Sequential(
            tv.conv1, tv.bn1, tv.relu, tv.maxpool, tv.layer1, tv.layer2, tv.layer3, tv.layer4
        )
        super().__init__(body, nn.Linear(tv.fc.in_features, num_classes), input_size, in_channels=3)


class SqueezeNet11Net(ClassifierNet):
    """SqueezeNet 1.1 with its own conv classifier; the embedding is the pooled last feature map."""

    def __init__(self, num_classes: int, input_size: int, dropout: float = 0.5) -> None:
        from torchvision.models import squeezenet1_1

        super().__init__(input_size, in_channels=3)
        tv = squeezenet1_1(weights=None)
        self.body = tv.features
        final_conv = nn.Conv2d(512, num_classes, kernel_size=1)
        nn.init.normal_(final_conv.weight, mean=0.0, std=0.01)
        nn.init.zeros_(final_conv.bias)
        self.head = nn.Sequential(nn.Dropout(p=dropout), final_conv, nn.ReLU(inplace=True))

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.body(self.adapt(x))
        emb = torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)
        logits = torch.flatten(F.adaptive_avg_pool2d(self.head(fmap), 1), 1)
        return logits, emb

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class FashionCNN(ClassifierNet):
    """A small VGG-style CNN for 28x28x1 images: few channels at full resolution, width where maps are small.

    stage 1 @28: ``n1`` 3x3 convs of ``c1`` -> max-pool -> stage 2 @14: ``n2`` convs of ``c2`` -> max-pool ->
    stage 3 @7: ``n3`` convs of ``c3`` -> average-pool to ``pool_to`` x ``pool_to`` -> flatten ->
    FC ``embed_dim`` (+BN, ReLU: the embedding) -> dropout -> FC to the classes. Every conv has BN + ReLU.
    """

    def __init__(
        self,
        num_classes: int,
        input_size: int = 28,
        c1: int = 16,
        c2: int = 48,
        c3: int = 96,
        n1: int = 1,
        n2: int = 2,
        n3: int = 2,
        pool_to: int = 1,
        embed_dim: int = 128,
        dropout: float = 0.3,
    ) -> None:
        super().__init__(input_size, in_channels=1)
        widths = [int(c1), int(c2), int(c3)]
        depths = [int(n1), int(n2), int(n3)]
        if min(widths) < 1 or min(depths) < 1:
            raise ConfigError(f"fashion_cnn needs c1..c3 >= 1 and n1..n3 >= 1, got {widths} {depths}")
        layers: list[nn.Module] = []
        cin = 1
        for stage, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            if stage > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(depth):
                layers.append(_conv_bn(cin, width))
                cin = width
        self.body = nn.Sequential(*layers)
        self.pool_to = int(pool_to)
        self.pool = _fixed_pool(_map_size(self.input_size, stages=2), self.pool_to)
        embed_dim = int(embed_dim)
        self.embed = nn.Sequential(
            nn.Flatten(), nn.Linear(cin * self.pool_to**2, embed_dim), nn.BatchNorm1d(embed_dim), nn.ReLU()
        )
        self.head = nn.Sequential(nn.Dropout(float(dropout)), nn.Linear(embed_dim, num_classes))

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.body(self.adapt(x))
        emb = self.embed(self.pool(fmap))
        return self.head(emb), emb

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())


def _map_size(size: int, stages: int) -> int:
    for _ in range(stages):
        size //= 2
    return size


def _fixed_pool(size: int, out: int) -> nn.Module:
    """Average-pool a size x size map to out x out with a fixed kernel (ONNX has no general adaptive pool)."""
    if out < 1 or out > size:
        raise ConfigError(f"pool_to must be in 1..{size} for this input size, got {out}")
    if out == 1:
        return nn.AdaptiveAvgPool2d(1)
    stride = size // out
    return nn.AvgPool2d(kernel_size=size - (out - 1) * stride, stride=stride)


@dataclass(frozen=True)
class Architecture:
    """A registry entry: how to build it and what it needs."""

    name: str
    builder: Callable[..., ClassifierNet]
    torchvision_name: str | None  # for ImageNet weights
    description: str


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            "mobilenet_v2", MobileNetV2Net, "mobilenet_v2", "torchvision MobileNetV2, new 1280->C head"
        ),
        Architecture(
            "squeezenet1_1", SqueezeNet11Net, "squeezenet1_1", "torchvision SqueezeNet 1.1, new conv head"
        ),
        Architecture("resnet18", ResNet18Net, "resnet18", "torchvision ResNet18, new 512->C head"),
        Architecture("fashion_cnn", FashionCNN, None, "small CNN for 28x28x1 (arch_params: c1,c2,c3,...)"),
    )
}


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ConfigError(
            f"unknown architecture {name!r}; valid choices: {', '.join(sorted(ARCHITECTURES))}"
        ) from None


def build_model(
    architecture: str, num_classes: int, input_size: int, arch_params: dict[str, float] | None = None
) -> ClassifierNet:
    """Build an untrained network by registry name (weights are loaded separately, see weights.py)."""
    arch = get_architecture(architecture)
    try:
        return arch.builder(num_classes=num_classes, input_size=input_size, **(arch_params or {}))
    except TypeError as exc:
        raise ConfigError(
            f"bad arch_params {arch_params!r} for architecture {architecture!r}: {exc}"
        ) from None


def count_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def count_macs(model: nn.Module, image_size: int = 28) -> int:
    """Multiply-accumulates per image of Conv2d and Linear layers (FLOPs ~ 2x this)."""
    total = 0

    def conv_hook(mod: nn.Conv2d, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
        total += int(out[0].numel() * k)

    def linear_hook(mod: nn.Linear, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        total += int(mod.in_features * mod.out_features)

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, image_size, image_size))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total
