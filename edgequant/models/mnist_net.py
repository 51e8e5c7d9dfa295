"""A small MobileNetV2-style network (BN, ReLU6, depthwise separable inverted residuals) for the
labelled MNIST-5k benchmark, trained here with a fixed seed (no checkpoint download)."""
from __future__ import annotations

import torch
from torch import nn


def _cbr(cin, cout, k=1, stride=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(_cbr(cin, hidden), _cbr(hidden, hidden, 3, stride, groups=hidden),
                                  _cbr(hidden, cout, act=False))

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MnistMobileNet(nn.Module):
    """28x28x1 -> 10 logits; 6 inverted residual blocks, 16-64 channels (~60k parameters)."""

    def __init__(self):
        super().__init__()
        cfg = [(16, 16, 1, 2), (16, 24, 2, 4), (24, 24, 1, 4), (24, 32, 2, 4), (32, 32, 1, 4), (32, 64, 1, 4)]
        self.features = nn.Sequential(_cbr(1, 16, 3), *[InvertedResidual(*c) for c in cfg], _cbr(64, 128))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(128, 10)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def train_mnist_net(x, y, epochs: int = 8, seed: int = 0, batch_size: int = 64, lr: float = 3e-3) -> MnistMobileNet:
    """Train :class:`MnistMobileNet` deterministically (fixed seed, Adam with cosine decay)."""
    torch.manual_seed(seed)
    return train_classifier(MnistMobileNet(), x, y, epochs, seed, batch_size, lr)


def train_classifier(net: nn.Module, x, y, epochs: int, seed: int, batch_size: int, lr: float,
                     clip: float | None = None) -> nn.Module:
    """Cross-entropy training with Adam and cosine decay, batches in a seeded order (``clip``: gradient norm)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
            sched.step()
    return net.eval()
