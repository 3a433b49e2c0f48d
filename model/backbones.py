"""Backbones returning the four ARM source maps at strides 8, 16, 32 and 64.

VGG-16: ``features[0:30]`` keeps torchvision's vgg16 layer indices (conv1_1 .. conv5_3 + ReLU), so
ImageNet or converted weights load by name; then pool5 2x2/s2, fc6 3x3 dilation 3 (1024), fc7 1x1
(1024), conv6_1 1x1 (256), conv6_2 3x3/s2 (512). conv4_3 and conv5_3 pass through L2Norm (10, 8).

ResNet-101: torchvision's ResNet-101 (stride on the 3x3 of each bottleneck, unlike the original
Caffe model's stride on the first 1x1) with an extra ``res6`` bottleneck (128-128-512, stride 2).
"""

from __future__ import annotations

from torch import Tensor, nn

from model.layers import Bottleneck, L2Norm, init_new_layers

VGG16_CFG: list[int | str] = [
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
]
CONV4_3_RELU = 23  # features[:23] ends with conv4_3's ReLU


class VGG16Body(nn.Module):
    out_channels = (512, 512, 1024, 512)

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in VGG16_CFG:
            if isinstance(v, str):  # "M": max pool
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU(inplace=True)]
                in_ch = v
        self.features = nn.Sequential(*layers)  # indices 0..29, as torchvision's vgg16().features
        self.fc = nn.Sequential(
            nn.MaxPool2d(2, 2),  # pool5: 2x2 stride 2 (not SSD's 3x3 s1)
            nn.Conv2d(512, 1024, 3, padding=3, dilation=3),  # fc6
            nn.ReLU(inplace=True),
            nn.Conv2d(1024, 1024, 1),  # fc7
            nn.ReLU(inplace=True),
        )
        self.extras = nn.Sequential(
            nn.Conv2d(1024, 256, 1),  # conv6_1
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 512, 3, stride=2, padding=1),  # conv6_2
            nn.ReLU(inplace=True),
        )
        self.conv4_3_norm = L2Norm(512, 10.0)
        self.conv5_3_norm = L2Norm(512, 8.0)
        init_new_layers(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        conv4_3 = self.features[:CONV4_3_RELU](x)
        conv5_3 = self.features[CONV4_3_RELU:](conv4_3)
        fc7 = self.fc(conv5_3)
        conv6_2 = self.extras(fc7)
        return [self.conv4_3_norm(conv4_3), self.conv5_3_norm(conv5_3), fc7, conv6_2]


class ResNet101Body(nn.Module):
    out_channels = (512, 1024, 2048, 512)

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet101

        net = resnet101(weights=None)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
        self.layer2, self.layer3, self.layer4 = net.layer2, net.layer3, net.layer4
        self.res6 = Bottleneck(2048, 128, 512, stride=2)
        init_new_layers(self.res6)

    def forward(self, x: Tensor) -> list[Tensor]:
        c3 = self.layer2(self.stem(x))
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5, self.res6(c5)]
