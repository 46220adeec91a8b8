"""``seamlm`` command line: one sub-command per stage. Parses arguments, then calls the library."""

from __future__ import annotations

import argparse
import errno
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
    p.add_argument("--harmful", required=True, help="JSONL/CSV of harmful prompt + harmful response (H)")
    p.add_argument("--refusal", required=True, help="JSONL/CSV of harmful prompt + refusal (R)")
    p.add_argument("--benign", required=True, help="JSONL/CSV of benign prompt + response (B)")
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
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    trainer = SEAMTrainer(
        model, tokenizer, config, harmful=args.harmful, refusal=args.refusal, benign=args.benign,
        run_info={"model": args.model, "data_files": {"harmful": args.harmful, "refusal": args.refusal, "benign": args.benign}},
    )
    out = trainer.train(resume=args.resume)
    print(f"SEAM model written to {out}; per-step log: {Path(args.out) / 'log.jsonl'}")
    return 0


COMMANDS = {"defend": (_defend_parser, _run_defend)}


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
