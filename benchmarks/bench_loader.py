"""ImageFolder loader throughput against a model's training speed: which one limits?

    python benchmarks/bench_loader.py [--count 512] [--size 500 375] [--workers 0 1 2]
        [--model resnet18_ce] [--batch 32] [--steps 3] [--root DIR] [--threads N]

Writes a synthetic JPEG ImageFolder of ImageNet-like photo sizes (``--size``, default
500x375; :func:`cenet.data.synthetic.make_image_folder`) into a temporary directory, or uses
``--root`` (created if it has no ``train/``). For each ``--workers`` count it times one epoch
of the training loader of ``cenet.data.build_loaders`` at image size 224 with the paper's
augmentation (decode, ``RandomResizedCrop(224)``, flip, normalize), after two warm-up batches
that start the persistent workers; images/s per worker is the rate divided by the workers (the
main process for 0). Beside it, the training-step rate of ``--model`` (forward, cross-entropy,
backward, SGD step; channels-last; freed memory kept as the training loop keeps it) on a batch
of the same images, and which of the two limits. On a CPU-only machine the workers and the
model share the cores, so a loader that is faster here alone can still slow training down;
and with 0 workers the transforms run with the process's ``--threads``, which on a busy
machine costs far more than one thread would.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import cenet
from cenet import kernels
from cenet.data import build_loaders
from cenet.data.synthetic import make_image_folder
from cenet.train.allocator import keep_freed_memory

IMAGE_SIZE = 224


def ensure_folder(root: Path, count: int, size: tuple[int, int], classes: int) -> Path:
    """``root`` with a synthetic ``train/`` of about ``count`` JPEGs (kept if it exists)."""
    if not (root / "train").is_dir():
        start = time.perf_counter()
        make_image_folder(
            root, num_classes=classes, train_per_class=max(1, count // classes),
            val_per_class=1, size=size,
        )  # fmt: skip
        print(f"wrote {root} in {time.perf_counter() - start:.1f} s")
    return root


def loader_rate(root: Path, workers: int, batch: int) -> tuple[float, int]:
    """Images/s of one training-loader epoch after two warm-up batches, and the images
    counted."""
    train, _, _ = build_loaders(
        dataset="folder", data=root, batch_size=batch, image_size=IMAGE_SIZE, num_workers=workers
    )
    train.set_epoch(0)
    warm = iter(train)  # starts the persistent workers
    for _ in range(min(2, len(train))):
        next(warm)
    train.set_epoch(1)
    batches = iter(train)  # waits for the warm-up batches still in flight, then requests anew
    seen = 0
    start = time.perf_counter()
    for images, _ in batches:
        seen += images.shape[0]
    return seen / (time.perf_counter() - start), seen


def model_rate(name: str, root: Path, batch: int, steps: int) -> float:
    """Images/s of ``name``'s training step on one batch of the loader's images."""
    train, _, info = build_loaders(
        dataset="folder", data=root, batch_size=batch, image_size=IMAGE_SIZE
    )
    images, labels = next(iter(train))
    model = cenet.create_model(name, num_classes=info.num_classes)
    model = model.to(memory_format=torch.channels_last).train()
    images = images.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    times = []
    for step in range(steps + 1):  # the first step warms up (and may build the kernels)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()
        if step:
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=512, help="training images to write")
    parser.add_argument("--size", type=int, nargs=2, default=(500, 375),
                        metavar=("WIDTH", "HEIGHT"), help="side of the written JPEGs")
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--model", default="resnet18_ce", help="registered model name")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (median)")
    parser.add_argument("--root", type=Path, default=None,
                        help="ImageFolder to read, written there if it has no train/ "
                             "(default: a temporary directory)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    info = kernels.info()
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"{info['cpu']} (capability {info['cpu_capability']}), torch {torch.__version__}, "
          f"{args.threads} threads, {os.cpu_count()} CPUs, load average {load}")
    with tempfile.TemporaryDirectory(prefix="cenet-bench-loader-") as tmp:
        root = ensure_folder(args.root or Path(tmp) / "jpegs", args.count, tuple(args.size),
                             args.classes)  # fmt: skip
        files = list((root / "train").glob("*/*"))
        kib = sum(f.stat().st_size for f in files) / len(files) / 1024
        print(f"{len(files)} training JPEGs of {args.size[0]}x{args.size[1]} ({kib:.0f} KiB "
              f"each) -> RandomResizedCrop({IMAGE_SIZE}) + flip, batch {args.batch}")
        rates = {}
        for workers in args.workers:
            rate, seen = loader_rate(root, workers, args.batch)
            rates[workers] = rate
            print(f"loader, {workers} worker{'' if workers == 1 else 's'}: {rate:7.1f} images/s "
                  f"({rate / max(workers, 1):6.1f} per {'worker' if workers else 'process'}, "
                  f"{seen} images)", flush=True)
        keep_freed_memory()
        step_rate = model_rate(args.model, root, args.batch, args.steps)
    print(f"{args.model} train step (batch {args.batch}, channels-last, {args.threads} "
          f"threads): {step_rate:7.1f} images/s")
    for workers, rate in rates.items():
        limit = "the loader" if rate < step_rate else "the model"
        print(f"{workers} worker{'' if workers == 1 else 's'}: {limit} limits "
              f"({rate:.1f} vs {step_rate:.1f} images/s)")


if __name__ == "__main__":
    main()
