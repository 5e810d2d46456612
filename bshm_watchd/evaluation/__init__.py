"""The matting benchmark: aged composites with exact alpha truth, metrics, runner and report."""

from __future__ import annotations

from bshm_watchd.evaluation.composite import Case, load_pairs, make_cases, save_cases, truth_alpha
from bshm_watchd.evaluation.metrics import METRICS, Scores, score
from bshm_watchd.evaluation.report import render_markdown, to_json, write_report
from bshm_watchd.evaluation.runner import CaseResult, EvalResult, MatteFn, Summary, evaluate

__all__ = [
    "METRICS",
    "Case",
    "CaseResult",
    "EvalResult",
    "MatteFn",
    "Scores",
    "Summary",
    "evaluate",
    "load_pairs",
    "make_cases",
    "render_markdown",
    "save_cases",
    "score",
    "to_json",
    "truth_alpha",
    "write_report",
]
