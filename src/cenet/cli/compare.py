"""``cenet compare``: tables and overlaid figures of several runs."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``compare`` sub-command to ``sub``."""
    p = sub.add_parser(
        "compare",
        help="compare runs: top-1, inhibited ratio, ablation AUC, parameters, time",
        description=(
            "Read each run's config.yaml, metrics.jsonl and analysis/analysis.json (written by "
            "'cenet analyze'; missing values are shown as -) and write comparison.md, "
            "comparison.json and overlaid figures into --out."
        ),
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories")
    p.add_argument(
        "--out", metavar="DIR", default="comparison", help="output directory (default ./comparison)"
    )
    p.add_argument(
        "--labels",
        nargs="+",
        metavar="LABEL",
        help="one label per run (default the run directory names)",
    )
    p.add_argument(
        "--sweep",
        metavar="KEY",
        help="a config key the runs vary (e.g. label_noise, weight_decay): average per model "
        "and value, and plot top-1 and inhibited ratio against it",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``cenet compare`` and print the table and the output path. Errors propagate to
    :func:`cenet.cli.main`."""
    from cenet.report import compare_runs  # matplotlib is imported only when needed

    result = compare_runs(args.runs, out=args.out, labels=args.labels, sweep=args.sweep)
    for row in result.rows:
        final = "-" if row["final_top1"] is None else f"{row['final_top1']:.2f}%"
        inh = "-" if row["inhibited_ratio"] is None else f"{row['inhibited_ratio']:.2f}%"
        print(
            f"{row['label']}: {row['model']} seed {row['seed']}  final top-1 {final}  "
            f"inhibited {inh}"
        )
    print(f"wrote {result.out_dir}")
    return 0
