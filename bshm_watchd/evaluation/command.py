"""``bshm-watchd eval``: score models × profiles through the real pipeline on aged composites."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from bshm_watchd.config import Config, Profile, default_config, load_config
from bshm_watchd.decode import Decoded
from bshm_watchd.engine.base import RGB8, Alpha, Matter
from bshm_watchd.evaluation.composite import load_pairs, make_cases, save_cases
from bshm_watchd.evaluation.report import render_markdown, write_report
from bshm_watchd.evaluation.runner import EvalResult, MatteFn, evaluate
from bshm_watchd.pipeline import Timings, finish_matte, prepare

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "portraits"


def pipeline_fn(matter: Matter, profile: Profile) -> MatteFn:
    """The whole scan path minus file I/O: analysis copy → model → refine + upsample → 8-bit matte."""

    def run(rgb: RGB8) -> Alpha:
        decoded = Decoded(rgb=rgb, alpha=None, bit_depth=8, format="EVAL", mode="RGB", orientation=1, pages=1)
        t = Timings()
        prepared = prepare(decoded, profile, t)
        matte = finish_matte(prepared, matter.predict(prepared.analysis), profile, t)
        out: Alpha = matte.astype(np.float32) / 255.0
        return out

    return run


def ablations(fused: Matter) -> list[tuple[str, Matter]]:
    """The fusion with one part off at a time, and with all off (the more confident model, as it is)."""
    from dataclasses import replace

    from bshm_watchd.engine.fusion import FusionMatter

    if not isinstance(fused, FusionMatter):
        raise TypeError(f"--ablate needs the fusion model, got {fused.name}")
    p = fused.params
    plain = replace(p, prefer_fine=(1.01, 0.0), small_base=(0.0, 1.01))  # no base-choice exception applies
    variants = [("no base rules", plain, True), ("no rvm", replace(p, matting=False), True),
                ("no large rvm copy", replace(p, matting_large=False), True),
                ("no mounts", replace(p, mounts=False), True), ("no strokes", replace(p, strokes=False), True),
                ("no denoise", replace(p, denoise=False), True),
                ("no half denoise", replace(p, denoise_half=0.0), True),
                ("no stretch", replace(p, stretch=False), True), ("no tiles", replace(p, tiles=False), True),
                ("no people crop", replace(p, crop_below=0.0), True),
                ("no fill", replace(p, fill=False), True),
                ("no cut", replace(p, cut=False), True), ("no gate", replace(p, gate=False), True),
                ("no extend", replace(p, extend=False), True), ("no complete", replace(p, complete=False), True),
                ("no prune", replace(p, prune=False), True),
                ("no steepen", replace(p, steepen=1.0), True),
                ("no band refine", p, False),
                ("pick only", replace(plain, mounts=False, strokes=False, denoise=False, stretch=False, tiles=False,
                                      crop_below=0.0, fill=False, cut=False, gate=False, extend=False,
                                      complete=False, prune=False, steepen=1.0, matting=False), False)]
    return [(f"fusion {name}", FusionMatter(fused.semantic, fused.fine, params, refine=refine, matting=fused.matting,
                                            matting_large=fused.matting_large))
            for name, params, refine in variants]


def add_eval_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser("eval", help="score the pipeline on aged composites with exact truth")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="folder with image/ + alpha/ pairs to composite (default: ../shared/data/portraits)")
    p.add_argument("--cases", type=Path, default=None,
                   help="a ready folder of image/ + alpha/ composites (e.g. from --save-cases): scored as-is")
    p.add_argument("-n", type=int, default=30, help="number of composites (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-side", type=int, default=1024)
    p.add_argument("--severity", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"))
    p.add_argument("--groups", type=float, default=0.0, metavar="P",
                   help="probability that a composite is a group of 2-3 portraits side by side (default 0)")
    p.add_argument("--model", action="append", default=None, help="repeatable (default: the config's model)")
    p.add_argument("--profile", action="append", default=None, help="repeatable (default: default)")
    p.add_argument("--baseline", action="store_true", help="also run isnet and selfie alone in the same run")
    p.add_argument("--ablate", action="store_true",
                   help="also run fusion with each of its parts switched off (what each part brings)")
    p.add_argument("--save-cases", type=Path, default=None)
    p.add_argument("-o", "--output_dir", "--output-dir", type=Path, default=Path("eval-out"))
    p.add_argument("-c", "--config", type=Path, default=None)
    p.add_argument("--model-dir", type=Path, default=None)
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    from bshm_watchd.engine.factory import build_matter
    from bshm_watchd.modelstore import ModelStore, default_model_dir

    cfg: Config = load_config(args.config) if args.config else default_config()
    store = ModelStore(args.model_dir or cfg.model_dir or default_model_dir())
    if args.cases is not None:
        cases = load_pairs(args.cases, args.max_side)
    else:
        cases = make_cases(args.data, args.n, args.seed, args.max_side, tuple(args.severity), args.groups)
    if args.save_cases is not None:
        save_cases(cases, args.save_cases)
    models = list(args.model or [cfg.model])
    if args.baseline:
        models += [m for m in ("isnet", "selfie") if m not in models]
    profiles = list(args.profile or ["default"])
    matters: dict[str, Matter] = {}
    results: list[EvalResult] = []
    for model in models:
        if model not in matters:
            matters[model] = build_matter(model, store, device=cfg.device, cpu_runtime=cfg.cpu_runtime)
        for name in profiles:
            label = model if len(profiles) == 1 else f"{model}/{name}"
            results.append(evaluate(cases, pipeline_fn(matters[model], cfg.profile(name)), label))
    if args.ablate:
        fused = matters.get("fusion") or build_matter("fusion", store, device=cfg.device,
                                                      cpu_runtime=cfg.cpu_runtime)
        for label, variant in ablations(fused):
            results.append(evaluate(cases, pipeline_fn(variant, cfg.profile(profiles[0])), label))
    title = f"bshm-watchd eval: {len(cases)} cases" + ("" if args.cases else f", seed {args.seed}")
    if args.cases is None and args.groups:
        title += f", groups {args.groups:g}"
    json_path, md_path = write_report(results, args.output_dir, title=title)
    print(render_markdown(results, title=title))
    print(f"\nreport: {md_path} and {json_path}")
    return 0
