"""``cenet analyze``: measurements, figures and a report of one trained run (CE paper
Sec. 5.2, appendix F)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``analyze`` sub-command to ``sub``."""
    p = sub.add_parser(
        "analyze",
        help="analyze a trained run: inhibited channels, γ/β, ablation, magnitude, correlation",
        description=(
            "Load a checkpoint (RUN_DIR/best.pt, or the file given) with its stored config, "
            "rebuild the model and the test loader, and write analysis.json, PNG figures and "
            "report.md (or .html) into --out (default RUN_DIR/analysis/)."
        ),
    )
    p.add_argument("path", metavar="RUN_DIR_or_CHECKPOINT", help="run directory or .pt file")
    p.add_argument("--out", metavar="DIR", help="output directory (default RUN_DIR/analysis)")
    p.add_argument("--data", metavar="PATH", help="data path (default: the stored one)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the stored ones)")
    p.add_argument(
        "--batches",
        type=int,
        metavar="N",
        help="use only the first N test batches (default: the whole test set)",
    )
    p.add_argument(
        "--ablation-repeats",
        type=int,
        default=5,
        metavar="K",
        help="random ablation repeats (default 5)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=1e-2,
        help="inhibition threshold on the mean |activation| (default 1e-2)",
    )
    p.add_argument(
        "--layers",
        nargs="+",
        metavar="GLOB",
        help="module-name globs of the measured outputs (default every rectifier)",
    )
    p.add_argument(
        "--ablation-layers",
        nargs="+",
        metavar="GLOB",
        help="module-name globs of the ablated outputs (default the third measured "
        "output: the third conv layer's rectified output)",
    )
    p.add_argument(
        "--format", choices=("md", "html"), default="md", help="report format (default md)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``cenet analyze`` and print a short summary and the output path. Errors propagate
    to :func:`cenet.cli.main`."""
    from cenet.report import analyze_run  # matplotlib is imported only when needed

    report = analyze_run(
        args.path,
        out=args.out,
        data=args.data,
        threads=args.threads,
        max_batches=args.batches,
        ablation_repeats=args.ablation_repeats,
        threshold=args.threshold,
        layers=args.layers,
        ablation_layers=args.ablation_layers,
        fmt=args.format,
    )
    a = report.analysis
    src, inh, ab = a["source"], a["inhibited"], a["ablation"]
    print(f"analyzed {src['checkpoint']} ({src['model']}, epoch {src['epoch']})")
    print(f"test top-1 {a['test']['top1']:.2f}% on {a['test']['num_samples']} images")
    print(
        f"inhibited channels {100 * inh['ratio']:.2f}% (first {len(inh['averaged'])} "
        f"rectified outputs, threshold {inh['threshold']:g})"
    )
    print(
        f"BN |γ|<0.1 {100 * a['norm_params']['overall']['gamma_small']:.2f}%  "
        f"β≤0 {100 * a['norm_params']['overall']['beta_nonpositive']:.2f}%"
    )
    print(
        f"ablation AUC {ab['random']['area']:.4f} random, {ab['importance']['area']:.4f} "
        f"importance ({', '.join(ab['layers'])})"
    )
    print(f"wrote {report.out_dir}")
    return 0
