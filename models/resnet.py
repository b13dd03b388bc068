"""ResNet feature extractors for segflow's FCN, without importing torchvision.

Every model actor builds its network in a fresh process, and `import torchvision` costs
1.1 CPU-s there (its `ops` package imports torch._dynamo and sympy), a third of an actor's
start, paid again by every job. The FCN's ResNet backbones need none of it when their
weights come from a checkpoint, which is how the engine always loads them.

So this is torchvision's ResNet (torchvision/models/resnet.py, BSD-3-Clause), restricted to
what the FCN uses: the same modules, built in the same order and initialised the same way,
so state-dict keys match torchvision's (checkpoints load either way) and a seeded fresh
network draws the same random weights (the fc layer is built and dropped for that alone).
tests/test_models.py checks both against torchvision. ImageNet weights
(`backbone_weights`, for training) still come from torchvision: models/fcn.py.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

LAYOUTS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)), "resnet50": ("bottleneck", (3, 4, 6, 3))}


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class _ResidualBlock(nn.Module):
    """What both blocks end with: the shortcut (downsampled where the shape changes) added, then ReLU."""

    def _join_shortcut(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class BasicBlock(_ResidualBlock):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self._join_shortcut(x, self.bn2(self.conv2(out)))


class Bottleneck(_ResidualBlock):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self._join_shortcut(x, self.bn3(self.conv3(out)))


class ResNet(nn.Module):
    """torchvision's ResNet construction (groups 1, width 64, no dilation), classifier included."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, int, int, int], num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)


class StridedFeatures(nn.ModuleDict):
    """A classifier's stages up to the last one asked for, returning the asked ones by name.

    torchvision's IntermediateLayerGetter, which checkpoints' keys were written through:
    the same children under the same names, so the same state-dict keys.
    """

    def __init__(self, model: nn.Module, return_layers: dict[str, str]):
        wanted, layers = dict(return_layers), OrderedDict()
        for name, module in model.named_children():
            layers[name] = module
            wanted.pop(name, None)
            if not wanted:
                break
        super().__init__(layers)
        self.return_layers = dict(return_layers)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


def resnet(name: str) -> ResNet:
    """A freshly initialised torchvision-layout ResNet ("resnet18", "resnet34", "resnet50")."""
    kind, layers = LAYOUTS[name]
    return ResNet(BasicBlock if kind == "basic" else Bottleneck, layers)
