"""Results file -> Markdown + HTML report with the paper-style table and PNG plots. Every number comes from the rows."""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Callable, Collection
from pathlib import Path

from seamlm.errors import DataError
from seamlm.jsonl import read_records, write_text_atomic
from seamlm.results import METRICS, ResultRow, ResultStore, write_results_csv
from seamlm.runinfo import seed_runs_hint
from seamlm.selection import collect, within_bound, worst_case_rows
from seamlm.verdict import check_bar


def is_plain_grid(r: ResultRow) -> bool:
    """Pre-attack rows and the plain SFT grid (the paper's table); adaptive recipes and sweep trials are apart."""
    return r.cell == "pre" or (r.attack.get("recipe", "sft") == "sft" and "trial" not in r.attack)


def _fmt(v: float | None, digits: int = 1) -> str:
    if v is None:
        return "–"
    return "nan" if math.isnan(v) else f"{v:.{digits}f}"


def _pm(v: float | None, se: float | None) -> str:
    """``v`` with its standard error where the cell recorded one (cells evaluated before 2026-11-27 did not)."""
    return _fmt(v) + (f" ± {se:.1f}" if v is not None and se is not None and math.isfinite(se) else "")


#: Attack settings a column header names when they differ between the columns (lr and LoRA always show).
_VARYING = (("samples", "n"), ("epochs", "ep"), ("seed", "seed"), ("optimizer", "opt"), ("batch_size", "b"),
            ("max_grad_norm", "clip"), ("lr_scheduler", "sched"), ("warmup_ratio", "warmup"), ("lora_r", "r"))


def _sort_value(v: object) -> tuple[int, float, str]:
    """Numbers in numeric order (seed 2 before seed 10), then text, then missing values."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v), "")
    return (1, 0.0, str(v)) if v is not None else (2, 0.0, "")


def _cells(rows: list[ResultRow]) -> list[tuple[str, dict]]:
    """Columns in order: pre first, then attacks by (lora, lr, the other settings). A cell's settings are the same
    for every model (its key is made of them); its status is not, and is read per model."""
    attacks = {r.cell: r.attack for r in rows if r.cell != "pre"}
    order = sorted(attacks, key=lambda c: (bool(attacks[c].get("lora")), attacks[c].get("lr", 0),
                                           [_sort_value(attacks[c].get(k)) for k, _ in _VARYING]))
    return ([("pre", {})] if any(r.cell == "pre" for r in rows) else []) + [(c, attacks[c]) for c in order]


def _label(cell: str, attack: dict, varies: frozenset[str] = frozenset()) -> str:
    """Column label; ``varies`` names the attack settings that differ between columns (``_VARYING``)."""
    if cell == "pre":
        return "pre-attack"
    lr = attack.get("lr")
    lab = " ".join([f"lr {lr:g}" if isinstance(lr, (int, float)) else "lr ?", *_settings_shown(attack, varies)])
    return f"LoRA {lab}" if attack.get("lora") else lab


def _settings_shown(attack: dict, keys: Collection[str]) -> list[str]:
    """``short=value`` for each of the attack settings ``keys`` (``_VARYING`` order; the LoRA rank on LoRA only)."""
    return [f"{short}={attack.get(key)}" for key, short in _VARYING
            if key in keys and (key != "lora_r" or attack.get("lora"))]


def plot_lines(rows: list[ResultRow]) -> Callable[[ResultRow], tuple[bool, str]]:
    """``row -> (LoRA, "seed=1, n=50")``: one plot line per combination of the settings besides the lr that differ
    between ``rows``' attacks. Cells that no shown setting tells apart (weight decay, max_steps …: the ``-h``
    digest of their key) get that digest too, so two settings never share one line."""
    varies = [k for k, _ in _VARYING
              if len({str(r.attack.get(k)) for r in rows if k != "lora_r" or r.attack.get("lora")}) > 1]

    def shown(r: ResultRow) -> tuple[bool, str]:
        return bool(r.attack.get("lora")), ", ".join(_settings_shown(r.attack, varies))

    digests: dict[tuple[bool, str], set[str]] = {}
    for r in rows:
        digests.setdefault(shown(r), set()).add(_other_settings(r.cell))

    def key(r: ResultRow) -> tuple[bool, str]:
        lora, what = shown(r)
        if len(digests.get((lora, what), ())) > 1:
            what = ", ".join(filter(None, [what, f"other settings {_other_settings(r.cell) or 'default'}"]))
        return lora, what

    return key


def _other_settings(cell: str) -> str:
    """The ``h<digest>`` that ends a cell key whose fine-tuning fields besides the keyed ones changed ('' if none)."""
    m = re.search(r"-(h[0-9a-f]{6})$", cell)
    return m.group(1) if m else ""


def column_header(cells: list[tuple[str, dict]]) -> list[str]:
    """``model`` and one label per cell of :func:`_cells`, naming the attack settings that differ between them."""
    varies = frozenset(k for k, _ in _VARYING if len({str(a.get(k)) for c, a in cells if c != "pre"}) > 1)
    labels = [_label(c, a, varies) for c, a in cells]
    # columns that differ only in settings no label shows (weight decay, max_steps …): the cell key tells them apart
    return ["model"] + [f"{lab} [{c}]" if labels.count(lab) > 1 else lab for lab, (c, _) in zip(labels, cells, strict=True)]


def build_tables(rows: list[ResultRow], evaluations: dict[str, dict] | None = None) -> dict[str, list[list[str]]]:
    """The paper-style tables; ``evaluations`` (:meth:`ResultStore.label_evaluations`) for the bar check."""
    values: dict[tuple[str, str, str], float] = {(r.model, r.cell, r.metric): r.value for r in rows}
    diverged = {(r.model, r.cell) for r in rows if r.attack.get("status") == "diverged"}
    models = list(dict.fromkeys(r.model for r in rows))
    cells = _cells(rows)
    judges = sorted({r.judge for r in rows if r.judge})
    header = column_header(cells)

    def table(fmt) -> list[list[str]]:
        # an attack whose loss went NaN is evaluated as it stands: its cells say so, for that model only
        return [header] + [[m] + [fmt(m, c) + (" (diverged)" if (m, c) in diverged else "") for c, _ in cells]
                           for m in models]

    def get(m, c, k):
        return values.get((m, c, k))

    se = (" (± standard error over the prompts / the items)"
          if any(r.metric in ("hs_se", "zs_mean_se") for r in rows) else "")
    tables = {
        f"HS % (judge: {', '.join(judges)}) / ZS % (mean accuracy){se}": table(
            lambda m, c: f"{_pm(get(m, c, 'hs'), get(m, c, 'hs_se'))} / "
                         f"{_pm(get(m, c, 'zs_mean'), get(m, c, 'zs_mean_se'))}"),
        "refusal rate % (keyword) / benign perplexity": table(
            lambda m, c: f"{_fmt(get(m, c, 'refusal_rate'))} / {_fmt(get(m, c, 'coherence_ppl'), 2)}"),
        "attack loss (harmful-answer CE): mean of the first 10 % of steps -> last 10 % (different batches)": table(
            lambda m, c: "–" if c == "pre" else f"{_fmt(get(m, c, 'attack_first_loss'), 3)} -> {_fmt(get(m, c, 'attack_final_loss'), 3)}"),
    }
    if any(r.metric == "attack_ce_before" for r in rows):
        tables["harmful-answer CE on a fixed set of the attack's examples (its first 16, or all if fewer): "
               "before -> after the attack (how much the attack learnt)"] = table(
            lambda m, c: "–" if c == "pre" else f"{_fmt(get(m, c, 'attack_ce_before'), 3)} -> {_fmt(get(m, c, 'attack_ce_after'), 3)}")
    if any(r.metric == "coupling_cos" for r in rows):
        tables["gradient coupling on the attack data: cos(g_harmful, g_benign) / benign-loss slope along a harmful "
               "step (> 0: the attack raises the benign loss)"] = table(
            lambda m, c: f"{_fmt(get(m, c, 'coupling_cos'), 3)} / {_fmt(get(m, c, 'coupling_slope'), 3)}")
    if any(r.metric == "attack_peak_ppl" for r in rows):
        tables["benign perplexity during the attack, before its first step -> its highest (trajectory probes, on the "
               "first held-out answers only: not the perplexity table's set; a trap that fired and then healed shows "
               "here, not in the end point)"] = table(
            lambda m, c: "–" if c == "pre" else f"{_fmt(get(m, c, 'attack_start_ppl'), 2)} -> "
                                                f"{_fmt(get(m, c, 'attack_peak_ppl'), 2)}")
    if any(r.metric == "fs_accuracy" for r in rows):
        tables["FS: SST-2 accuracy % after benign fine-tuning"] = table(lambda m, c: _fmt(get(m, c, "fs_accuracy")))
    if {"aligned", "seam"} <= set(models):
        checks = check_bar(rows, evaluations=evaluations)
        mark = {True: "yes", False: "no", None: "not measured"}
        tables["Does SEAM clear the bar? (criteria: seamlm/verdict.py)"] = (
            [["criterion", "measured", "met"]] + [[c.criterion, c.measured, mark[c.passed]] for c in checks])
    zs_tasks = sorted({r.metric for r in rows if r.metric.startswith("zs_") and r.metric not in METRICS})  # (zs_mean, zs_chance …)
    if zs_tasks:
        tables["zero-shot accuracy % per task (" + ", ".join(t[3:] for t in zs_tasks) + ")"] = table(
            lambda m, c: " / ".join(_fmt(get(m, c, t)) for t in zs_tasks))
    lm_tasks = sorted({r.metric for r in rows if r.metric.startswith("lmeval_")})
    if lm_tasks:
        tables["lm-evaluation-harness accuracy % per task (" + ", ".join(t[7:] for t in lm_tasks) + ")"] = table(
            lambda m, c: " / ".join(_fmt(get(m, c, t)) for t in lm_tasks))
    return tables


def adaptive_tables(rows: list[ResultRow], eps: tuple[float, ...] = (5.0, 10.0, 20.0),
                    ppl_factor: float = 2.0) -> dict[str, list[list[str]]]:
    """The worst case under a utility bound per model and ε, and every attack (recipe runs and sweep trials)."""
    tables: dict[str, list[list[str]]] = {}
    worst = worst_case_rows(rows, eps, ppl_factor)
    head = ["model", "ε (max ZS drop)", "most harmful attack in the bound", "HS", "ZS (change)", "perplexity",
            "attacks in bound"]
    body = []
    for w in worst:
        b, pre = w["best"], w["pre"]
        count = f"{w['eligible']} / {w['attacks']}" + (f" ({w['unmeasured']} not fully measured)" if w["unmeasured"] else "")
        if not pre.measured:
            body.append([w["model"], f"{w['eps']:g}", "no bound: the unattacked model's HS, ZS or perplexity is "
                         "not measured", "–", "–", "–", count])
        elif math.isinf(pre.ppl):
            body.append([w["model"], f"{w['eps']:g}", "no bound: the unattacked model's perplexity is infinite", "–",
                         "–", "–", count])
        elif b is None:
            body.append([w["model"], f"{w['eps']:g}", "none in the bound", "–", "–", "–", count])
        else:
            body.append([w["model"], f"{w['eps']:g}", f"{b.describe()} ({b.source})", _fmt(b.hs),
                         f"{_fmt(b.zs)} ({b.zs - pre.zs:+.1f})", _fmt(b.ppl, 2), count])
    if body:
        tables[f"Worst case under a utility bound: the most harmful attack whose ZS drop is ≤ ε and whose benign "
               f"perplexity is ≤ {ppl_factor:g}× the unattacked model's (seamlm/selection.py)"] = [head] + body
    pre, attacked = collect(rows)
    adaptive = [o for outs in attacked.values() for o in outs if o.source != "grid"]
    if adaptive:
        head = ["model", "source", "attack", "HS", "refusal %", "ZS", "perplexity", f"in bound ε={max(eps):g}"]
        body = []
        for o in sorted(adaptive, key=lambda o: (o.model, o.source, -o.hs if math.isfinite(o.hs) else math.inf)):
            inside = o.model in pre and within_bound(o, pre[o.model], max(eps), ppl_factor)
            body.append([o.model, o.source, o.describe(), _fmt(o.hs), _fmt(o.refusal), _fmt(o.zs), _fmt(o.ppl, 2),
                         "yes" if inside else "no"])
        tables["Adaptive attacks: every recipe run and sweep trial (most harmful first)"] = [head] + body
    return tables


def _scatter(rows: list[ResultRow], out: Path, eps: tuple[float, ...]) -> list[str]:
    """All attacks in the HS–ZS plane, one colour per model; stars are the unattacked models."""
    pre, attacked = collect(rows)
    if not attacked:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = {"grid": "o", "recipe": "s", "sweep": "x"}
    for i, model in enumerate(dict.fromkeys(list(pre) + list(attacked))):
        color = f"C{i}"
        for source, marker in markers.items():
            pts = [o for o in attacked.get(model, []) if o.source == source]
            if pts:
                ax.scatter([o.zs for o in pts], [o.hs for o in pts], marker=marker, color=color, alpha=0.75,
                           label=f"{model}: {source} ({len(pts)})")
        if model in pre:
            p = pre[model]
            ax.scatter([p.zs], [p.hs], marker="*", s=180, color=color, edgecolor="black", label=f"{model}: no attack")
            ax.axvline(p.zs - max(eps), color=color, linestyle=":", alpha=0.6)
    ax.set_xlabel(f"ZS mean accuracy (%)  — dotted: unattacked ZS − {max(eps):g}")
    ax.set_ylabel("HS (%)")
    ax.legend(fontsize=7)
    return [_save(fig, out / "hs_zs_scatter.png")]


def _save(fig, path: Path) -> str:
    """Write a figure as PNG, free it, return its file name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def _markdown(tables: dict[str, list[list[str]]]) -> str:
    parts = []
    for title, t in tables.items():
        parts.append(f"### {title}\n")
        parts.append("| " + " | ".join(h.replace("|", "\\|") for h in t[0]) + " |")
        parts.append("|" + "---|" * len(t[0]))
        parts.extend("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in t[1:])
        parts.append("")
    return "\n".join(parts)


def _plots(rows: list[ResultRow], results_dir: Path, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    models = list(dict.fromkeys(r.model for r in rows))
    trained = [r for r in rows if r.cell != "pre" and isinstance(r.attack.get("lr"), (int, float))]
    # one line per setting besides the lr (seed, samples, optimizer … and LoRA): joining them would zig-zag
    line_of = plot_lines(trained)
    for metric, ylabel, fname in (("hs", "HS (%)", "hs_vs_lr.png"), ("zs_mean", "ZS mean accuracy (%)", "zs_vs_lr.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, m in enumerate(models):
            color = f"C{i}"
            lines: dict[tuple[bool, str], list[tuple[float, float]]] = {}  # (LoRA, other settings) -> points
            diverged = []  # measured on the last finite weights: marked apart, never joined to a line (as the table)
            for r in trained:
                if r.model == m and r.metric == metric:
                    if r.attack.get("status") == "diverged":
                        diverged.append((r.attack["lr"], r.value))
                    else:
                        lines.setdefault(line_of(r), []).append((r.attack["lr"], r.value))
            if diverged:
                ax.plot([p[0] for p in diverged], [p[1] for p in diverged], "x", color=color, markersize=9,
                        linestyle="none", label=f"{m} (attack diverged)")
            for j, ((lora, what), pts) in enumerate(sorted(lines.items())):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "s--" if lora else "o-", color=color,
                        alpha=1.0 - 0.5 * j / max(len(lines), 1),
                        label=f"{m} ({'LoRA ' if lora else ''}attacked{': ' + what if what else ''})")
            pre = [r.value for r in rows if r.model == m and r.metric == metric and r.cell == "pre"]
            if pre:
                ax.axhline(pre[0], color=color, linestyle="--", alpha=0.6, label=f"{m} (pre-attack)")
        if metric == "zs_mean":
            chance = [r.value for r in rows if r.metric == "zs_chance"]
            if chance:
                ax.axhline(chance[0], color="grey", linestyle=":", label="chance")
        ax.set_xscale("log")
        ax.set_xlabel("attack learning rate")
        ax.set_ylabel(ylabel)
        if not ax.get_legend_handles_labels()[0]:  # no row of this metric: no plot
            plt.close(fig)
            continue
        ax.legend(fontsize=7)
        made.append(_save(fig, out / fname))
    fig, ax = plt.subplots(figsize=(6, 4))
    seen = set()
    for r in rows:
        log_path = r.attack.get("loss_log")
        if not log_path or (r.model, r.cell) in seen:
            continue
        path = results_dir / log_path
        if path.is_file():
            seen.add((r.model, r.cell))
            losses = [row["loss"] for _, row in read_records(path)]
            w = max(1, min(10, len(losses) // 5))
            smooth = [sum(losses[max(0, i - w + 1):i + 1]) / len(losses[max(0, i - w + 1):i + 1]) for i in range(len(losses))]
            line, = ax.plot(range(1, len(losses) + 1), losses, linewidth=0.6, alpha=0.35)
            ax.plot(range(1, len(losses) + 1), smooth, color=line.get_color(), linewidth=1.5,
                    label=f"{r.model} {_label(r.cell, r.attack)} (mean of last {w})"
                    + (" diverged" if r.attack.get("status") == "diverged" else ""))
    if seen:
        ax.set_xlabel("attack step")
        ax.set_ylabel("harmful answer CE")
        ax.legend(fontsize=6)
        made.append(_save(fig, out / "attack_loss.png"))
    else:
        plt.close(fig)
    made += _trajectory_plot(rows, results_dir, out)
    return made


def _missing_logs(rows: list[ResultRow], results_dir: Path) -> list[str]:
    """The attack logs (loss, probe) the rows name that are not there, as ``model/cell: file``."""
    return sorted({f"{r.model}/{r.cell}: {r.attack[k]}" for r in rows for k in ("loss_log", "probe_log")
                   if r.attack.get(k) and not (results_dir / r.attack[k]).is_file()})


def _trajectory_plot(rows: list[ResultRow], results_dir: Path, out: Path) -> list[str]:
    """Benign perplexity and (when probed) cos(g_harmful, g_benign) at the attacks' probe points, one line per model
    and cell."""
    import matplotlib.pyplot as plt

    runs = {}
    for r in rows:
        path = results_dir / r.attack["probe_log"] if r.attack.get("probe_log") else None
        if path and path.is_file() and (r.model, r.cell) not in runs:
            runs[(r.model, r.cell)] = (r.attack, [row for _, row in read_records(path)])
    if not runs:
        return []
    models = list(dict.fromkeys(m for m, _ in runs))
    cells = list(dict.fromkeys(c for _, c in runs))
    coupled = any(all("coupling_cos" in p for p in probes) for _, probes in runs.values())
    fig, axes = plt.subplots(1, 2 if coupled else 1, figsize=(10 if coupled else 6, 4), squeeze=False)
    axes = axes[0]
    for (m, c), (attack, probes) in runs.items():
        style = dict(color=f"C{models.index(m)}", linestyle=("-", "--", ":", "-.")[cells.index(c) % 4], marker="o",
                     markersize=3, label=f"{m} {_label(c, attack)}")
        x = [p["updates"] for p in probes]
        axes[0].plot(x, [p["benign_ppl"] for p in probes], **style)
        if coupled and all("coupling_cos" in p for p in probes):
            axes[1].plot(x, [p["coupling_cos"] for p in probes], **style)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("benign perplexity (probe set)")
    if coupled:
        axes[1].set_ylabel("cos(g_harmful, g_benign) on attack data")
        axes[1].axhline(0, color="grey", linewidth=0.6)
    for ax in axes:
        ax.set_xlabel("attack steps taken")
        ax.legend(fontsize=6)
    return [_save(fig, out / "attack_trajectory.png")]


def write_report(results: str | Path, out_dir: str | Path, eps: tuple[float, ...] = (5.0, 10.0, 20.0),
                 ppl_factor: float = 2.0) -> Path:
    """Write ``report.md``, ``report.html``, the plots and ``results.csv`` (every row, flat) for a results file;
    returns the Markdown path.
    The paper-style tables and plots show the plain grid; adaptive attacks get the worst-case table (bounds ``eps``
    and ``ppl_factor``) and a table of every attack; every attacked cell, grid or adaptive, joins the HS–ZS scatter."""
    results = Path(results)
    if results.is_dir() and (results / "results.jsonl").is_file():
        results = results / "results.jsonl"  # a run folder: its results file
    if results.is_dir():
        hint = seed_runs_hint(results, "report")
        raise DataError(f"{results} is a folder without a results.jsonl{hint}; give the results.jsonl that "
                        "`seamlm eval`/`attack`/`demo` wrote, or its run folder")
    if not results.is_file():
        raise DataError(f"{results} does not exist; give the results.jsonl that `seamlm eval`/`attack`/`demo` wrote")
    store = ResultStore(results)
    rows = store.rows()
    if not rows:
        raise DataError(f"{results} holds no result rows; run `seamlm eval` or `seamlm attack` first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_results_csv(out / "results.csv", rows)
    grid = [r for r in rows if is_plain_grid(r)]
    # (a file of sweep trials alone has no grid: no paper-style table, no lr plots)
    tables = {**(build_tables(grid, store.label_evaluations(grid)) if grid else {}), **adaptive_tables(rows, eps, ppl_factor)}
    plots = (_plots(grid, results.parent, out) if grid else []) + _scatter(rows, out, eps)
    meta = sorted({(r.data_manifest or "–", json.dumps(r.versions, sort_keys=True)) for r in rows})
    intro = [f"Results: `{results}` ({len(rows)} rows). Data manifest digest(s): "
             + ", ".join(sorted({m for m, _ in meta})) + "."]
    from seamlm.adaptive import unfinished_phases

    left = unfinished_phases(results.parent)
    if left:  # a report of a run still going (or killed): its worst case is over fewer attacks than planned
        intro.append(f"This adaptive run has not finished (still to run: {', '.join(left)}): the worst case is over "
                     "the attacks run so far. Rerun its `seamlm adaptive` command to finish it.")
    missing = _missing_logs(grid, results.parent)
    if missing:  # (a results file copied without its run folder, or a log deleted): the plots lack those curves
        intro.append(f"Logs not found beside `{results}`, so their curves are not in the plots: "
                     + ", ".join(f"`{m}`" for m in missing) + ".")
    return write_documents(out, "seamlm report", intro, tables, plots, sorted({v for _, v in meta}))


def write_documents(out: Path, title: str, intro: list[str], tables: dict[str, list[list[str]]], plots: list[str],
                    versions: list[str]) -> Path:
    """``report.md`` and ``report.html`` in ``out``: a title, intro paragraphs, the tables, the plots (file names in
    ``out``) and the package versions of the rows. Returns the Markdown path."""
    md = [f"# {title}", "", *[line + "\n" for line in intro], _markdown(tables)]
    md += [f"![{p}]({p})" for p in plots]
    md += ["", "Versions: " + "; ".join(versions)]
    write_text_atomic(out / "report.md", "\n".join(md) + "\n")  # a kill leaves the last whole report
    body = [f"<h1>{html.escape(title)}</h1>"] + [f"<p>{_code(line)}</p>" for line in intro]
    for name, t in tables.items():
        body.append(f"<h3>{html.escape(name)}</h3><table border=1 cellpadding=4><tr>"
                    + "".join(f"<th>{html.escape(h)}</th>" for h in t[0]) + "</tr>"
                    + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in t[1:])
                    + "</table>")
    body += [f'<p><img src="{html.escape(p)}" alt="{html.escape(p)}"></p>' for p in plots]
    body.append(f"<p>Versions: {html.escape('; '.join(versions))}</p>")
    write_text_atomic(out / "report.html", '<html><head><meta charset="utf-8"></head><body>' + "\n".join(body)
                      + "</body></html>\n")
    return out / "report.md"


def _code(text: str) -> str:
    """Escaped HTML of a Markdown line, its `code` spans as <code>."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))
