"""Data-path timings: one-time JPEG decode, cached load, and batch augmentation.

    PYTHONPATH=src python benchmarks/bench_data.py [--data PATH] [--batch-size 256]

Decodes into a fresh temporary cache (so the decode is really measured), then loads the cache,
then times augmentation and a whole training-loader epoch on the decoded CIFAR-10 tensors.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from cenet.data import find_data, load_cifar10
from cenet.data.augment import augment_batch, normalize, random_crop_flip
from cenet.data.loader import TensorLoader


def _ms(fn, repeat: int, warmup: int = 5) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="CIFAR-10 file or directory (default: search)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    source = find_data(args.data, download=False)
    print(f"source: {source.kind} {source.path}")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, load average {load} (other processes slow all timings)"
    )
    with tempfile.TemporaryDirectory(prefix="cenet-bench-cache-") as cache:
        t = time.perf_counter()
        splits = load_cifar10(source, cache_dir=cache)
        first = time.perf_counter() - t
        loads = []
        for _ in range(3):
            t = time.perf_counter()
            load_cifar10(source, cache_dir=cache)
            loads.append(time.perf_counter() - t)
    n_train, n_test = len(splits.train_labels), len(splits.test_labels)
    what = "decode + write cache" if source.kind in ("jpeg_tar", "image_folder") else "read"
    print(f"first load ({what}) of {n_train:,} + {n_test:,} images: {first:.2f} s")
    print(f"load from cache: median {statistics.median(loads):.3f} s, min {min(loads):.3f} s")

    bs = args.batch_size
    g = torch.Generator().manual_seed(0)
    batch = splits.train_images[:bs].contiguous()
    med, best = _ms(lambda: random_crop_flip(batch, generator=g), args.repeat)
    print(f"crop+flip, {bs} images (uint8): median {med:.3f} ms, min {best:.3f} ms")
    crop = random_crop_flip(batch, generator=g)
    med, best = _ms(lambda: normalize(crop), args.repeat)
    print(f"normalize to float32, {bs} images: median {med:.3f} ms, min {best:.3f} ms")
    med, best = _ms(lambda: augment_batch(batch, generator=g), args.repeat)
    print(
        f"augmentation (crop+flip+normalize), {bs} images: median {med:.3f} ms, min {best:.3f} ms"
    )

    loader = TensorLoader(
        splits.train_images,
        splits.train_labels,
        batch_size=bs,
        shuffle=True,
        augment=True,
        drop_last=True,
    )
    epochs = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        t = time.perf_counter()
        for _ in loader:
            pass
        epochs.append(time.perf_counter() - t)
    per_batch = statistics.median(epochs) / len(loader) * 1e3
    print(
        f"TensorLoader epoch ({len(loader)} batches of {bs}, gather+augment+normalize): "
        f"median {statistics.median(epochs):.2f} s = {per_batch:.3f} ms per batch"
    )


if __name__ == "__main__":
    main()
