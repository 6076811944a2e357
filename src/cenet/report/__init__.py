"""Reports of trained runs: the analysis of one run (:func:`analyze_run`) and the comparison
of several (:func:`compare_runs`), as JSON, PNG figures and Markdown/HTML tables."""

from cenet.report.analyze import AnalysisReport, analyze_model, analyze_run, resolve_checkpoint
from cenet.report.compare import Comparison, compare_runs

__all__ = [
    "AnalysisReport",
    "Comparison",
    "analyze_model",
    "analyze_run",
    "compare_runs",
    "resolve_checkpoint",
]
