"""Typed result rows in an append-only JSONL store; a grid asks the store which cells are done."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import re
import time
import uuid
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seamlm.errors import DataError
from seamlm.jsonl import append_records, read_records, write_text_atomic
from seamlm.runinfo import package_versions, path_part

log = logging.getLogger(__name__)

#: metric -> unit. Zero-shot per-task metrics are ``zs_<task>`` (built-in) and ``lmeval_<task>`` (lm-eval's
#: acc), accuracy in %.
METRICS = {
    "hs": "%", "hs_binary": "%", "refusal_rate": "%", "zs_mean": "%", "zs_mean_norm": "%", "zs_chance": "%",
    "coherence_ppl": "perplexity", "coupling_cos": "cosine", "coupling_slope": "nats/step", "fs_accuracy": "%", "attack_final_loss": "nats", "attack_first_loss": "nats",
    "attack_peak_ppl": "perplexity", "attack_start_ppl": "perplexity", "attack_ce_before": "nats", "attack_ce_after": "nats",
    "hs_se": "%", "zs_mean_se": "%",  # standard errors of hs (over the prompts) and zs_mean (over the items)
}

#: Metrics a healthy run may leave undefined (NaN or inf): the cosine when a gradient is zero, a perplexity or loss
#: that overflows in a broken model, FS when its benign fine-tuning hits a non-finite loss. Any other NaN is a bug
#: unless the attack diverged.
MAY_BE_UNDEFINED = {"coupling_cos", "coupling_slope", "coherence_ppl", "attack_peak_ppl", "attack_start_ppl",
                    "attack_first_loss",
                    "attack_final_loss", "fs_accuracy", "attack_ce_before", "attack_ce_after",
                    "hs_se", "zs_mean_se"}  # (a standard error of one prompt or item)


#: Metrics a judge produced: their rows name it.
JUDGED_METRICS = ("hs", "hs_binary", "hs_se")


def known_metric(name: str) -> bool:
    return name in METRICS or name.startswith(("zs_", "lmeval_"))


@dataclass
class ResultRow:
    model: str
    """Label of the evaluated model before any attack (e.g. aligned, seam). ``attack_first_loss`` and
    ``attack_final_loss`` are means over the first and last 10 % of the attack's steps (different batches, so
    noisy); ``attack_ce_before``/``attack_ce_after`` the answer CE on the first 16 attack examples (one fixed set)
    before and after the attack (single-process attacks); ``attack_peak_ppl`` is
    the highest benign perplexity the attack's trajectory probes saw (``EvalConfig.trajectory_every``), on the first
    ``trajectory_examples`` held-out answers, and ``attack_start_ppl`` their perplexity before the first step (the
    peak's baseline: ``coherence_ppl`` is measured on more answers)."""
    defense: str
    """Defence that produced the model: none, seam, …"""
    cell: str
    """Grid cell: ``pre`` before any attack, else the attack's key (recipe, mode, lr, samples, epochs, seed)."""
    metric: str
    value: float
    judge: str | None = None
    """The judge this cell's answers were scored with, on every row of the cell (it is part of the cell's settings);
    only the ``JUDGED_METRICS`` rows are its output (older result files name it on those rows only)."""
    seed: int = 0
    """``pre`` cells: the evaluation's subsampling seed; attack cells: the attack's seed (their evaluation seed is
    in the cell's settings record, ``<results>.settings/<settings>.json: eval.seed``, one per label)."""
    attack: dict[str, Any] = field(default_factory=dict)
    """Attack settings of the cell ({} for pre); ``status`` is ok or diverged; ``loss_log`` the loss curve file."""
    data_manifest: str | None = None
    """Digest of the data bundle's manifest (which prompts were trained, attacked and evaluated on)."""
    settings: str | None = None
    """Digest of everything else that made this cell's numbers (model path, evaluation and attack settings, judge):
    a rerun with other settings must not reuse the row."""
    versions: dict[str, str] = field(default_factory=package_versions)
    time: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write: str | None = None
    """``<id>/<n>``: the store's write this row came in and how many rows it held (set by :meth:`ResultStore.append`).
    A write cut short by a kill or a full disk leaves fewer rows: they are ignored and their cell is redone."""

    def validate(self) -> None:
        # first: a list or number here would crash the checks below and the report (hashing, sorting, escaping)
        for name in TEXT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str) and not (value is None and name in OPTIONAL_TEXT_FIELDS):
                raise DataError(f"{name} must be a JSON string{' or null' if name in OPTIONAL_TEXT_FIELDS else ''}, "
                                f"got {json.dumps(value, default=repr)}")
        if not isinstance(self.attack, dict) or not isinstance(self.versions, dict):
            raise DataError("a row's attack and versions must be JSON objects")
        if not known_metric(self.metric):
            raise DataError(f"unknown metric '{self.metric}' (known: {', '.join(METRICS)}, zs_<task>, lmeval_<task>)")
        if not isinstance(self.value, (int, float)) or isinstance(self.value, bool):
            raise DataError(f"metric {self.metric}: value must be a number, got {self.value!r}")
        if (not math.isfinite(self.value) and self.attack.get("status") != "diverged"
                and self.metric not in MAY_BE_UNDEFINED):
            raise DataError(f"metric {self.metric} is {'NaN' if math.isnan(self.value) else self.value} but the "
                            f"attack did not diverge")
        if not self.model or not self.cell:
            raise DataError("result rows need a model label and a cell")
        if self.metric in JUDGED_METRICS and not self.judge:
            raise DataError("HS rows must name their judge")


#: A row's text fields, and those of them that may be null.
TEXT_FIELDS = ("model", "defense", "cell", "metric", "judge", "data_manifest", "settings", "time", "write")
OPTIONAL_TEXT_FIELDS = ("judge", "data_manifest", "settings", "write")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


#: The first columns of a results CSV: a row's flat fields; its attack settings and versions follow as
#: ``attack.<key>`` and ``versions.<key>`` columns.
CSV_COLUMNS = tuple(f.name for f in dataclasses.fields(ResultRow) if f.name not in ("attack", "versions"))


def write_results_csv(path: str | Path, rows: Sequence[ResultRow], runs: Sequence[str] | None = None) -> Path:
    """``rows`` as one CSV line each, for a spreadsheet or pandas: the row's fields, then its attack settings and
    versions flattened (blank where a row has none; a list as JSON). ``runs``: each row's results file, as a first
    ``run`` column (a report across runs)."""
    flat = [{**{k: getattr(r, k) for k in CSV_COLUMNS}, **flatten({"attack": r.attack, "versions": r.versions})}
            for r in rows]
    extra = sorted({k for line in flat for k in line} - set(CSV_COLUMNS),
                   key=lambda k: (not k.startswith("attack."), k))
    first = list(CSV_COLUMNS)
    if runs is not None:
        flat = [{"run": run, **line} for run, line in zip(runs, flat, strict=True)]
        first.insert(0, "run")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=first + extra, lineterminator="\n")
    writer.writeheader()
    for line in flat:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, tuple)) else v for k, v in line.items()})
    return write_text_atomic(path, buf.getvalue())


class ResultStore:
    """``results.jsonl``: one JSON row per line, appended cell by cell (one write per cell)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._warned: set[str] = set()  # cut-short writes already reported

    def append(self, rows: list[ResultRow], settings_parts: dict[str, Any] | None = None) -> None:
        """Append ``rows``; ``settings_parts`` (what their ``settings`` digest was made of) is kept beside them."""
        for r in rows:
            r.validate()
        # the settings record first: rows without theirs would escape check_label's model/judge/data check
        if settings_parts is not None:
            for digest in {r.settings for r in rows if r.settings}:
                self.record_settings(digest, settings_parts)
        write = f"{uuid.uuid4().hex[:12]}/{len(rows)}"
        append_records(self.path, [dataclasses.asdict(dataclasses.replace(r, write=write)) for r in rows])

    def rows(self) -> list[ResultRow]:
        """Every complete write's rows (a row cut off by a kill, and the rest of its write, are left out: their
        cell counts as not done and is redone). Two rows of one model, cell and metric that disagree are an error
        (:meth:`_refuse_conflicts`)."""
        if self.path.suffix.lower() in (".csv", ".tsv"):
            raise DataError(f"{self.path} is a CSV file: seamlm reads results from results.jsonl (a report's "
                            "results.csv is a flat copy for spreadsheets); give the results.jsonl or its run folder")
        out = []
        line_of: dict[int, int] = {}  # id(row) -> its line, for the conflict error
        names = {f.name for f in dataclasses.fields(ResultRow)}
        required = {f.name for f in dataclasses.fields(ResultRow)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        for i, data in read_records(self.path):
            where = f"{self.path}:{i}"
            if not isinstance(data, dict):
                raise DataError(f"{where} is a JSON {type(data).__name__}, not a result row: repair or delete that line")
            unknown, missing = set(data) - names, required - set(data)
            if unknown or missing:
                raise DataError(f"{where} has {f'unknown fields {sorted(unknown)}' if unknown else ''}"
                                f"{' and ' if unknown and missing else ''}"
                                f"{f'no {sorted(missing)}' if missing else ''}: repair or delete that line")
            row = ResultRow(**data)
            if row.write is not None and not re.fullmatch(r"[^/]+/[1-9]\d*", str(row.write)):
                raise DataError(f"{where}: write {row.write!r} is not '<id>/<rows>': repair or delete that line")
            try:
                row.validate()
            except DataError as exc:
                raise DataError(f"{where}: {exc}: repair or delete that line") from None
            out.append(row)
            line_of[id(row)] = i
        held = Counter(r.write for r in out if r.write)
        cut = {w for w, n in held.items() if n < int(w.rsplit("/", 1)[1])}
        if cut - self._warned:
            self._warned |= cut
            cells = sorted({f"{r.model}/{r.cell}" for r in out if r.write in cut})
            log.warning("%s: %d write(s) were cut short (a kill or a full disk); their rows are ignored and these "
                        "cells will be redone: %s", self.path, len(cut), ", ".join(cells))
        if cut:
            out = [r for r in out if r.write not in cut]
        self._refuse_conflicts([(line_of[id(r)], r) for r in out])
        return out

    def _refuse_conflicts(self, rows: list[tuple[int, ResultRow]]) -> None:
        """Refuse two ``(line, row)`` of one model, cell and metric with other values, settings, judges or data: every
        reader keys rows by those three and would keep one silently. No seamlm command writes such a pair (a cell is
        written once, with one settings digest, see :meth:`cell_rows`): the file mixes runs, e.g. two results files
        joined. Equal repeats (a file joined to itself) are accepted, as before."""
        first: dict[tuple[str, str, str], tuple[int, ResultRow]] = {}
        for i, r in rows:
            j, s = first.setdefault((r.model, r.cell, r.metric), (i, r))
            if s is r:
                continue
            pairs = (("value", s.value, r.value), ("settings", s.settings, r.settings), ("judge", s.judge, r.judge),
                     ("data_manifest", s.data_manifest, r.data_manifest))
            differ = [f"{k} {a!r} vs {b!r}" for k, a, b in pairs
                      if a != b and not (k == "value" and math.isnan(a) and math.isnan(b))]
            if differ:
                raise DataError(f"{self.path}: lines {j} and {i} both hold {r.metric} of model '{r.model}', cell "
                                f"'{r.cell}', but disagree ({'; '.join(differ)}): the file mixes two runs (results "
                                "files joined?), and a report would show one of them only. Delete one run's rows of "
                                "that label, or report each results file on its own (two models in one report: "
                                "evaluate them under different --label values)")

    def cell_rows(self, model: str, cell: str, settings: str | None = None,
                  parts: dict[str, Any] | None = None, same: Collection[str] = ()) -> list[ResultRow]:
        """The rows of ``cell`` of ``model`` (empty: not done). Rows of that cell made with other ``settings`` are an
        error: silently reusing them would report numbers for a configuration that was never run. With ``parts``
        (what ``settings`` digests) the error names what changed, from the record :meth:`record_settings` kept.
        ``same``: other digests of these very settings (as an older seamlm recorded them)."""
        found = [r for r in self.rows() if r.model == model and r.cell == cell]
        other = next((r.settings for r in found if settings is not None and r.settings != settings
                      and r.settings not in same), None)
        if other is not None:
            raise DataError(
                f"{self.path} already holds cell '{cell}' of model '{model}' made with other settings"
                f"{self._what_changed(other, parts)}. Use another --out or --label, remove those rows, or (seamlm "
                "demo) rerun with --fresh."
            )
        return found

    def check_label(self, label: str, parts: dict[str, Any], same_models: Collection[str] = (),
                    every_cell_formatted: bool = False) -> None:
        """Every cell of one model label must come from one model, judge and data bundle: otherwise its row of the
        report would compare an attack on one model with the pre-attack figures of another (or mix judges).
        ``parts``: what the new cell's settings digest is made of; ``same_models``: older names of its model;
        ``every_cell_formatted``: the model has no chat template, so every cell's prompts are in the fallback
        format and must share its version (``prompt_format``; absent = 1, before versions were recorded)."""
        rows = self.rows()
        clash = sorted({r.model for r in rows if r.model != label and path_part(r.model) == path_part(label)})
        if clash:
            raise DataError(f"{self.path} already holds label {clash[0]!r}, whose answers and loss logs share the "
                            f"folder name {path_part(label)!r} with {label!r}: they would overwrite each other's. "
                            "Give this model another --label")
        for digest in sorted({r.settings for r in rows if r.model == label and r.settings}):
            old = self.settings_record(digest)
            if old is None:  # rows from before settings records: nothing to compare with
                continue
            new = json.loads(json.dumps(parts, default=str))
            changed = [f"{k}: {old[k]!r} → {new.get(k)!r}" for k in ("model", "judge", "data")
                       if k in old and old[k] != new.get(k) and not (k == "model" and old[k] in same_models)]
            changed += measured_differently(old.get("eval") or {}, new.get("eval") or {})
            changed += lm_eval_differently(old.get("eval") or {}, new.get("eval") or {})
            if every_cell_formatted and old.get("prompt_format", 1) != new.get("prompt_format"):
                changed.append(f"prompt_format: {old.get('prompt_format', 1)!r} → {new.get('prompt_format')!r}")
            if changed:
                raise DataError(f"{self.path} already holds cells of '{label}' made with another "
                                f"{'; '.join(changed)}: one label is one model, judged and measured one way on one "
                                "data bundle (the report and the sweep's selection set each attacked cell beside "
                                "the pre-attack one). Use another --out (eval, attack and sweep: or another --label) for "
                                "this one, or the folder's evaluation settings.")

    @property
    def settings_dir(self) -> Path:
        """Where the parts of each settings digest are kept (``<results stem>.settings/<digest>.json``)."""
        return self.path.with_name(self.path.stem + ".settings")

    def record_settings(self, digest: str, parts: dict[str, Any]) -> None:
        """Keep what ``digest`` was made of, so a later mismatch can say what changed."""
        path = self.settings_dir / f"{digest}.json"
        if not path.exists():
            self.settings_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(parts, indent=1, sort_keys=True, default=str))

    def settings_record(self, digest: str | None) -> dict[str, Any] | None:
        """What ``digest`` was made of (:meth:`record_settings`); None for rows from before settings records."""
        path = self.settings_dir / f"{digest}.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def _what_changed(self, old_digest: str | None, parts: dict[str, Any] | None) -> str:
        if parts is None:
            return " (data, model path, evaluation or attack options changed)"
        record = self.settings_record(old_digest)
        if record is None:
            return " (which ones is not recorded: the rows predate seamlm's settings records)"
        old = flatten(record)
        new = flatten(json.loads(json.dumps(parts, default=str)))
        changed = [f"{k}: {old.get(k, '(absent)')!r} → {new.get(k, '(absent)')!r}"
                   for k in sorted(set(old) | set(new)) if old.get(k, "(absent)") != new.get(k, "(absent)")]
        more = f"; and {len(changed) - 6} more" if len(changed) > 6 else ""
        return f" ({'; '.join(changed[:6])}{more})"

    def label_evaluations(self, rows: list[ResultRow]) -> dict[str, dict[str, Any]]:
        """Each label's evaluation settings (``eval`` of its rows' settings records; one per label, as
        :meth:`check_label` keeps them; the pre-attack cell's, which alone holds the FS settings, where there is one)
        — labels whose rows predate settings records are left out."""
        out: dict[str, dict[str, Any]] = {}
        for label, _, digest in sorted({(r.model, r.cell != "pre", r.settings) for r in rows if r.settings}):
            ev = (self.settings_record(digest) or {}).get("eval")
            if isinstance(ev, dict):
                out.setdefault(label, ev)
        return out

    def done(self, model: str, cell: str, settings: str | None = None) -> bool:
        """Whether ``cell`` of ``model`` is in the store (see :meth:`cell_rows`)."""
        return bool(self.cell_rows(model, cell, settings))


#: Evaluation settings that decide what a label's HS and ZS figures measure: every cell of a label must share them.
#: (``prompt_template`` may differ — a template-shift attack is measured through its own template, which
#: ``check_eval_template`` governs — and batch sizes, FS and the trajectory probes change no compared figure.)
COMPARED_EVAL = {"hs_prompts": None, "max_new_tokens": None, "zs_tasks": None, "zs_limit": None, "seed": None,
                 "judge_model": ""}
#: ... and these where both cells measured the figure (0 = skipped, as ``seamlm adaptive`` skips the coupling)
COMPARED_EVAL_IF_MEASURED = ("coherence_examples", "coupling_examples")


#: lm-eval settings that decide its scores (its tasks may differ: a cell adds tasks, each its own row), compared
#: where both cells ran lm-eval tasks: its document limit, its local tasks' digest, its version
LM_EVAL_COMPARED = {"lm_eval_limit": 0, "lm_eval_include_digest": None, "lm_eval_version": None}


def lm_eval_differently(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The lm-eval settings two cells' evaluation records disagree on, where both ran lm-eval tasks."""
    if not (old.get("lm_eval_tasks") and new.get("lm_eval_tasks")):
        return []
    return [f"eval.{k}: {old.get(k, d)!r} → {new.get(k, d)!r}" for k, d in LM_EVAL_COMPARED.items()
            if old.get(k, d) != new.get(k, d)]


def measured_differently(old: dict[str, Any], new: dict[str, Any], arrow: str = "→") -> list[str]:
    """The compared evaluation settings two cells' records disagree on (a field one record predates is skipped;
    ``judge_model``, left out of records at its default, compares as its default)."""
    def value(record: dict[str, Any], key: str) -> Any:
        return record.get(key, COMPARED_EVAL.get(key))

    keys = [k for k in COMPARED_EVAL if (k in old and k in new) or COMPARED_EVAL[k] is not None]
    if not (old.get("zs_tasks") and new.get("zs_tasks")):  # an HS-only cell: its HS still compares
        keys = [k for k in keys if k not in ("zs_tasks", "zs_limit")]
    keys += [k for k in COMPARED_EVAL_IF_MEASURED if old.get(k) and new.get(k)]
    return [f"eval.{k}: {value(old, k)!r} {arrow} {value(new, k)!r}" for k in keys if value(old, k) != value(new, k)]
