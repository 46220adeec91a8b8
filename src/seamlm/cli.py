"""``seamlm`` command line: one sub-command per stage. Parses arguments, then calls the library."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from seamlm import __version__
from seamlm.config import check_seed, parse_overrides, unknown_keys
from seamlm.errors import ConfigError, SeamError

log = logging.getLogger("seamlm")


class _ListDefenses(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001 (argparse API)
        from seamlm.defense import DEFENSES

        for name in sorted(DEFENSES, key=lambda n: (n != "seam", n)):  # the default first, then by name
            cls = DEFENSES[name]
            print(f"{name:12s} {cls.summary}\n{'':12s} trains on: {', '.join(cls.streams)}; config: "
                  f"{cls.Config.__name__}{'; --resume from checkpoints' if cls.resumable else ''}")
        parser.exit()


def _defend_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "defend",
        help="harden a model with a defence (SEAM by default)",
        description="Harden a model with a registered defence (--method, default seam; --list-methods shows them). "
        "Any field of the defence's config (SEAM: DefenseConfig) can be given as --key value (e.g. --steps 5 "
        "--beta 0.1); it overrides --config. Unknown keys are errors.",
    )
    p.add_argument("--model", required=True, help="hub id, local HF directory, .gguf file, or alias (smollm2-135m-instruct)")
    p.add_argument("--method", default="seam", help="the defence (default seam; --list-methods shows them all)")
    p.add_argument("--list-methods", "--list_methods", nargs=0, action=_ListDefenses,
                   help="list the registered defences, the streams they train on and their config")
    p.add_argument("--data", help="a bundle name (e.g. offline-default) or a directory from `seamlm data build`; "
                   "replaces --harmful/--refusal/--benign")
    p.add_argument("--data-seed", "--data_seed", type=_seed, default=0,
                   help="split seed when --data names a bundle (use the same one for defend, attack and eval)")
    p.add_argument("--harmful", help="JSONL/JSON/CSV/Parquet of harmful prompt + harmful response (H)")
    p.add_argument("--refusal", help="JSONL/JSON/CSV/Parquet of harmful prompt + refusal (R)")
    p.add_argument("--benign", help="JSONL/JSON/CSV/Parquet of benign prompt + response (B)")
    p.add_argument("--out", required=True, help="output directory (log, checkpoints, model/)")
    p.add_argument("--config", help="YAML file of the defence's config fields")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", default="float32",
                   help="dtype to load the weights in (default float32 on every device: on a GPU SEAM still computes "
                        "L_ul/L_up in bf16, --compute_dtype auto, over fp32 weights; with auto or bfloat16 SEAM "
                        "converts the weights to fp32 for training, so only loading is lighter, and saves in bf16; "
                        "refusal-sft trains in this dtype)")


def _run_defend(args: argparse.Namespace, extra: list[str]) -> int:
    from seamlm.defense import defense_class
    from seamlm.distributed import current_context, load_model_for_rank
    from seamlm.runinfo import folder_lock

    defense_cls = defense_class(args.method)
    _check_model_option(args.model, args.dtype)
    ctx = current_context(args.device)  # one process, or this rank under accelerate launch / torchrun
    overrides: dict[str, object] = dict(parse_overrides(extra))
    if "output_dir" in overrides:
        raise ConfigError("give the output folder as --out, not --output_dir")
    if args.config:
        from seamlm.config import read_yaml_mapping

        defense_cls.Config.check_keys(overrides, "command line")  # a typo there is not the YAML file's
        config = defense_cls.configure({**read_yaml_mapping(args.config), **overrides}, str(args.config), args.out)
    else:
        config = defense_cls.configure(overrides, "command line", args.out)
    if ctx.is_main:  # (the job's ranks share the folder; two jobs never: they would mix one log and one model/)
        args.held.enter_context(folder_lock(Path(args.out), args.command))
    defense_cls.check_out(args.out, args.resume)  # before the data manifest is written or the model loaded
    if args.resume:
        defense_cls.check_resume(args.out, config)  # a changed setting fails now, not after the model loads
    defense_cls.check_device(config, ctx.device)
    defense = defense_cls(config)
    files = {"harmful": args.harmful, "refusal": args.refusal, "benign": args.benign}
    if args.data and any(files.values()):
        raise ConfigError("give either --data or --harmful/--refusal/--benign, not both")
    from seamlm.models import model_identity

    run_info: dict[str, object] = {"model": args.model,  # (the weights digest only where run.json is written)
                                   "model_identity": model_identity(args.model) if ctx.is_main else None,
                                   "dtype": args.dtype, "device_option": args.device, "argv": args.argv}
    if args.data:
        from seamlm.data.bundles import resolve_data

        _warn_unused_data_seed(args)
        bundle = resolve_data(args.data, seed=args.data_seed)
        streams: dict[str, object] = {k: bundle.streams[k] for k in defense_cls.streams}
        run_info.update(data=args.data, data_seed=bundle.manifest.get("seed"), data_counts=bundle.counts())
        if ctx.is_main:
            manifest_path = Path(args.out) / "data_manifest.json"
            if args.resume and manifest_path.is_file():
                _refuse_other_data(manifest_path, bundle.manifest)  # before the run's own manifest is replaced
    else:
        if args.data_seed:
            log.warning("--data-seed %d is not used: --harmful/--refusal/--benign are taken as given", args.data_seed)
        missing = [f"--{k}" for k in defense_cls.streams if not files[k]]
        if missing:
            raise ConfigError(f"missing {', '.join(missing)} (or pass --data offline-default)")
        unused = [f"--{k}" for k, v in files.items() if v and k not in defense_cls.streams]
        if unused:
            raise ConfigError(f"defence {args.method} trains on {', '.join(defense_cls.streams)} only: drop "
                              f"{', '.join(unused)}")
        given = {k: files[k] for k in defense_cls.streams}
        run_info["data_files"] = given
        # read and checked now: a missing file or a wrong column fails before the model loads (minutes for a 7B)
        streams = defense.examples(given)
    shard = bool(getattr(config, "shard_parameters", False))
    model, tokenizer = load_model_for_rank(args.model, ctx, args.dtype, args.device, shard)
    if args.data and ctx.is_main:  # once the model has loaded: a model that fails to load leaves no folder behind
        from seamlm.jsonl import write_text_atomic

        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(args.out) / "data_manifest.json", json.dumps(bundle.manifest, indent=2))
    out = defense.run(model, tokenizer, streams, args.out, resume=args.resume, run_info=run_info, ctx=ctx)
    if ctx.is_main:
        print(f"{args.method} model written to {out}; per-step log: {Path(args.out) / 'log.jsonl'}")
    return 0


def _refuse_other_data(path: Path, now: dict) -> None:
    """``--resume`` on other data than the unfinished run's (its ``data_manifest.json``) is refused, naming what
    differs; the trainer would refuse it later by the data fingerprint, after the manifest had been replaced."""
    try:
        then = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--resume: {path} is unreadable ({exc}); the run's data cannot be checked: start the run "
                          "again in another --out") from None
    differ = sorted(k for k in then.keys() | now.keys() if then.get(k) != now.get(k))
    if differ:
        shown = ", ".join(f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in differ if k in ("bundle", "seed",
                          "holdout_categories", "sizes", "sources"))
        raise ConfigError(f"--resume: {path.parent} was trained on other data (its data_manifest.json differs in "
                          f"{', '.join(differ)}{'; ' + shown if shown else ''}): resume with the run's --data and "
                          "--data-seed (and the bundle's build options)")


def _warn_unused_data_seed(args: argparse.Namespace) -> None:
    if args.data_seed and Path(args.data).is_dir():
        log.warning("--data-seed %d is not used: %s is a built bundle, split when it was built (its manifest's seed "
                    "holds)", args.data_seed, args.data)


def _data_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="list data sources, build named bundles, self-distil benign answers")
    acts = p.add_subparsers(dest="action", required=True)
    acts.add_parser("list", help="sources and bundles with sizes, licences and offline availability")
    b = acts.add_parser("build", help="build a named bundle into a directory (JSONL per stream + manifest.json)")
    b.add_argument("bundle", help="bundle name, e.g. offline-default")
    b.add_argument("--out", required=True)
    b.add_argument("--seed", type=_seed, default=0)
    b.add_argument("--holdout-categories", "--holdout_categories", default="",
                   help="comma-separated harm categories kept out of the defence set (cross-category test); a "
                        "name holding commas (BeaverTails: violence,aiding_and_abetting,incitement) is recognised whole")
    b.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a bundle option, repeatable (e.g. beavertails: train_path=FILE test_path=FILE "
                        "refusals_path=FILE benign_path=FILE defense_size=N; an unknown key lists them)")
    d = acts.add_parser("distill", help="answer prompts greedily with a model (benign answers), cached by model hash")
    d.add_argument("--model", required=True)
    d.add_argument("--prompts", required=True, help="JSONL/JSON/CSV/Parquet with a prompt column")
    d.add_argument("--out", required=True, help="output JSONL with prompt/response")
    d.add_argument("--cache-dir", "--cache_dir", help="default: $SEAMLM_CACHE_DIR/distill, else ./cache/distill")
    d.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=128)
    d.add_argument("--batch-size", "--batch_size", type=int, default=8)


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
            where = ("yes (offline)" if ok else "file: needs path=" if src.needs_path
                     else "hub: needs `datasets` or path=" if not src.offline else "no: run make setup")
            print(f"| {name} | {src.kind} | {rows} | {src.licence} | {src.origin} | {where} |")
        print("\nbundles:")
        for name, bundle in BUNDLES.items():
            print(f"  {name}: {bundle.description}")
        return 0
    if args.action == "build":
        from seamlm.data.bundles import build_bundle, bundle_options, check_bundle_target

        check_bundle_target(args.out)  # before the build, not after it
        cats = tuple(c.strip() for c in args.holdout_categories.split(",") if c.strip())
        bundle = build_bundle(args.bundle, seed=args.seed, holdout_categories=cats,
                              **bundle_options(args.bundle, args.option))
        out = bundle.write(args.out)
        print(json.dumps(bundle.counts()))
        print(f"bundle '{args.bundle}' written to {out} (manifest: {out / 'manifest.json'})")
        return 0
    from seamlm.data.distill import check_out_file, distill_answers, write_answers
    from seamlm.data.files import load_examples
    from seamlm.models import load_model
    from seamlm.packages import cache_dir

    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise ConfigError("--max-new-tokens and --batch-size must be >= 1")
    if Path(args.out).is_dir():  # found now, not after the model answered every prompt
        raise ConfigError(f"--out {args.out} is a folder; give the JSONL file to write (e.g. {args.out}/benign.jsonl)")
    check_out_file(args.prompts, args.out)
    prompts = [e.prompt for e in load_examples(args.prompts, require_response=False)]
    model, tok = load_model(args.model)
    rows = distill_answers(model, tok, prompts, args.cache_dir or cache_dir("distill"), args.max_new_tokens, args.batch_size)
    if not rows:
        raise SeamError(f"self-distillation: all {len(prompts)} answers of {args.model} were empty; nothing written to "
                        f"{args.out}. A model that answers nothing cannot supply benign answers: use another --model")
    write_answers(args.out, rows)
    print(f"{len(rows)} answers written to {args.out}")
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the model to evaluate/attack (alias, .gguf, HF dir or hub id)")
    p.add_argument("--label", help="name of this model in the results (default: the --model value)")
    p.add_argument("--defense", help="defence that produced the model, as the result rows name it (default: the "
                   "method a seamlm-defended model records — seam, refusal-sft, … — else none)")
    p.add_argument("--data", default="offline-default", help="bundle name or built bundle directory")
    p.add_argument("--data-seed", "--data_seed", type=_seed, default=0,
                   help="split seed when --data names a bundle (the one the defence used)")
    p.add_argument("--out", required=True, help="directory: results.jsonl, samples, attack loss logs")
    p.add_argument("--eval-config", "--eval_config", help="YAML of EvalConfig fields")


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="measure HS, ZS, coherence (and FS) of a model before any attack",
                       description="EvalConfig fields as --key value (e.g. --judge keyword --zs_limit 100 --fs true).")
    _model_args(p)


class _ListRecipes(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001 (argparse API)
        from seamlm.recipes import RECIPES

        for name, cls in RECIPES.items():
            knobs = ", ".join(f"{k}={v}" for k, v in cls.Knobs().to_dict().items()) or "none"
            print(f"{name:13s} {cls.summary}\n{'':13s} knobs (--recipe.KEY VALUE): {knobs}")
        parser.exit()


def _attack_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attack", help="harmful fine-tuning grid (lr x seed) with a recipe, each cell evaluated; resumable",
                       description="AttackConfig fields as --key value (e.g. --learning_rates 2e-5,2e-4 --lora true "
                       "--max_grad_norm 1.0); the recipe's knobs as --recipe.key value (e.g. --recipe pcgrad "
                       "--recipe.per_tensor true); EvalConfig fields as --eval.key value (e.g. --eval.zs_limit 50). "
                       "Finished cells are skipped.")
    _model_args(p)
    p.add_argument("--config", help="YAML of AttackConfig fields")
    p.add_argument("--recipe", default="sft", help="attack recipe (default sft; --list-recipes shows them all)")
    p.add_argument("--list-recipes", "--list_recipes", nargs=0, action=_ListRecipes, help="list the attack recipes and their knobs")
    p.add_argument("--no-pre", "--no_pre", action="store_true", help="skip the pre-attack evaluation")


def _split_overrides(extra: list[str], *prefixes: str) -> list[dict[str, str]]:
    """Overrides without a prefix first, then one dict per prefix (``eval.`` …) with the prefix removed."""
    over = parse_overrides(extra)
    parts = [{k[len(p):]: v for k, v in over.items() if k.startswith(p)} for p in prefixes]
    return [{k: v for k, v in over.items() if not k.startswith(prefixes)}, *parts]


def _eval_setup(args: argparse.Namespace, eval_over: dict[str, str], check: Callable[[Any], None] | None = None):
    """The evaluation config, data bundle, judge and results store; ``check`` vets the config first, before the
    judge (which may train for minutes) or any file is made."""
    from seamlm.attack import manifest_digest
    from seamlm.data.bundles import resolve_data
    from seamlm.evaluate.metrics import EvalConfig
    from seamlm.jsonl import keep_record
    from seamlm.results import ResultStore
    from seamlm.runinfo import folder_lock

    cfg = EvalConfig.from_yaml(args.eval_config, eval_over) if args.eval_config else EvalConfig.from_dict(eval_over, "command line")
    if check is not None:
        check(cfg)
    if cfg.lm_eval_tasks:  # a wrong task name fails now, not after the first attack
        from seamlm.evaluate.zeroshot import lm_eval_task_manager

        lm_eval_task_manager(cfg.lm_eval_tasks, cfg.lm_eval_include_path or None)
    _check_model_option(args.model)
    _warn_unused_data_seed(args)
    bundle = resolve_data(args.data, seed=args.data_seed)
    # beside other attack/eval/sweep commands (each cell is locked alone), never beside a demo, adaptive or rescore
    args.held.enter_context(folder_lock(Path(args.out), args.command, shared=True))
    judge = cfg.make_judge()  # a judge that cannot load leaves no record of this data behind
    # a manifest put beside is named by the digest its result rows carry (data_manifest)
    keep_record(Path(args.out) / "data_manifest.json", json.dumps(bundle.manifest, indent=2),
                tag=manifest_digest(bundle))
    return cfg, bundle, judge, ResultStore(Path(args.out) / "results.jsonl")


def _check_model_option(model: str, dtype: str | None = None) -> None:
    """A mistyped --model path or alias, or --dtype, fails before --out is written."""
    from seamlm.models import resolve_dtype, resolve_model_source

    resolve_model_source(model)
    if dtype is not None:
        resolve_dtype(dtype, "cpu")


def _run_eval(args: argparse.Namespace, extra: list[str]) -> int:
    from seamlm.attack import evaluate_pre_attack

    def no_trajectory(cfg: Any) -> None:
        if cfg.trajectory_every:
            raise ConfigError("trajectory_every probes the model during an attack; `seamlm eval` runs none: set it "
                              "on `seamlm attack` (--eval.trajectory_every N)")

    cfg, bundle, judge, store = _eval_setup(args, parse_overrides(extra), no_trajectory)
    ran = evaluate_pre_attack(args.model, args.label or args.model, args.defense, bundle, cfg, judge, args.out, store)
    print(f"{'evaluated' if ran else 'already evaluated'}: results in {store.path}")
    return 0


def _run_attack(args: argparse.Namespace, extra: list[str]) -> int:
    from seamlm.attack import AttackConfig, check_eval_template, evaluate_pre_attack, run_attack_grid
    from seamlm.distributed import current_context, main_process_first
    from seamlm.jsonl import keep_record
    from seamlm.recipes import make_recipe
    from seamlm.runinfo import path_part

    ctx = current_context()  # one process, or this rank under accelerate launch / torchrun (data-parallel attack)
    attack_over, eval_over, knobs = _split_overrides(extra, "eval.", "recipe.")
    recipe = make_recipe(args.recipe, knobs)
    AttackConfig.refuse_grid_owned(attack_over)
    if args.config:
        from seamlm.config import read_yaml_mapping

        values = read_yaml_mapping(args.config)
        AttackConfig.check_keys(attack_over, "command line")
        AttackConfig.refuse_grid_owned(values, str(args.config))
        cfg = AttackConfig.from_dict({**values, **attack_over}, str(args.config))
    else:
        cfg = AttackConfig.from_dict(attack_over, "command line")
    recipe.check_launch(ctx, cfg)  # a launch it cannot train under fails now, not after the pre-attack evaluation
    if cfg.lora and recipe.trains:  # so does a LoRA target the model lacks (before any record of this grid is written)
        from seamlm.finetune import check_lora_targets
        from seamlm.models import model_skeleton

        skeleton = model_skeleton(args.model)
        check_lora_targets(skeleton, recipe.lora_config(skeleton, recipe.training_config(cfg)))
    with main_process_first(ctx):  # rank 0 writes the manifest and trains/caches the judge first
        # the template check before the pre-attack evaluation runs in it (and before the judge is made)
        eval_cfg, bundle, judge, store = _eval_setup(args, eval_over, lambda ev: check_eval_template(cfg, ev, recipe))
    label = args.label or args.model
    if ctx.is_main:
        keep_record(Path(args.out) / f"attack_config.{path_part(label)}.yaml", cfg.to_yaml_text(),
                    same=AttackConfig.same_record)
    if not args.no_pre:
        evaluate_pre_attack(args.model, label, args.defense, bundle, eval_cfg, judge, args.out, store, ctx)
    ran = run_attack_grid(args.model, label, args.defense, bundle, cfg, eval_cfg, judge, args.out, store, ctx, recipe)
    if ctx.is_main:
        print(f"{len(ran)} attack cell(s) run; results in {store.path}; `seamlm report {store.path} --out DIR` for the report")
    return 0


#: Fine-tuning fields a sweep searches (bounded through SweepConfig instead).
SEARCHED = ("lr", "optimizer", "max_grad_norm", "lr_scheduler", "warmup_ratio", "batch_size", "epochs", "seed")


def _sweep_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="Optuna search over attack recipes and hyper-parameters maximising HS (SQLite, "
                       "resumable)",
                       description="SweepConfig fields as --key value (e.g. --recipes sft,pcgrad --trials 20 --lr_max 1e-3);"
                       " fixed fine-tuning fields as --key value (e.g. --max_length 128 --lora true); EvalConfig fields "
                       "as --eval.key value. The study is OUT/sweep.db; rerunning resumes it.")
    _model_args(p)
    p.add_argument("--no-pre", "--no_pre", action="store_true", help="skip the pre-attack evaluation (the ε-bounded table needs it: skip only when it is in the results already)")


def _run_sweep(args: argparse.Namespace, extra: list[str]) -> int:
    from seamlm.attack import evaluate_pre_attack
    from seamlm.finetune import FinetuneConfig
    from seamlm.sweep import SweepConfig, run_sweep, study_lock, sweep_study

    over, eval_over = _split_overrides(extra, "eval.")
    valid = SweepConfig.field_names() + FinetuneConfig.field_names()
    unknown = [k for k in over if k not in valid]
    if unknown:
        raise ConfigError(f"unknown sweep key(s) {unknown_keys(unknown, valid)}. Sweep keys: {', '.join(SweepConfig.field_names())}; "
                          "fixed fine-tuning keys: "
                          f"{', '.join(k for k in FinetuneConfig.field_names() if k not in SEARCHED)}")
    sweep_over = {k: v for k, v in over.items() if k in SweepConfig.field_names()}
    ft_over = {k: v for k, v in over.items() if k not in sweep_over}
    searched = [k for k in ft_over if k in SEARCHED]
    if searched:
        raise ConfigError(f"{searched} are searched by the sweep; bound them with lr_min/lr_max, optimizers, "
                          f"batch_sizes, max_epochs, clip_norms, seed")
    cfg = SweepConfig.from_dict(sweep_over, "command line")
    base = FinetuneConfig.from_dict(ft_over, "command line")
    eval_cfg, bundle, judge, store = _eval_setup(args, eval_over)
    label = args.label or args.model
    with study_lock(cfg, label, args.out):
        # opened (and checked) first: a mismatch fails before the pre-attack evaluation
        study = sweep_study(args.model, label, bundle, cfg, base, eval_cfg, judge, args.out)
        if not args.no_pre:
            evaluate_pre_attack(args.model, label, args.defense, bundle, eval_cfg, judge, args.out, store)
        study = run_sweep(args.model, label, args.defense, bundle, cfg, base, eval_cfg, judge, args.out, store, study)
    best = study.best_trial
    print(f"sweep '{study.study_name}': {len(study.trials)} trials; highest HS {best.value:.1f} (trial {best.number}, "
          f"{best.params}); results in {store.path}; `seamlm report {store.path} --out DIR` for the ε-bounded table")
    return 0


def _adaptive_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adaptive", help="every attack recipe and a sweep against a finished demo's aligned and SEAM "
                       "models, with the worst-case report", description="AdaptiveConfig fields as --key value "
                       "(e.g. --sweep_trials 20 --recipes sft,pcgrad). Rerunning resumes.")
    p.add_argument("--out", default="runs/adaptive")


def _seed(text: str) -> int:
    """An argparse type: a seed every library here takes (an argparse usage error otherwise)."""
    try:
        return check_seed("a seed", int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a seed is a whole number, got {text!r}") from None
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _report_paths(report: Path) -> str:
    """The line that ends a command which wrote a report: where its Markdown, HTML and flat rows are."""
    return f"report: {report} (HTML: {report.with_suffix('.html')}; every row: {report.with_name('results.csv')})"


def _run_adaptive(args: argparse.Namespace, extra: list[str]) -> int:
    from seamlm.adaptive import AdaptiveConfig, run_adaptive

    report = run_adaptive(args.out, AdaptiveConfig.from_dict(parse_overrides(extra), "command line"))
    print(report.read_text())
    print(_report_paths(report))
    return 0


def _report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="Markdown/HTML report with tables and plots from a results file, or mean ± sd "
                       "over several runs of one setup")
    p.add_argument("results", nargs="+", help="results.jsonl (or its run folder); several: one setup's runs (e.g. "
                   "demos with different --data_seed) -> mean ± sd tables, the bar run by run, error-bar plots")
    p.add_argument("--out", required=True)
    p.add_argument("--eps", default=None, help="ZS-drop bounds (points) of the worst-case table (default 5,10,20)")
    p.add_argument("--ppl-factor", "--ppl_factor", type=float, default=None,
                   help="coherence bound of the worst-case table: perplexity ≤ this × the unattacked model's "
                   "(default 2)")


def _run_report(args: argparse.Namespace, extra: list[str]) -> int:
    from seamlm.report import write_report

    if extra:
        raise ConfigError(f"unexpected arguments {extra}")
    if len(args.results) > 1:
        from seamlm.across_runs import write_across_runs_report

        if args.eps is not None or args.ppl_factor is not None:
            raise ConfigError("--eps and --ppl-factor bound the worst-case table of one results file's adaptive "
                              "attacks; the report across runs has none: drop them, or report one file")
        path = write_across_runs_report(args.results, args.out)
    else:
        eps_text = args.eps if args.eps is not None else "5,10,20"
        ppl_factor = args.ppl_factor if args.ppl_factor is not None else 2.0
        try:
            eps = tuple(float(e) for e in eps_text.split(","))
        except ValueError:
            raise ConfigError(f"--eps needs comma-separated numbers, got {eps_text!r}") from None
        if not ppl_factor > 1 or not all(e >= 0 for e in eps):  # (a NaN compares false: it would bound nothing)
            raise ConfigError("--ppl-factor must be > 1 and --eps values >= 0")
        path = write_report(args.results[0], args.out, eps=eps, ppl_factor=ppl_factor)
    print(path.read_text())
    print(_report_paths(path))
    return 0


def _paired_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("paired", help="HS of two models paired prompt by prompt from saved answers: b − a ± its "
                       "standard error per cell, per run and over runs")
    p.add_argument("runs", nargs="+", help="run folders (demo, eval or attack --out), e.g. one per data seed")
    p.add_argument("--a", default="aligned", help="the reference model's label (default aligned)")
    p.add_argument("--b", default="seam", help="the model compared with it (default seam)")
    p.add_argument("--cells", default="pre,attacks", help="pre, attacks or both, comma-separated")
    p.add_argument("--out", help="also write the table to this Markdown file")


#: suffixes of the files runs are made of, never a Markdown --out
_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".yaml", ".yml", ".db", ".pt", ".safetensors", ".gguf")


def _run_paired(args: argparse.Namespace, extra: list[str]) -> int:
    from seamlm.paired import paired_hs, paired_markdown

    if extra:
        raise ConfigError(f"unexpected arguments {extra} (`seamlm paired --help`)")
    if args.a == args.b:
        raise ConfigError(f"--a and --b are both {args.a!r}: name two models of the runs (their labels in "
                          "results.jsonl)")
    cells = {c.strip() for c in args.cells.split(",") if c.strip()}
    if not cells or cells - {"pre", "attacks"}:
        raise ConfigError(f"--cells {args.cells!r}: give pre, attacks or pre,attacks")
    if args.out:  # before reading any run: the table is printed, but the file must be writable
        out = Path(args.out)
        if out.is_dir() or not out.parent.is_dir():
            raise ConfigError(f"--out {out}: give a file name in an existing folder (the Markdown table goes there)")
        if out.suffix.lower() in _DATA_SUFFIXES:  # e.g. a run's results.jsonl or samples file: it would be replaced
            raise ConfigError(f"--out {out}: the table is Markdown, and a {out.suffix} file is data seamlm reads "
                              "(results, samples, configs); give a .md file name")
    text = paired_markdown(paired_hs(args.runs, args.a, args.b, "pre" in cells, "attacks" in cells), args.a, args.b)
    print(text, end="")
    if args.out:
        from seamlm.jsonl import write_text_atomic

        write_text_atomic(args.out, text)
    return 0


def _rescore_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rescore", help="judge a finished run's saved answers again with another judge (HS rows, no "
                       "generation); the old results file is kept beside")
    p.add_argument("results", help="results.jsonl (or its run folder) of eval, attack, demo or adaptive")
    p.add_argument("--judge", default="minilm", help="judge name (minilm, beavertails, keyword; default minilm: the "
                   "current offline judge)")
    p.add_argument("--judge_model", "--judge-model", default="", help="the judge's model (e.g. a local copy of the "
                   "BeaverTails classifier)")


def _run_rescore(args: argparse.Namespace, extra: list[str]) -> int:
    from seamlm.evaluate.metrics import EvalConfig
    from seamlm.rescore import rescore

    if extra:
        raise ConfigError(f"unexpected arguments {extra} (`seamlm rescore --help`)")
    cfg = EvalConfig(judge=args.judge, judge_model=args.judge_model)
    changed = rescore(args.results, cfg)
    if not changed:
        print(f"nothing to rescore: every HS row of {args.results} is already judged this way")
        return 0
    width = max(len(f"{c.model}/{c.cell}") for c in changed)
    for c in changed:
        print(f"{c.model + '/' + c.cell:{width}}  HS {c.before:5.1f} ({c.old_judge}) -> {c.after:5.1f}")
    print(f"{len(changed)} cells rescored; `seamlm report {args.results} --out DIR` for the tables")
    return 0


def _judge_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("judge", help="train the offline harmfulness judge and print its held-out accuracy/AUC, or "
                       "check a judge against hand-labelled answers")
    p.add_argument("action", choices=["train", "check"], help="train: the offline head (cached) and its held-out "
                   "figures; check FILE: per label the mean score and rows above 0.5, and the AUC of 'harmful' "
                   "against the rest")
    p.add_argument("file", nargs="?", help="check: JSONL/CSV with prompt, answer (or response) and label columns "
                   "(e.g. tests/fixtures/judge_probe_real.jsonl)")
    p.add_argument("--judge", default="minilm", help="check: minilm (default), beavertails or keyword")
    p.add_argument("--judge_model", "--judge-model", default="", help="check: the judge's model (beavertails: a "
                   "local copy of the classifier or its Hub id)")
    p.add_argument("--cache-dir", "--cache_dir", help="default: $SEAMLM_CACHE_DIR/judges, else ./cache/judges (where "
                   "eval, attack and demo look)")
    p.add_argument("--seed", type=_seed, default=0)


def _run_judge(args: argparse.Namespace, extra: list[str]) -> int:
    from seamlm.evaluate.judges import MiniLMJudge

    if extra:
        raise ConfigError(f"unexpected arguments {extra} (`seamlm judge --help`)")
    if args.action == "check":
        from seamlm.evaluate.judges import JUDGES, judge_agreement, read_labelled_answers
        from seamlm.evaluate.metrics import EvalConfig

        if not args.file:
            raise ConfigError("`seamlm judge check FILE`: name the file of hand-labelled answers")
        if args.judge not in JUDGES:
            raise ConfigError(f"unknown judge '{args.judge}'; available: {', '.join(JUDGES)}")
        if args.judge == "minilm" and args.judge_model:
            raise ConfigError("--judge-model belongs to a judge with a model (beavertails), not minilm")
        if args.judge != "minilm" and (args.cache_dir or args.seed):
            raise ConfigError(f"--cache-dir and --seed belong to the minilm judge, not {args.judge}")
        labelled = read_labelled_answers(args.file)  # before the judge: a bad file fails at once, not after training
        if args.judge == "minilm":
            judge = MiniLMJudge(cache_dir=args.cache_dir, seed=args.seed)
        else:
            judge = EvalConfig(judge=args.judge, judge_model=args.judge_model).make_judge()
        print(json.dumps(judge_agreement(judge, labelled), indent=2))
        return 0
    if args.file or args.judge != "minilm" or args.judge_model:
        raise ConfigError("`seamlm judge train` takes no FILE, --judge or --judge-model: it trains the offline "
                          "minilm head")
    judge = MiniLMJudge(cache_dir=args.cache_dir, seed=args.seed)
    print(json.dumps({"judge": judge.name, **judge.metrics}, indent=2))
    return 0


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="align, defend, attack, evaluate and report on the embedded default model",
                       description="Runs every stage offline; rerunning skips finished stages and cells. DemoConfig "
                       "fields as --key value override the preset.")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--preset", choices=["quick", "full"], default="quick")
    p.add_argument("--fresh", action="store_true", help="delete --out (a demo folder) first and redo every stage of it (a --baseline_from demo's data and aligned model are reused, not redone)")
    p.add_argument("--seeds", help="comma-separated data seeds (e.g. 0,1,2): one demo per seed in OUT/seed-<s>, "
                   "then OUT/report across them (mean ± sd, the bar run by run); replaces --data_seed")


def _run_demo(args: argparse.Namespace, extra: list[str]) -> int:
    from seamlm.pipeline import PRESETS, DemoConfig, run_demo, run_demo_seeds

    over = parse_overrides(extra)
    DemoConfig.check_keys(over, "command line")
    cfg = DemoConfig.from_dict({**PRESETS[args.preset], **over}, f"preset {args.preset}")
    if args.seeds is not None:
        if "data_seed" in over:
            raise ConfigError("give the seeds either as --seeds or as --data_seed, not both")
        try:
            seeds = [check_seed("--seeds", int(s)) for s in args.seeds.split(",")]
        except ValueError:
            raise ConfigError(f"--seeds needs comma-separated integers, got {args.seeds!r}") from None
        report = run_demo_seeds(args.out, cfg, seeds, fresh=args.fresh)
    else:
        report = run_demo(args.out, cfg, fresh=args.fresh)
    print(report.read_text())
    print(_report_paths(report))
    return 0


COMMANDS = {
    "demo": (_demo_parser, _run_demo),
    "defend": (_defend_parser, _run_defend), "data": (_data_parser, _run_data), "eval": (_eval_parser, _run_eval),
    "attack": (_attack_parser, _run_attack), "sweep": (_sweep_parser, _run_sweep),
    "adaptive": (_adaptive_parser, _run_adaptive), "report": (_report_parser, _run_report), "judge": (_judge_parser, _run_judge),
    "rescore": (_rescore_parser, _run_rescore), "paired": (_paired_parser, _run_paired),
}


#: Commands that would only duplicate their work (and race on their output files) under a multi-process launcher.
SINGLE_PROCESS = {"demo", "eval", "data", "report", "judge", "sweep", "adaptive", "rescore", "paired"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seamlm", description="SEAM self-destructive language models.")
    parser.add_argument("--version", action="version", version=f"seamlm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for make, _ in COMMANDS.values():
        make(sub)
    for each in _parsers(parser):
        # No prefix matching: ``demo --seed 3`` must not be read as ``--seeds 3``, and a config key (``--key value``,
        # passed through) must never be taken for an option it starts.
        each.allow_abbrev = False
        for action in each._actions:
            if type(action) is argparse._StoreAction and action.option_strings:
                action.__class__ = _StoreOnce
    return parser


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every sub-command's parser under it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


class _StoreOnce(argparse._StoreAction):
    """An option given twice is a usage error (argparse keeps the later value silently, as ``--key value`` overrides
    given twice are refused): ``--out a … --out b`` or a second ``--harmful`` is a mistake to show, not to guess."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        given = namespace.__dict__.setdefault("_options_given", set())
        if self.dest in given:
            raise argparse.ArgumentError(self, f"given twice (the second: {values!r}): give it once")
        given.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


def _defense_label(model: str, given: str | None) -> str:
    """``--defense`` as given, else the method a model saved by ``seamlm defend`` records, else ``none``."""
    from seamlm.models import recorded_defense

    recorded = recorded_defense(model)
    if given is None:
        return recorded or "none"
    if recorded and given != recorded:
        log.warning("--defense %s, but %s records that `seamlm defend --method %s` made it: the rows say %s",
                    given, model, recorded, given)
    return given


def _refuse_empty_out(args: argparse.Namespace) -> None:
    """Every command's ``--out`` (a folder or a file) must name something: an empty one is the current folder."""
    out = getattr(args, "out", None)
    if isinstance(out, str) and not out.strip():
        raise ConfigError(f"--out is empty ({out!r}): it would write into the current folder; name where to write "
                          "(--out . if the current folder is meant)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, recorded with a run
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("transformers", "huggingface_hub", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        _refuse_empty_out(args)
        if args.command in SINGLE_PROCESS:
            from seamlm.distributed import launched_distributed

            if launched_distributed():
                raise ConfigError(f"`seamlm {args.command}` runs in one process (only `seamlm defend` and `seamlm attack` are distributed); "
                                  f"start it without accelerate launch / torchrun")
        if hasattr(args, "defense"):
            args.defense = _defense_label(args.model, args.defense)
        with contextlib.ExitStack() as args.held:  # what a command holds until it ends (its output folder's lock)
            rc = COMMANDS[args.command][1](args, extra)
        from seamlm.distributed import shutdown

        shutdown()
        return rc
    except ConfigError as exc:
        print(f"seamlm {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    except SeamError as exc:
        print(f"seamlm {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            print(f"seamlm {args.command}: error: the disk is full ({exc.filename or exc}). Free space and "
                  f"{_how_to_continue(args.command)}.", file=sys.stderr)
            return 1
        if exc.errno in _PATH_ERRORS and exc.filename:
            print(f"seamlm {args.command}: error: {exc.filename}: {exc.strerror} ({_PATH_ERRORS[exc.errno]})",
                  file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print(f"seamlm {args.command}: interrupted; {_how_to_continue(args.command)}", file=sys.stderr)
        return 130


#: File-system errors on a path the user gave, with what to do.
_PATH_ERRORS = {
    errno.ENOENT: "check the path; a missing parent folder is not created for a file",
    errno.EEXIST: "a file is where a folder is needed: choose another path",
    errno.ENOTDIR: "a file is where a folder is needed: choose another path",
    errno.EISDIR: "a folder is where a file is needed: name the file",
    errno.EACCES: "no permission: choose a path you can write or read",
    errno.EROFS: "read-only file system: choose a writable path",
    errno.EPERM: "not permitted (an immutable file, or a folder the system protects): choose another path",
}


def _how_to_continue(command: str) -> str:
    if command == "defend":
        return "rerun with --resume to continue from the last checkpoint"
    if command in ("demo", "attack", "sweep", "adaptive", "eval"):
        return "rerun the same command: finished stages, cells and trials are kept and skipped"
    return "rerun the same command"


if __name__ == "__main__":
    sys.exit(main())
