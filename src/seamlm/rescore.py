"""Judge a finished run again: HS rows recomputed from the answers the run saved, without generating anything.

Every evaluation keeps its greedy answers (``samples/<model>/pre.jsonl``, ``attacks/<model>/<cell>/samples.jsonl``),
so another judge — the BeaverTails classifier for a user who has the Hub, or a newer offline judge — can score the
same answers in seconds. The run's HS and HS-binary rows take the new judge's values and name; every row of a
rescored cell gets the settings digest it would have had with that judge, so a resumed grid keeps its finished
cells and only new cells are generated (a demo folder's ``demo_config.json`` and a sweep not started yet name the
new judge: resume a demo rescored with another judge with that ``--judge``). The results file and each samples file
are replaced atomically; the old results file is kept beside as ``results.before-<judge>.jsonl`` and each answer
keeps its old score under ``p_harmful[<judge>]``. A demo built on a baseline is rescored after the baseline (it
resumes only with the baseline's judge) and gets its own copy of the baseline's raw and aligned answers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seamlm.attack import samples_file, settings_digest
from seamlm.errors import ConfigError, DataError
from seamlm.evaluate.judges import Judge
from seamlm.evaluate.metrics import EvalConfig, hs_figures
from seamlm.jsonl import read_records, write_records_atomic, write_text_atomic
from seamlm.results import JUDGED_METRICS, ResultRow, ResultStore
from seamlm.runinfo import folder_lock, path_part, seed_runs_hint

log = logging.getLogger(__name__)

#: The models a demo on a baseline copies from it (their answers may live in the baseline's folder only).
BASELINE_MODELS = ("raw", "aligned")


@dataclass
class Rescored:
    model: str
    cell: str
    before: float
    after: float
    old_judge: str


def rescore(results: str | Path, eval_cfg: EvalConfig, judge: Judge | None = None) -> list[Rescored]:
    """Rescore every cell of ``results`` (a ``results.jsonl`` or its run folder) with ``eval_cfg``'s judge (or
    ``judge``, already built from it). Returns one entry per cell; cells already judged by it are left as they are."""
    path = Path(results)
    path = path / "results.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"{path} does not exist{seed_runs_hint(path.parent, 'rescore', each=True)}; give the "
                        "results.jsonl of a finished run (or its folder)")
    with folder_lock(path.parent, "rescore"):
        return _rescore(path, eval_cfg, judge)


def _rescore(path: Path, eval_cfg: EvalConfig, judge: Judge | None) -> list[Rescored]:
    store = ResultStore(path)
    rows = store.rows()
    if not any(r.metric == "hs" for r in rows) and not (path.parent / "sweep.db").is_file():  # before the judge loads
        raise DataError(f"{path} holds no HS rows ({len(rows)} result rows): nothing a judge scored; give the "
                        "results.jsonl of a `seamlm eval`/`attack`/`demo` run")
    judge = judge or eval_cfg.make_judge()
    # (model, cell) -> the judge its HS row names now
    cells = {(r.model, r.cell): r.judge or "?" for r in rows if r.metric == "hs" and r.judge != judge.name}
    if not cells:
        log.info("%s: no HS rows judged otherwise than by %s", path, judge.name)
        _adopt(path.parent, _unstarted_studies(path.parent, judge.name), judge.name, eval_cfg)  # (a rescore cut short)
        (path.parent / RESCORE_PENDING).unlink(missing_ok=True)
        return []
    studies = _unstarted_studies(path.parent, judge.name)
    base = demo_baseline(path.parent)
    if base is not None:
        # this demo reuses the baseline's raw and aligned models (and resumes only with the baseline's judge)
        base_rows = ResultStore(base / "results.jsonl").rows()
        if any(r.metric == "hs" and r.judge != judge.name for r in base_rows):
            raise DataError(f"this demo reuses the baseline {base}, judged otherwise: rescore it first "
                            f"(seamlm rescore {base} --judge {eval_cfg.judge}), then this folder")
    # read every cell's answers before changing anything: a missing file stops the rescore with nothing written
    answers = {}
    for model, cell in cells:
        file = samples_file(path.parent, model, cell)
        theirs = samples_file(base, model, cell) if base and model in BASELINE_MODELS else None
        if not file.is_file() and not (theirs and theirs.is_file()):
            raise DataError(f"{file} is missing: the answers of {model}/{cell} were not kept, so that cell cannot be "
                            "rescored (rerun it in another --out with the new judge)")
        answers[(model, cell)] = [rec for _, rec in read_records(file if file.is_file() else theirs)]
    new_values: dict[tuple[str, str], dict[str, float]] = {}
    scores: dict[tuple[str, str], list[float]] = {}
    for key, recs in answers.items():
        if not recs:
            raise DataError(f"{samples_file(path.parent, *key)} holds no answers")
        p = judge.score([r["prompt"] for r in recs], [r["answer"] for r in recs])
        scores[key] = p
        # (the refusal rate too, by this seamlm's keyword rule, so the cell's refusal rate and HS read alike)
        new_values[key] = hs_figures(p, [r["answer"] for r in recs])

    digests: dict[str | None, str | None] = {}

    def redigest(old: str | None) -> str | None:
        if old not in digests:
            record = store.settings_record(old)
            if record is None:
                raise DataError(f"{store.settings_dir}/{old}.json is missing: the rows predate settings records, so "
                                "their settings under another judge cannot be computed; rerun the run instead")
            parts = {**record, "judge": judge.name, "eval": _judged_eval(record.get("eval") or {}, eval_cfg)}
            digests[old] = settings_digest(**parts)
            store.record_settings(digests[old], parts)
        return digests[old]

    out: list[ResultRow] = []
    report: list[Rescored] = []
    with_se = {(r.model, r.cell) for r in rows if r.metric == "hs_se"}
    for r in rows:
        key = (r.model, r.cell)
        if key not in new_values:
            out.append(r)
            continue
        change: dict[str, Any] = {"settings": redigest(r.settings) if r.settings else None, "judge": judge.name}
        if r.metric in JUDGED_METRICS:
            change.update(value=new_values[key][r.metric])
            if r.metric == "hs":
                report.append(Rescored(r.model, r.cell, r.value, change["value"], cells[key]))
        elif r.metric == "refusal_rate":
            change.update(value=new_values[key]["refusal_rate"])
        out.append(dataclasses.replace(r, **change))
        if r.metric == "hs" and key not in with_se:  # a cell from before hs_se existed gains it, in the same write
            out.append(dataclasses.replace(out[-1], metric="hs_se", value=new_values[key]["hs_se"]))
    # each write's row count, which tells a complete write from a cut one, counts the rows added to it
    held = Counter(r.write for r in out if r.write)
    out = [dataclasses.replace(r, write=f"{r.write.rsplit('/', 1)[0]}/{held[r.write]}") if r.write else r
           for r in out]
    old_judges = sorted({x.old_judge for x in report})
    backup = path.with_name(f"{path.stem}.before-{path_part('+'.join(old_judges))}{path.suffix}")
    n = 1
    while backup.exists():  # an earlier rescore's: kept too
        n += 1
        backup = path.with_name(f"{path.stem}.before-{path_part('+'.join(old_judges))}-{n}{path.suffix}")
    shutil.copy2(path, backup)
    # from the first answer file rewritten to the results file, answers and results name different judges
    write_text_atomic(path.parent / RESCORE_PENDING, json.dumps({"judge": judge.name, "results": path.name}))
    for (model, cell), recs in answers.items():
        old = cells[(model, cell)]
        # (a rescore cut short after this file keeps the score it first replaced)
        lines = [{f"p_harmful[{old}]": rec.get("p_harmful"), **rec, "p_harmful": p}
                 for rec, p in zip(recs, scores[(model, cell)], strict=True)]
        target = samples_file(path.parent, model, cell)  # a baseline's answers get this folder's own copy
        target.parent.mkdir(parents=True, exist_ok=True)
        write_records_atomic(target, lines)
    # rows keep their write ids and counts: the file reads back exactly as these rows
    write_records_atomic(path, (dataclasses.asdict(r) for r in out))
    _adopt(path.parent, studies, judge.name, eval_cfg)
    (path.parent / RESCORE_PENDING).unlink(missing_ok=True)
    log.info("%s: %d cells rescored with %s (the old file: %s)", path, len(report), judge.name, backup)
    return report


def _judged_eval(settings: dict[str, Any], eval_cfg: EvalConfig) -> dict[str, Any]:
    """A cell's evaluation settings with the judge fields of ``eval_cfg`` (as :meth:`EvalConfig.settings_dict`
    writes them: ``judge_model`` only when set)."""
    judged = EvalConfig(judge=eval_cfg.judge, judge_model=eval_cfg.judge_model).settings_dict()
    out = {k: v for k, v in settings.items() if k not in ("judge", "judge_model")}
    out.update({k: judged[k] for k in ("judge", "judge_model") if k in judged})
    return out


#: in a folder while a rescore rewrites it (answer files first, results last): a kill leaves them out of step
RESCORE_PENDING = "rescore.pending.json"


def check_not_mid_rescore(folder: Path) -> None:
    """Refuse to read a folder's saved answers beside its results while a rescore cut short left them apart."""
    pending = folder / RESCORE_PENDING
    if pending.is_file():
        judge = json.loads(pending.read_text(encoding="utf-8")).get("judge", "?")
        raise DataError(f"a rescore of {folder} (to {judge}) was cut short: its saved answers and results.jsonl name "
                        f"different judges; run the same `seamlm rescore {folder} --judge …` again to finish it")


def demo_baseline(folder: Path) -> Path | None:
    """The baseline demo a demo folder reuses (its raw and aligned cells' answers live there), if any."""
    saved = folder / "demo_config.json"
    if saved.is_file():
        base = json.loads(saved.read_text(encoding="utf-8")).get("baseline_from")
        if not base:
            return None
        from seamlm.pipeline import baseline_folder

        found = baseline_folder(folder, base)  # as the demo was started (from the current folder), else beside it
        if not (found / "results.jsonl").is_file():
            raise DataError(f"{folder} reuses the baseline {base}, and {found} holds no results.jsonl (a demo's "
                            "relative baseline is looked for from here, then beside the demo): run rescore from where "
                            "the demo was started, or finish the baseline first")
        # another folder of that name (found from elsewhere, or redone since) is not the one the SEAM model grew on
        from seamlm.pipeline import check_seam_base

        try:
            check_seam_base({"seam": folder / "models" / "seam" / "model", "seam_run": folder / "models" / "seam",
                             "aligned": found / "models" / "aligned"}, fix="")
        except ConfigError:
            raise DataError(f"{folder} reuses the baseline {base}, but {found} holds another aligned model than the "
                            f"one {folder}'s SEAM model was trained from: run this command from where the demo was "
                            "started (a relative baseline is looked for from there, then beside the demo)") from None
        return found
    return None


def _unstarted_studies(folder: Path, judge_name: str) -> list[str]:
    """The Optuna studies of ``folder``'s sweep.db not run under ``judge_name``, all of which must have no finished
    trial: a sweep's trials were chosen by HS under the old judge and cannot be rescored. (A study not started yet
    adopts the new judge; one already under it is left alone.)"""
    db = folder / "sweep.db"
    if not db.is_file():
        return []
    from optuna.trial import TrialState

    from seamlm.sweep import quiet_optuna, readable_sweep_db, sweep_storage

    optuna = quiet_optuna()
    storage = sweep_storage(folder)
    names = []
    with readable_sweep_db(folder, "restore it, or rescore a copy of the folder without it"):
        summaries = optuna.get_all_study_summaries(storage)
    for summary in summaries:
        name = summary.study_name
        study = optuna.load_study(study_name=name, storage=storage)
        if (study.user_attrs.get("sweep_context") or {}).get("judge") == judge_name:
            continue
        names.append(name)
        if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            raise DataError(f"{db}: study '{name}' has trials chosen by HS under the old judge; a rescored folder "
                            "would mix the two. Rescore a copy of the folder without sweep.db, or rerun the sweep "
                            "with the new judge in another --out")
    return names


def _adopt(folder: Path, studies: list[str], judge_name: str, eval_cfg: EvalConfig) -> None:
    """After the rows are rescored: the folder's unstarted studies and its demo config name the new judge, so the
    command that made the folder resumes on it (a demo judged by another judge is resumed with that --judge)."""
    if studies:
        from seamlm.sweep import quiet_optuna, sweep_storage

        optuna = quiet_optuna()
        storage = sweep_storage(folder)
        for name in studies:
            study = optuna.load_study(study_name=name, storage=storage)
            context = study.user_attrs.get("sweep_context")
            if context is not None:
                study.set_user_attr("sweep_context", {**context, "judge": judge_name,
                                                      "eval": _judged_eval(context.get("eval") or {}, eval_cfg)})
    if (folder / "adaptive_config.json").is_file():  # seamlm adaptive takes its judge from the demo: not any more
        from seamlm.adaptive import JUDGE_FILE

        write_text_atomic(folder / JUDGE_FILE, json.dumps({"judge": eval_cfg.judge, "judge_model": eval_cfg.judge_model}))
    saved = folder / "demo_config.json"
    if saved.is_file():
        demo = json.loads(saved.read_text(encoding="utf-8"))
        if (demo.get("judge"), demo.get("judge_model", "")) != (eval_cfg.judge, eval_cfg.judge_model):
            demo.update(judge=eval_cfg.judge, judge_model=eval_cfg.judge_model)
            write_text_atomic(saved, json.dumps(demo, indent=2))
