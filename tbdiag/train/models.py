"""Models of the TempBalance experiments: CIFAR-style ResNet/VGG for 32×32 inputs, and a small CNN and MLP
for 28×28 inputs. ``width`` scales every layer's channel count (the paper's width ablation)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class MLP(nn.Module):
    """Fully connected classifier: flatten → [Linear → ReLU]* → Linear."""

    def __init__(self, in_features: int = 784, hidden: tuple[int, ...] = (128, 128), num_classes: int = 10,
                 width: float = 1.0) -> None:
        super().__init__()
        sizes = [in_features, *(max(1, int(h * width)) for h in hidden)]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        return self.net(x)


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Three 3×3 conv–BN–ReLU stages (the last two strided), global average pooling, a Linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3 = (max(1, int(c * width)) for c in (32, 64, 128))
        self.features = nn.Sequential(*_conv_bn(in_channels, c1), *_conv_bn(c1, c2, 2), *_conv_bn(c2, c3, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        return self.fc(self.pool(self.features(x)).flatten(1))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 conv–BN with an identity or 1×1 projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet (3×3 stem, no max-pool), as in the TempBalance experiments."""

    def __init__(self, blocks: tuple[int, ...], num_classes: int = 10, in_channels: int = 3,
                 width: float = 1.0) -> None:
        super().__init__()
        widths = [max(1, int(c * width)) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, cin = [], widths[0]
        for i, (n, cout) in enumerate(zip(blocks, widths)):
            stage = []
            for b in range(n):
                stage.append(BasicBlock(cin, cout, 2 if (b == 0 and i > 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32) -> (B, classes)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(nn.functional.adaptive_avg_pool2d(out, 1).flatten(1))


VGG_CONFIGS = {
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """VGG with batch norm for 32×32 inputs (five 2× poolings leave 1×1), one Linear head."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in VGG_CONFIGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                cout = max(1, int(v * width))
                layers += _conv_bn(cin, cout)
                cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32) -> (B, classes)
        return self.classifier(self.features(x).flatten(1))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": lambda **kw: ResNet((2, 2, 2, 2), **kw),
    "resnet34": lambda **kw: ResNet((3, 4, 6, 3), **kw),
    "vgg16": lambda **kw: VGG(16, **kw),
    "vgg19": lambda **kw: VGG(19, **kw),
    "cnn": SmallCNN,
    "mlp": MLP,
}

# The fewest channels (or hidden units) a layer of each model has at width 1: a width below
# 1 / NARROWEST[model] would leave it none.
NARROWEST: dict[str, int] = {"resnet18": 64, "resnet34": 64, "vgg16": 64, "vgg19": 64, "cnn": 32, "mlp": 128}
