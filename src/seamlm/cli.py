"""``seamlm`` command line: one sub-command per stage. Parses arguments, then calls the library."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from pathlib import Path

from seamlm import __version__
from seamlm.config import parse_overrides
from seamlm.errors import ConfigError, SeamError

log = logging.getLogger("seamlm")


def _defend_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "defend",
        help="harden a model with SEAM",
        description="Harden a model with SEAM. Any DefenseConfig field can be given as --key value "
        "(e.g. --steps 5 --beta 0.1); it overrides --config. Unknown keys are errors.",
    )
    p.add_argument("--model", required=True, help="hub id, local HF directory, .gguf file, or alias (smollm2-135m-instruct)")
    p.add_argument("--data", help="a bundle name (e.g. offline-default) or a directory from `seamlm data build`; "
                   "replaces --harmful/--refusal/--benign")
    p.add_argument("--harmful", help="JSONL/CSV of harmful prompt + harmful response (H)")
    p.add_argument("--refusal", help="JSONL/CSV of harmful prompt + refusal (R)")
    p.add_argument("--benign", help="JSONL/CSV of benign prompt + response (B)")
    p.add_argument("--out", required=True, help="output directory (log, checkpoints, model/)")
    p.add_argument("--config", help="YAML file of DefenseConfig fields")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", default="float32", help="dtype to load the weights in (training keeps fp32 masters)")


def _run_defend(args: argparse.Namespace, extra: list[str]) -> int:
    from seamlm.defense import DefenseConfig, SEAMTrainer
    from seamlm.models import load_model

    overrides: dict[str, object] = dict(parse_overrides(extra))
    overrides["output_dir"] = args.out
    config = (
        DefenseConfig.from_yaml(args.config, overrides) if args.config else DefenseConfig.from_dict(overrides, "command line")
    )
    files = {"harmful": args.harmful, "refusal": args.refusal, "benign": args.benign}
    if args.data and any(files.values()):
        raise ConfigError("give either --data or --harmful/--refusal/--benign, not both")
    run_info: dict[str, object] = {"model": args.model}
    if args.data:
        from seamlm.data.bundles import resolve_data

        bundle = resolve_data(args.data, seed=config.seed)
        streams: dict[str, object] = {k: bundle.streams[k] for k in files}
        run_info.update(data=args.data, data_counts=bundle.counts())
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "data_manifest.json").write_text(json.dumps(bundle.manifest, indent=2))
    else:
        missing = [f"--{k}" for k, v in files.items() if not v]
        if missing:
            raise ConfigError(f"missing {', '.join(missing)} (or pass --data offline-default)")
        streams = dict(files)
        run_info["data_files"] = files
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    trainer = SEAMTrainer(model, tokenizer, config, run_info=run_info, **streams)
    out = trainer.train(resume=args.resume)
    print(f"SEAM model written to {out}; per-step log: {Path(args.out) / 'log.jsonl'}")
    return 0


def _data_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="list data sources, build named bundles, self-distil benign answers")
    acts = p.add_subparsers(dest="action", required=True)
    acts.add_parser("list", help="sources and bundles with sizes, licences and offline availability")
    b = acts.add_parser("build", help="build a named bundle into a directory (JSONL per stream + manifest.json)")
    b.add_argument("bundle", help="bundle name, e.g. offline-default")
    b.add_argument("--out", required=True)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--holdout-categories", default="",
                   help="comma-separated harm categories kept out of the defence set (cross-category test)")
    d = acts.add_parser("distill", help="answer prompts greedily with a model (benign answers), cached by model hash")
    d.add_argument("--model", required=True)
    d.add_argument("--prompts", required=True, help="JSONL/CSV with a prompt column")
    d.add_argument("--out", required=True, help="output JSONL with prompt/response")
    d.add_argument("--cache-dir", default="cache/distill")
    d.add_argument("--max-new-tokens", type=int, default=128)
    d.add_argument("--batch-size", type=int, default=8)


def _run_data(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise ConfigError(f"unexpected arguments {extra}")
    if args.action == "list":
        from seamlm.data.bundles import BUNDLES
        from seamlm.data.sources import SOURCES

        print("| source | kind | rows | licence | origin | available here |")
        print("|---|---|---|---|---|---|")
        for name, src in SOURCES.items():
            ok = src.offline and src.available()
            rows = str(len(src.load())) if ok else "–"
            where = "yes (offline)" if ok else ("hub: needs `datasets` or path=" if not src.offline else "no: run make setup")
            print(f"| {name} | {src.kind} | {rows} | {src.licence} | {src.origin} | {where} |")
        print("\nbundles:")
        for name, bundle in BUNDLES.items():
            print(f"  {name}: {bundle.description}")
        return 0
    if args.action == "build":
        from seamlm.data.bundles import build_bundle

        cats = tuple(c.strip() for c in args.holdout_categories.split(",") if c.strip())
        bundle = build_bundle(args.bundle, seed=args.seed, holdout_categories=cats)
        out = bundle.write(args.out)
        print(json.dumps(bundle.counts()))
        print(f"bundle '{args.bundle}' written to {out} (manifest: {out / 'manifest.json'})")
        return 0
    from seamlm.data.distill import distill_answers
    from seamlm.data.files import load_examples
    from seamlm.models import load_model

    prompts = [e.prompt for e in load_examples(args.prompts, require_response=False)]
    model, tok = load_model(args.model)
    rows = distill_answers(model, tok, prompts, args.cache_dir, args.max_new_tokens, args.batch_size)
    with open(args.out, "w", encoding="utf-8") as f:
        for e in rows:
            f.write(json.dumps({"prompt": e.prompt, "response": e.response, "source": e.source}) + "\n")
    print(f"{len(rows)} answers written to {args.out}")
    return 0


COMMANDS = {"defend": (_defend_parser, _run_defend), "data": (_data_parser, _run_data)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seamlm", description="SEAM self-destructive language models.")
    parser.add_argument("--version", action="version", version=f"seamlm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for make, _ in COMMANDS.values():
        make(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("transformers", "huggingface_hub", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return COMMANDS[args.command][1](args, extra)
    except ConfigError as exc:
        print(f"seamlm {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    except SeamError as exc:
        print(f"seamlm {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        print(f"seamlm {args.command}: error: the disk is full ({exc.filename or exc}). Free space and rerun "
              f"with --resume to continue from the last checkpoint.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"seamlm {args.command}: interrupted; rerun with --resume to continue from the last checkpoint",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
