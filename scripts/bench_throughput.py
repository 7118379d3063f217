"""End-to-end SimCLR training throughput: our GPU-resident pipeline vs a CPU DataLoader.

In ONE process on ONE device, the same model (ResNet-18, CIFAR stem, 2-layer head),
loss (NT-Xent) and optimiser step are fed three ways:

  (a) ours: uint8 data set on the device, index batches, batched augmentation there
      (``contrastive.augment.Augment``, replayed as a CUDA graph), channels_last (as training
      runs on CPU and GPU) + bf16 autocast on a GPU; (a0) the same with the augmentation run eagerly;
  (b) baseline: torchvision.transforms.v2 SimCLR transforms in a DataLoader with all
      CPU cores as workers (pinned memory, non-blocking copies), as the other toolkits do;
  (c) ceiling: two pre-made views already on the device (model + loss + step only).

images/s counts source images (each gives two views). Prints a/b, a/c and peak GPU memory (n/a on the CPU);
``--compile`` adds (c) and (a) with the backbone under ``torch.compile`` and their ratios;
``--nchw`` adds them in the NCHW layout, and the ratios channels_last / NCHW.

    python scripts/bench_throughput.py --device cuda --batch-size 512
    python scripts/bench_throughput.py --device cpu --batch-size 32 --steps 5 --model convnet  # smoke
    python scripts/bench_throughput.py --device cpu --batch-size 64 --steps 30 --warmup 5 --model convnet --nchw
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from contrastive.augment import Augment
from contrastive.data import ImageTensors, IndexBatches
from contrastive.losses import nt_xent
from contrastive.models import convnet, mlp, resnet
from contrastive.pipelines.base import channels_last

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def build(
    model: str, device: torch.device, compile: bool = False, nhwc: bool = True
) -> tuple[nn.Module, torch.optim.Optimizer]:
    backbone, dim = (resnet("resnet18", cifar_stem=True), 512) if model == "resnet18" else (convnet(32), 128)
    if compile:
        backbone.compile()  # what contrastive-train compile=true does
    net = nn.Sequential(backbone, mlp(dim, 2048, 128)).to(device)
    if nhwc:
        net = net.to(memory_format=torch.channels_last)
    return net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def make_step(
    net: nn.Module, opt: torch.optim.Optimizer, device: torch.device, nhwc: bool = True
) -> Callable[[Tensor, Tensor], None]:
    amp = device.type == "cuda"

    def step(v1: Tensor, v2: Tensor) -> None:
        if nhwc:
            v1 = v1.contiguous(memory_format=torch.channels_last)
            v2 = v2.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            z1, z2 = net(torch.cat([v1, v2])).chunk(2)
            loss = nt_xent(z1, z2, 0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def timed(
    batches: Iterator[tuple[Tensor, Tensor]],
    step: Callable[[Tensor, Tensor], None],
    steps: int,
    warmup: int,
    batch_size: int,
    device: torch.device,
) -> float:
    """Source images per second over ``steps`` steps after ``warmup`` steps."""
    for i, (v1, v2) in enumerate(batches):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        step(v1, v2)
        if i == warmup + steps - 1:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def ours(
    data: ImageTensors, batch_size: int, device: torch.device, graph: bool = True
) -> Iterator[tuple[Tensor, Tensor]]:
    aug = Augment(size=32, mean=MEAN, std=STD, cuda_graph=graph)
    gen = torch.Generator().manual_seed(0)
    on_device = data.to(device)
    while True:
        for x, _ in IndexBatches(on_device, batch_size, shuffle=True, drop_last=True):
            v1, v2 = aug(x.repeat(2, 1, 1, 1), gen).chunk(2)
            yield v1, v2


class _TwoViews(torch.utils.data.Dataset):
    def __init__(self, images: Tensor) -> None:
        from torchvision.transforms import v2

        self.images = images
        self.t = v2.Compose(
            [
                v2.RandomResizedCrop(32, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(MEAN, STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.images[i]
        return self.t(x), self.t(x)


def baseline(
    data: ImageTensors, batch_size: int, device: torch.device, workers: int
) -> Iterator[tuple[Tensor, Tensor]]:
    loader = torch.utils.data.DataLoader(
        _TwoViews(data.images),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
    )
    while True:
        for v1, v2 in loader:
            yield v1.to(device, non_blocking=True), v2.to(device, non_blocking=True)


def ceiling(batch_size: int, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    v1, v2 = torch.randn(2, batch_size, 3, 32, 32, device=device).unbind(0)
    while True:
        yield v1, v2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--model", default="resnet18", choices=["resnet18", "convnet"])
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--images", type=int, default=50_000, help="random uint8 images if no --cifar-root")
    p.add_argument("--cifar-root", default=None, help="folder holding cifar-10-batches-py (else random images)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time (c) and (a) with the backbone under torch.compile (contrastive-train compile=true)",
    )
    p.add_argument("--nchw", action="store_true", help="also time (c) and (a) in the NCHW layout")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    if args.cifar_root:
        from contrastive.data import cifar10

        data = cifar10(args.cifar_root).train
    else:
        g = torch.Generator().manual_seed(0)
        data = ImageTensors(
            torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=g),
            torch.zeros(args.images, dtype=torch.long),
            1,
        )

    rows = {}
    nhwc = channels_last(device)  # the layout contrastive-train uses on this device
    cases = [  # name, source, compiled backbone, channels_last
        ("(c) ceiling: views pre-made on device", lambda: ceiling(args.batch_size, device), False, nhwc),
        ("(a) ours: device-resident data + batched aug", lambda: ours(data, args.batch_size, device), False, nhwc),
        (
            "(a0) ours without the CUDA graph (eager aug)",
            lambda: ours(data, args.batch_size, device, False),
            False,
            nhwc,
        ),
        (
            f"(b) torchvision v2 + DataLoader({args.workers} workers)",
            lambda: baseline(data, args.batch_size, device, args.workers),
            False,
            nhwc,
        ),
    ]
    if args.compile:  # warm-up steps absorb the compile time
        cases += [
            ("(cC) ceiling, compiled backbone", lambda: ceiling(args.batch_size, device), True, nhwc),
            ("(aC) ours, compiled backbone", lambda: ours(data, args.batch_size, device), True, nhwc),
        ]
    if args.nchw:
        cases += [
            ("(cN) ceiling, NCHW", lambda: ceiling(args.batch_size, device), False, False),
            ("(aN) ours, NCHW", lambda: ours(data, args.batch_size, device), False, False),
        ]
    for name, source, compiled, layout in cases:
        torch.manual_seed(0)
        net, opt = build(args.model, device, compiled, layout)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ips = timed(source(), make_step(net, opt, device, layout), args.steps, args.warmup, args.batch_size, device)
        # GPU memory only: on the CPU, case (b)'s DataLoader workers are other processes
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:6.2f} GiB" if device.type == "cuda" else "   n/a (CPU)"
        rows[name.split()[0]] = ips
        print(f"{name:52s} {ips:10.0f} images/s   peak {peak}", flush=True)
    print(
        f"a/b = {rows['(a)'] / rows['(b)']:.2f}   a/c = {rows['(a)'] / rows['(c)']:.2f}   "
        f"(device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
        f"batch {args.batch_size}, model {args.model}, {args.workers} CPU workers)"
    )
    if args.compile:
        print(f"compiled/eager: ceiling {rows['(cC)'] / rows['(c)']:.2f}   ours {rows['(aC)'] / rows['(a)']:.2f}")
    if args.nchw:
        print(f"channels_last/NCHW: ceiling {rows['(c)'] / rows['(cN)']:.2f}   ours {rows['(a)'] / rows['(aN)']:.2f}")


if __name__ == "__main__":
    main()
