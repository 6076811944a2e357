"""Parameters and multiply-adds of every ImageNet network of ``cenet.list_models()``, next to the
CE paper's GFLOPs (Tables 1 and 2), with each variant's increase over its plain twin.

    python benchmarks/model_table.py [--pattern 'resnet50*'] [--size 224]

How we count. One 1×3×224×224 image through the network in eval mode under
``torch.utils.flop_counter.FlopCounterMode``; MACs = FLOPs / 2. The counter sees matrix
products and convolutions only (``mm``, ``bmm``, ``addmm``, ``convolution`` ...), not
normalization, activations, pooling or other elementwise work. The paper's GFLOPs are
multiply-adds too ("the definition of GFLOPs follows Sandler et al. 2018"), so the columns
compare; our plain ResNets count a little less than the paper's (4.09 against 4.14 for
ResNet-50), probably because the paper's counter also counted some other work.

Why CE adds ~3.4 % here when the paper reports +0.5 % (ResNet-50 4.14 → 4.16, ResNet-18
1.82 → 1.83, ResNet-101 7.87 → 7.89; the relative numbers 0.48 / 0.55 / 0.25 % of the paper's
text are these rounded table values). In eval the CE block is the linear map
p_n = λ·W_run·x̃_n + (1 − λ)·Diag(d_n)·x̃_n (Eqn 4 with the running estimates of Eqn 32,
appendix E). We apply it, per sample, as one block-diagonal (C×C with G blocks of g×g) matrix
product, which the counter books as a ``bmm`` of C·g multiply-adds per position: for g = 16
that is as much as a 1×1 convolution with 16 input channels per output channel, at every CE.
The extra MACs, by place:

- the stem CE (group 64, so 64 multiply-adds per element, at 112×112): 51.4 M MACs, about
  2.8 % of ResNet-18 and 1.3 % of ResNet-50 on its own, the largest single term;
- the block-diagonal products of the residual-branch CEs (C·16 MACs per position each: 12 M
  for ResNet-18, 84 M for ResNet-50, at the BN of the last conv, C = 4 × the bottleneck
  width);
- the IR gate MLP (two C×C/4 products per sample, ``mm``): C²/2 MACs a block, 0.35 M in all
  for ResNet-18, 3.8 M for ResNet-50.

BD alone (``_bd``) would fold exactly into the previous convolution at inference (appendix E,
"Moving average in inference"), but CE cannot, as IR needs x̃ itself; so these MACs are real in
eval. The authors' code (github.com/Tangshitao/CENet), counted with this same counter, gives
+3.4 % (CE-ResNet-50) and +3.5 % (CE-ResNet-18), which the table prints beside ours: the same
stem CE and block CEs.
Our ResNet-18 has also CE in layer4's two blocks, as the paper's text says ("each residual
block") and the authors' code does not: 0.8 M MACs, +0.04 points.

We could not reproduce the paper's own +0.01 / +0.02 / +0.02 GFLOPs with an exact count of
this placement: without the stem CE, the block CEs add 12 M (ResNet-18, fits +0.01) but 84 M
(ResNet-50) and 64 M (ResNet-101, layer1-2); the Table 1 numbers would fit a count without
the stem CE and with each bottleneck CE at the inner width C/4 (21 M and 16 M). SE's FC layers
act on pooled (N, C, 1, 1) tensors, hence its tiny cost.

The second table splits each CE variant's extra MACs by where they are spent.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import cenet
from cenet.deploy.bench_models import reference_of
from cenet.layers import ChannelEquilibrium

#: the CE paper's GFLOPs (Table 1: ResNets; Table 2: MobileNetV2 1×, ShuffleNetV2 0.5×/1×)
PAPER_GFLOPS: dict[str, float] = {
    "resnet18": 1.82, "resnet18_se": 1.82, "resnet18_ce": 1.83,
    "resnet50": 4.14, "resnet50_se": 4.15, "resnet50_ce": 4.16,
    "resnet101": 7.87, "resnet101_se": 7.88, "resnet101_ce": 7.89,
    "mobilenet_v2": 0.33, "mobilenet_v2_se": 0.33, "mobilenet_v2_ce": 0.33,
    "shufflenet_v2_x0_5": 0.05, "shufflenet_v2_x0_5_se": 0.05, "shufflenet_v2_x0_5_ce": 0.05,
    "shufflenet_v2_x1_0": 0.15, "shufflenet_v2_x1_0_se": 0.15, "shufflenet_v2_x1_0_ce": 0.16,
}

#: the authors' code counted with FlopCounterMode, increase over the plain twin
AUTHORS_INCREASE: dict[str, float] = {"resnet18_ce": 3.5, "resnet50_ce": 3.4}

def plain_twin(name: str, names: set[str]) -> str | None:
    """The plain network ``name`` is a variant of (``resnet50_ce`` → ``resnet50``), or None."""
    twin = reference_of(name, names)
    return None if twin == name else twin


def count_macs(model: nn.Module, size: int) -> tuple[int, dict[str, dict]]:
    """Multiply-adds of one eval forward of a 1×3×size×size image, and FlopCounterMode's
    per-module FLOP counts (keys ``<RootClass>.<module name>``)."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops() // 2, counter.get_flop_counts()


def ce_breakdown(model: nn.Module, per_module: dict[str, dict]) -> dict[str, int]:
    """MACs spent inside the CE blocks: the stem CE (the first in module order), the other
    CEs' per-sample matrix products (``bmm``/``convolution``), and the IR MLPs (``mm``)."""
    root = type(model).__name__
    names = [n for n, m in model.named_modules() if isinstance(m, ChannelEquilibrium)]
    out = {"stem": 0, "blocks": 0, "ir_mlp": 0}
    for i, name in enumerate(names):
        counts = per_module.get(f"{root}.{name}", {})
        mlp = sum(v for op, v in counts.items() if str(op).endswith(("aten.mm", "aten.addmm")))
        rest = sum(counts.values()) - mlp
        is_stem = i == 0 and "stem" in name
        out["ir_mlp"] += mlp // 2
        out["stem" if is_stem else "blocks"] += rest // 2
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", default=None, help="glob on model names (default: all)")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    args = parser.parse_args()
    names = [n for n in cenet.list_models(args.pattern) if not n.startswith("cifar_")]
    all_names = set(cenet.list_models())
    rows, breakdown = {}, {}
    for name in names:
        torch.manual_seed(0)
        model = cenet.create_model(name)
        macs, per_module = count_macs(model, args.size)
        params = sum(p.numel() for p in model.parameters())
        rows[name] = (params, macs)
        if any(isinstance(m, ChannelEquilibrium) for m in model.modules()):
            breakdown[name] = ce_breakdown(model, per_module)
        del model
    twins = {n: plain_twin(n, all_names) for n in names}
    for twin in {t for t in twins.values() if t is not None and t not in rows}:
        model = cenet.create_model(twin)
        rows[twin] = (sum(p.numel() for p in model.parameters()), count_macs(model, args.size)[0])

    print(f"torch {torch.__version__}; eval, 1×3×{args.size}×{args.size}; MACs = "
          f"FlopCounterMode FLOPs / 2 (matmul and conv only)")
    head = (f"{'model':24} {'params M':>9} {'GMACs':>7} {'+% twin':>8} {'paper GF':>9} "
            f"{'paper +%':>9} {'authors +%':>11}")
    print(head)
    print("-" * len(head))
    for name in names:
        params, macs = rows[name]
        twin = twins[name]
        inc = f"{100 * (macs / rows[twin][1] - 1):+.2f}" if twin else ""
        paper = PAPER_GFLOPS.get(name)
        paper_twin = PAPER_GFLOPS.get(twin) if twin else None
        p_inc = f"{100 * (paper / paper_twin - 1):+.2f}" if paper and paper_twin else ""
        authors = f"{AUTHORS_INCREASE[name]:+.1f}" if name in AUTHORS_INCREASE else ""
        print(f"{name:24} {params / 1e6:9.3f} {macs / 1e9:7.3f} {inc:>8} "
              f"{'' if paper is None else f'{paper:.2f}':>9} {p_inc:>9} {authors:>11}")

    if breakdown:
        print()
        print("Where the CE variants' extra MACs go (M MACs; % of the plain twin's MACs)")
        head = (f"{'model':24} {'extra':>8} {'stem CE':>8} {'block CEs':>10} {'IR MLPs':>8} "
                f"{'stem %':>7} {'blocks %':>9}")
        print(head)
        print("-" * len(head))
        for name, parts in breakdown.items():
            twin = twins[name]
            if twin is None:
                continue
            base = rows[twin][1]
            extra = rows[name][1] - base
            print(f"{name:24} {extra / 1e6:8.1f} {parts['stem'] / 1e6:8.1f} "
                  f"{parts['blocks'] / 1e6:10.1f} {parts['ir_mlp'] / 1e6:8.2f} "
                  f"{100 * parts['stem'] / base:7.2f} {100 * parts['blocks'] / base:9.2f}")


if __name__ == "__main__":
    main()
