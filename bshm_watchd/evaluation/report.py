"""Benchmark reports: a JSON-ready dict and Markdown tables comparing labelled results side by side."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bshm_watchd.evaluation.runner import AGGREGATED, CaseResult, EvalResult
from bshm_watchd.fsutil import write_bytes_atomic

UNITS = {
    "sad": "sum |pred - true| / 1000, normalised to one megapixel (= 1000 x mean absolute error)",
    "soft_sad": "SAD over pixels within 7 px of the true soft band (0 < alpha < 1), per megapixel of the image",
    "mse": "plain mean squared error (Markdown tables show it x1e3)",
    "grad": "gradient error (Gaussian-derivative filters, sigma 1.4) / 1000, per megapixel",
    "conn": "connectivity error (step 0.1, theta 0.15) / 1000, per megapixel",
    "seconds": "wall time of the matte call alone, per case",
}

# (header, quantity, statistic, scale, format) of the summary table, in column order.
_COLUMNS: tuple[tuple[str, str, str, float, str], ...] = (
    ("SAD mean", "sad", "mean", 1.0, "{:.1f}"),
    ("SAD median", "sad", "median", 1.0, "{:.1f}"),
    ("SAD worst", "sad", "worst", 1.0, "{:.1f}"),
    ("soft SAD mean", "soft_sad", "mean", 1.0, "{:.1f}"),
    ("soft SAD median", "soft_sad", "median", 1.0, "{:.1f}"),
    ("soft SAD worst", "soft_sad", "worst", 1.0, "{:.1f}"),
    ("MSE×1e3 mean", "mse", "mean", 1e3, "{:.2f}"),
    ("grad mean", "grad", "mean", 1.0, "{:.1f}"),
    ("conn mean", "conn", "mean", 1.0, "{:.1f}"),
    ("s/scan", "seconds", "mean", 1.0, "{:.2f}"),
)


def result_to_dict(result: EvalResult) -> dict[str, Any]:
    """One result: label, case count, mean/median/worst per quantity, and every case."""
    agg = result.aggregate()
    return {
        "label": result.label,
        "n": len(result.cases),
        "aggregate": {q: {"mean": s.mean, "median": s.median, "worst": s.worst} for q, s in agg.items()},
        "cases": [c.as_dict() for c in result.cases],
    }


def result_from_dict(data: dict[str, Any]) -> EvalResult:
    """Inverse of ``result_to_dict`` (the aggregate is recomputed from the cases)."""
    return EvalResult(str(data["label"]), tuple(CaseResult.from_dict(c) for c in data["cases"]))


def to_json(results: Sequence[EvalResult]) -> dict[str, Any]:
    """The whole report as a JSON-ready dict: units, then one entry per labelled result."""
    return {"units": dict(UNITS), "results": [result_to_dict(r) for r in results]}


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown_summary(results: Sequence[EvalResult]) -> str:
    """One row per label: mean/median/worst SAD and soft-band SAD, MSE×1e3, grad, conn, s/scan.

    With several labels the best (lowest) value of each column is bold.
    """
    aggs = [r.aggregate() for r in results]
    cells = [[fmt.format(getattr(a[q], stat) * scale) for _, q, stat, scale, fmt in _COLUMNS] for a in aggs]
    if len(results) > 1:
        for j, (_, q, stat, _, _) in enumerate(_COLUMNS):
            vals = [getattr(a[q], stat) for a in aggs]
            for i, v in enumerate(vals):
                if v == min(vals):
                    cells[i][j] = f"**{cells[i][j]}**"
    rows = [[r.label, str(len(r.cases)), *c] for r, c in zip(results, cells, strict=True)]
    return _table(["method", "n", *(c[0] for c in _COLUMNS)], rows)


def markdown_per_case(results: Sequence[EvalResult]) -> str:
    """One row per case (in first-seen order), SAD and soft-band SAD of each label side by side."""
    by_label = [{c.name: c for c in r.cases} for r in results]
    names = list(dict.fromkeys(c.name for r in results for c in r.cases))
    rows = []
    for name in names:
        row = [name]
        for cases in by_label:
            c = cases.get(name)
            row += [f"{c.scores.sad:.1f}", f"{c.scores.soft_sad:.1f}"] if c else ["–", "–"]
        rows.append(row)
    header = ["case"] + [f"{r.label} {m}" for r in results for m in ("SAD", "soft SAD")]
    return _table(header, rows)


def render_markdown(results: Sequence[EvalResult], title: str = "Matting benchmark") -> str:
    """Title, units, the summary table and the per-case table."""
    if not results:
        raise ValueError("no results to report")
    units = "\n".join(f"- `{q}`: {UNITS[q]}" for q in AGGREGATED)
    return (
        f"# {title}\n\n{units}\n\n## Summary\n\n{markdown_summary(results)}\n\n"
        f"## Per case\n\n{markdown_per_case(results)}\n"
    )


def write_report(results: Sequence[EvalResult], out_dir: Path, title: str = "Matting benchmark") -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir`` (atomically); returns their paths."""
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    write_bytes_atomic(json_path, json.dumps(to_json(results), indent=1).encode())
    write_bytes_atomic(md_path, render_markdown(results, title).encode())
    return json_path, md_path
