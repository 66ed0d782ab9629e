"""PyTorch CPU baseline for `cargo xtask bench-train --device cpu`.

Times a full training step (train-mode forward, cross-entropy, backward, SGD momentum 0.9
update) of torchvision-layout ResNets on the CPU, with a given thread count, and prints one JSON
object (the median ms per step of each config) on the last line of stdout.
Usage: python torch_cpu_train.py --threads 2 --steps 5 --warmup 2 \
           --configs resnet18:32:64,resnet50:8:64   (arch:batch:size)
No torchvision needed: the ResNet below follows torchvision's v1.5 layout.
"""
import argparse, json, statistics, time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.down = None
        if stride != 1 or cin != planes:
            self.down = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.down = None
        if stride != 1 or cin != planes * 4:
            self.down = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


ARCHS = {"resnet18": (Basic, [2, 2, 2, 2]), "resnet34": (Basic, [3, 4, 6, 3]),
         "resnet50": (Bottleneck, [3, 4, 6, 3]), "resnet101": (Bottleneck, [3, 4, 23, 3])}


class ResNet(nn.Module):
    def __init__(self, arch, classes):
        super().__init__()
        block, counts = ARCHS[arch]
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for stage, n in enumerate(counts):
            planes = 64 << stage
            for i in range(n):
                layers.append(block(cin, planes, 2 if stage > 0 and i == 0 else 1))
                cin = planes * block.expansion
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(x), 1), 1))


def training_step(arch, batch, size, classes):
    """The timed step on a fixed random batch: train-mode forward, cross-entropy, backward, SGD
    momentum 0.9 update."""
    model = ResNet(arch, classes).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch, 3, size, size)
    labels = torch.arange(batch) % classes

    def step():
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="resnet18:32:64,resnet18:16:112,resnet50:8:64,resnet50:16:112")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--classes", type=int, default=200)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    results = []
    for spec in a.configs.split(","):
        arch, batch, size = spec.split(":")
        batch, size = int(batch), int(size)
        step = training_step(arch, batch, size, a.classes)
        for _ in range(a.warmup):
            step()
        times = []
        for _ in range(a.steps):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        median = statistics.median(times)
        print(f"torch {arch} b{batch} {size}x{size}: {median:.1f} ms/step", flush=True)
        results.append(dict(arch=arch, batch=batch, size=size, median_ms=median, times_ms=times))
    print(json.dumps(dict(torch=torch.__version__, threads=a.threads, results=results)))


if __name__ == "__main__":
    main()
