"""Typed result rows, the append-only store, and the report built only from the rows."""

import csv
import json
import re

import pytest

from seamlm.errors import DataError
from seamlm.report import write_report
from seamlm.results import ResultRow, ResultStore


def _row(model="aligned", cell="pre", metric="hs", value=12.5, **kw):
    return ResultRow(model=model, defense="none", cell=cell, metric=metric, value=value,
                     judge="minilm-pyrit-v3" if metric in ("hs", "hs_binary", "hs_se") else None, **kw)


def test_validation():
    with pytest.raises(DataError, match="unknown metric"):
        _row(metric="accuracy").validate()
    with pytest.raises(DataError, match="name their judge"):
        ResultRow(model="m", defense="none", cell="pre", metric="hs", value=1.0).validate()
    with pytest.raises(DataError, match="NaN"):
        _row(value=float("nan")).validate()
    _row(value=float("nan"), cell="x", attack={"status": "diverged"}).validate()
    # a cosine with a zero gradient, a perplexity that overflowed: undefined, not a bug
    _row(metric="coupling_cos", value=float("nan")).validate()
    _row(metric="coherence_ppl", value=float("inf")).validate()
    with pytest.raises(DataError, match="zs_mean is inf"):
        _row(metric="zs_mean", value=float("inf")).validate()
    _row(metric="zs_arc_easy", value=50.0).validate()


def test_store_append_done_and_partial_tail(tmp_path):
    store = ResultStore(tmp_path / "r.jsonl")
    store.append([_row(), _row(metric="zs_mean", value=40.0)])
    assert store.done("aligned", "pre") and not store.done("aligned", "lr1") and not store.done("seam", "pre")
    with store.path.open("a") as f:  # a kill in the middle of a write
        f.write('{"model": "aligned", "cell": "lr1", "met')
    assert len(store.rows()) == 2 and not store.done("aligned", "lr1")
    store.append([_row(cell="lr1", attack={"lr": 1e-4})])
    assert len(store.rows()) == 3 and store.done("aligned", "lr1")
    assert all(json.loads(x) for x in store.path.read_text().splitlines())
    store.path.write_text(store.path.read_text() + "not json\n")
    with pytest.raises(DataError, match="not valid JSON"):
        store.rows()


def test_a_complete_row_missing_only_its_newline_counts_and_keeps_its_line(tmp_path, caplog):
    """A kill between a row's closing brace and its newline, or a hand edit whose editor dropped the file's last
    newline: the row is whole, so its cell is done, and the next append adds the newline instead of cutting it."""
    store = ResultStore(tmp_path / "r.jsonl")
    store.append([_row()])
    store.append([_row(cell="lr1", attack={"lr": 1e-4})])
    store.path.write_text(store.path.read_text()[:-1])  # the last write's newline never reached the disk
    assert store.done("aligned", "lr1") and store.done("aligned", "pre") and "cut short" not in caplog.text
    store.append([_row(cell="lr2", attack={"lr": 2e-4}, value=3.0)])
    assert [(r.cell, r.value) for r in store.rows()] == [("pre", 12.5), ("lr1", 12.5), ("lr2", 3.0)]
    assert store.path.read_text().count("\n") == 3
    store.path.write_text("\ufeff" + store.path.read_text())  # saved by an editor that writes a byte order mark
    assert len(store.rows()) == 3


def test_a_cell_whose_write_was_cut_short_is_not_done(tmp_path, caplog):
    """A kill (or a full disk) after some complete lines of a cell's write: those rows must not make it done."""
    store = ResultStore(tmp_path / "r.jsonl")
    store.append([_row(), _row(metric="zs_mean", value=40.0)])
    store.append([_row(cell="lr1", attack={"lr": 1e-4}, metric=m, value=1.0) for m in ("hs", "zs_mean", "coherence_ppl")])
    assert store.done("aligned", "lr1") and len(store.rows()) == 5
    lines = store.path.read_text().splitlines(keepends=True)
    store.path.write_text("".join(lines[:3]) + lines[3][:20])  # 1 of the cell's 3 rows written, then half a line
    assert not store.done("aligned", "lr1") and store.done("aligned", "pre")
    assert "cut short" in caplog.text and "aligned/lr1" in caplog.text
    store.append([_row(cell="lr1", attack={"lr": 1e-4}, metric=m, value=2.0) for m in ("hs", "zs_mean", "coherence_ppl")])
    assert [r.value for r in store.rows() if r.cell == "lr1"] == [2.0, 2.0, 2.0]  # the redone cell only


def test_report_tables_and_plots_come_from_the_rows(tmp_path):
    store = ResultStore(tmp_path / "results.jsonl")
    rows = []
    for model, base in (("aligned", 10.0), ("seam", 5.0)):
        rows += [_row(model, "pre", "hs", base), _row(model, "pre", "zs_mean", 50.0 + base),
                 _row(model, "pre", "refusal_rate", 90.0), _row(model, "pre", "coherence_ppl", 8.25),
                 _row(model, "pre", "zs_chance", 35.0)]
        for lr in (2e-5, 2e-4):
            cell = f"sft-full-adamw-lr{lr:g}-n10-ep1-s0"
            att = {"lr": lr, "seed": 0, "lora": False, "status": "ok", "loss_log": f"attacks/{model}/{cell}/loss.jsonl"}
            (tmp_path / att["loss_log"]).parent.mkdir(parents=True)
            (tmp_path / att["loss_log"]).write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
            rows += [_row(model, cell, "hs", base + lr * 1e5, attack=att), _row(model, cell, "zs_mean", 49.0, attack=att),
                     _row(model, cell, "attack_first_loss", 2.0, attack=att), _row(model, cell, "attack_final_loss", 1.5, attack=att)]
    store.append(rows)
    md_path = write_report(store.path, tmp_path / "report")
    md = md_path.read_text()
    assert "| model | pre-attack | lr 2e-05 | lr 0.0002 |" in md
    assert "| aligned | 10.0 / 60.0 | 12.0 / 49.0 | 30.0 / 49.0 |" in md
    for png in ("hs_vs_lr.png", "zs_vs_lr.png", "attack_loss.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000
    # HS/ZS, refusal/perplexity, attack loss, the bar check (aligned and SEAM are both present), and the worst case,
    # in which the attacks without a perplexity count but are never in the bound
    assert (tmp_path / "report" / "report.html").read_text().count("<table") == 5
    assert "| aligned | 5 | none in the bound | – | – | – | 0 / 2 (2 not fully measured) |" in md
    assert "| SEAM before any attack: HS ≤ aligned's, ZS ≤ 3 points below | HS 5.0 vs 10.0, ZS 55.0 vs 60.0 | no |" in md
    assert "| alignment lowers HS by ≥ 10 points (raw → aligned, pre-attack) | – → 10.0 | not measured |" in md
    # results.csv: one line per row, its value, judge and attack settings in their own columns
    lines = list(csv.DictReader((tmp_path / "report" / "results.csv").open()))
    assert [(ln["model"], ln["cell"], ln["metric"], float(ln["value"]), ln["judge"], ln["attack.lr"]) for ln in lines] == [
        (r.model, r.cell, r.metric, r.value, r.judge or "", str(r.attack.get("lr", ""))) for r in rows]
    assert {ln["versions.torch"] for ln in lines} == {rows[0].versions["torch"]}
    # every number in the main table is a value of some row
    values = {f"{r.value:.1f}" for r in rows}
    body = [ln for ln in md.split("### ")[1].splitlines() if ln.startswith(("| aligned", "| seam"))]
    assert len(body) == 2
    for num in re.findall(r"\d+\.\d", "\n".join(body)):
        assert num in values, num
    assert "Logs not found" not in md
    with pytest.raises(DataError, match=r"results.csv is a CSV file: seamlm reads results from results.jsonl"):
        write_report(tmp_path / "report" / "results.csv", tmp_path / "again")  # the report's own flat copy
    gone = "attacks/seam/sft-full-adamw-lr0.0002-n10-ep1-s0/loss.jsonl"
    (tmp_path / gone).unlink()  # a log deleted (or the results file copied without its run): its curve is missing
    md = write_report(store.path, tmp_path / "report").read_text()
    assert f"so their curves are not in the plots: `seam/sft-full-adamw-lr0.0002-n10-ep1-s0: {gone}`." in md


def test_standard_errors_show_beside_hs_and_zs_where_a_cell_recorded_them(tmp_path):
    """Cells evaluated since the standard errors exist carry hs_se / zs_mean_se; older cells in the same file
    show their values alone. zs_mean_se is no zero-shot task of the per-task table."""
    store = ResultStore(tmp_path / "results.jsonl")
    store.append([_row("aligned", "pre", "hs", 10.0), _row("aligned", "pre", "zs_mean", 60.0),
                  _row("aligned", "pre", "zs_arc_easy", 60.0)])
    store.append([_row("seam", "pre", "hs", 5.0), _row("seam", "pre", "hs_se", 2.25),
                  _row("seam", "pre", "zs_mean", 55.0), _row("seam", "pre", "zs_mean_se", 4.5),
                  _row("seam", "pre", "zs_arc_easy", 55.0), _row("seam", "pre", "lmeval_arc_challenge", 31.25)])
    with pytest.raises(DataError, match="name their judge"):
        ResultRow(model="m", defense="none", cell="pre", metric="hs_se", value=1.0).validate()
    md = write_report(store.path, tmp_path / "report").read_text()
    assert "ZS % (mean accuracy) (± standard error over the prompts / the items)" in md
    assert "| aligned | 10.0 / 60.0 |" in md and "| seam | 5.0 ± 2.2 / 55.0 ± 4.5 |" in md
    assert "per task (arc_easy)" in md and "mean_se" not in md
    # lm-eval's tasks (lm_eval_tasks) get their own table
    assert "lm-evaluation-harness accuracy % per task (arc_challenge)" in md and "| seam | 31.2 |" in md


def test_columns_tell_apart_every_attack_setting_and_divergence_is_per_model():
    """Two SFT attacks at one lr that differ in optimizer get two headers that say so; an attack that diverged on
    one model marks that model's cells only."""
    from seamlm.report import build_tables

    rows = []
    for model in ("aligned", "seam"):
        for opt in ("adamw", "sgd"):
            status = "diverged" if (model, opt) == ("seam", "sgd") else "ok"
            att = {"lr": 2e-5, "seed": 0, "samples": 10, "optimizer": opt, "batch_size": 4, "status": status}
            rows += [_row(model, f"sft-full-{opt}-lr2e-05", m, 1.0, attack=att) for m in ("hs", "zs_mean")]
    table = next(iter(build_tables(rows).values()))
    assert table[0] == ["model", "lr 2e-05 opt=adamw", "lr 2e-05 opt=sgd"]
    assert table[1] == ["aligned", "1.0 / 1.0", "1.0 / 1.0"]
    assert table[2] == ["seam", "1.0 / 1.0", "1.0 / 1.0 (diverged)"]
    # seeds (numbers) sort as numbers, not as text
    seeded = [_row("m", f"c{seed}", "hs", 1.0, attack={"lr": 2e-5, "seed": seed}) for seed in (10, 2)]
    assert next(iter(build_tables(seeded).values()))[0] == ["model", "lr 2e-05 seed=2", "lr 2e-05 seed=10"]


def test_report_without_rows(tmp_path):
    with pytest.raises(DataError, match="none.jsonl does not exist"):
        write_report(tmp_path / "none.jsonl", tmp_path / "r")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no result rows"):
        write_report(tmp_path / "empty.jsonl", tmp_path / "r")


def test_columns_that_no_label_tells_apart_carry_their_cell_key():
    """Attacks that differ only in a setting no header names (weight decay here) would get equal headers; the
    cell key makes them distinct. A LoRA rank shows on LoRA columns only."""
    from seamlm.report import build_tables

    rows = [_row("m", cell, "hs", 1.0, attack={"lr": 1e-2, "seed": 0}) for cell in ("sft-a", "sft-a-h1b2c3d")]
    header = next(iter(build_tables(rows).values()))[0]
    assert header == ["model", "lr 0.01 [sft-a]", "lr 0.01 [sft-a-h1b2c3d]"]
    rows = [_row("m", "full", "hs", 1.0, attack={"lr": 1e-4, "lora": False, "lora_r": None}),
            _row("m", "lora", "hs", 1.0, attack={"lr": 2e-3, "lora": True, "lora_r": 8})]
    assert next(iter(build_tables(rows).values()))[0] == ["model", "lr 0.0001", "LoRA lr 0.002 r=8"]


def test_columns_name_the_settings_that_vary():
    from seamlm.report import build_tables

    rows = [_row("m", f"c{n}", "hs", 1.0, attack={"lr": 1e-4, "samples": n, "epochs": 1, "seed": 0}) for n in (10, 20)]
    header = next(iter(build_tables(rows).values()))[0]
    assert header == ["model", "lr 0.0001 n=10", "lr 0.0001 n=20"]


def test_lr_plots_draw_one_line_per_other_setting_and_markdown_cells_are_escaped(tmp_path, monkeypatch):
    """Two attack seeds are two lines (one line through both would zig-zag between them), LoRA cells a line of
    their own; a '|' in a label does not shift the Markdown table's columns."""
    import seamlm.report as report

    labels = {}

    def keep(fig, path):
        labels[path.name] = [ln.get_label() for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")]
        return path.name

    monkeypatch.setattr(report, "_save", keep)
    rows = [_row("a|b", "pre", "hs", 5.0)]
    for seed in (0, 1):
        for lr in (1e-5, 1e-4):
            rows.append(_row("a|b", f"c{seed}{lr}", "hs", 10.0 + seed, attack={"lr": lr, "seed": seed, "lora": False}))
    rows.append(_row("a|b", "lora", "hs", 30.0, attack={"lr": 1e-3, "seed": 0, "lora": True, "lora_r": 8}))
    report._plots(rows, tmp_path, tmp_path)
    attacked = [lab for lab in labels["hs_vs_lr.png"] if "attacked" in lab]
    assert attacked == ["a|b (attacked: seed=0)", "a|b (attacked: seed=1)", "a|b (LoRA attacked: seed=0)"]
    # two cells that only their keys' -h digests tell apart (e.g. another weight decay): two lines, not one
    labels.clear()
    wd = [_row("m", f"sft-full-adamw-lr{lr:g}-n8-ep1-b4-s0{h}", "hs", v, attack={"lr": lr, "seed": 0, "lora": False})
          for lr in (1e-5, 1e-4) for h, v in (("", 10.0), ("-h0a1b2c", 20.0))]
    report._plots(wd, tmp_path, tmp_path)
    assert [lab for lab in labels["hs_vs_lr.png"] if "attacked" in lab] == [
        "m (attacked: other settings default)", "m (attacked: other settings h0a1b2c)"]
    # a diverged attack (measured on its last finite weights) is a mark of its own, not a point on the line
    labels.clear()
    points = {}

    def keep_points(fig, path):
        points[path.name] = {ln.get_label(): list(ln.get_xdata()) for ln in fig.axes[0].get_lines()}
        return path.name

    monkeypatch.setattr(report, "_save", keep_points)
    report._plots([_row("m", "a", "hs", 40.0, attack={"lr": 1e-5, "lora": False}),
                   _row("m", "b", "hs", 0.0, attack={"lr": 1e-4, "lora": False, "status": "diverged"})],
                  tmp_path, tmp_path)
    assert points["hs_vs_lr.png"] == {"m (attacked)": [1e-5], "m (attack diverged)": [1e-4]}
    store = ResultStore(tmp_path / "results.jsonl")
    store.append(rows)
    md = write_report(store.path, tmp_path / "rep").read_text()
    assert "| a\\|b | 5.0 / – |" in md
    assert '<meta charset="utf-8">' in (tmp_path / "rep" / "report.html").read_text()


def test_one_label_is_one_model_one_judge_one_data_bundle(tmp_path):
    store = ResultStore(tmp_path / "r.jsonl")
    parts = {"model": "sha256:aaa", "judge": "minilm-pyrit-v3", "data": "d1",
             "eval": {"hs_prompts": 32, "zs_tasks": ["arc_easy"], "coupling_examples": 8, "prompt_template": "chat",
                      "gen_batch_size": 16}}
    store.append([_row(settings="s1")], settings_parts=parts)
    # a setting that changes no compared figure, a template-shift cell, a figure one cell skips: fine
    for other in ({"gen_batch_size": 4}, {"prompt_template": "alpaca"}, {"coupling_examples": 0}, {"zs_tasks": []}):
        store.check_label("aligned", {**parts, "eval": {**parts["eval"], **other}})
    # what HS or ZS measures must not change within a label: the report compares its cells with the pre-attack one
    for other, said in (({"hs_prompts": 64}, "eval.hs_prompts: 32 → 64"), ({"zs_tasks": ["boolq"]}, "eval.zs_tasks"),
                        ({"judge_model": "my/deberta"}, "eval.judge_model: '' → 'my/deberta'"),
                        ({"coupling_examples": 16}, "eval.coupling_examples: 8 → 16")):
        with pytest.raises(DataError, match=re.escape(said)):
            store.check_label("aligned", {**parts, "eval": {**parts["eval"], **other}})
    store.check_label("seam", {**parts, "model": "sha256:bbb"})  # another label: fine
    for key, value in (("model", "sha256:bbb"), ("judge", "keyword-v4"), ("data", "d2")):
        with pytest.raises(DataError, match=f"already holds cells of 'aligned' made with another {key}"):
            store.check_label("aligned", {**parts, key: value})
    store.check_label("aligned", {**parts, "model": "sha256:bbb"}, same_models={"sha256:aaa"})  # an older name
    # labels that name one folder (samples/<label>/, attacks/<label>/) would overwrite each other's answers
    for clash in ("aligned/", "./aligned", "aligned "):
        with pytest.raises(DataError, match="share the folder name 'aligned'"):
            store.check_label(clash, parts)


def test_a_file_of_sweep_trials_alone_reports_them_without_empty_grid_tables(tmp_path):
    store = ResultStore(tmp_path / "results.jsonl")
    att = {"recipe": "sft", "trial": 0, "lr": 1e-4, "status": "ok"}
    store.append([_row("seam", "sweep-sft-a", m, v, attack=att)
                  for m, v in (("hs", 40.0), ("zs_mean", 50.0), ("coherence_ppl", 9.0))])
    md = write_report(store.path, tmp_path / "rep").read_text()
    assert "judge: )" not in md and "HS % (judge" not in md
    assert "Adaptive attacks: every recipe run and sweep trial" in md and "| seam | sweep |" in md
    assert not (tmp_path / "rep" / "hs_vs_lr.png").exists()


def test_the_report_bar_does_not_compare_labels_evaluated_differently(tmp_path):
    """Two `seamlm eval` runs into one file, the second with another HS prompt count: the bar's side-by-side
    criterion reads each label's settings record and says the two are not comparable."""
    from seamlm.report import write_report

    store = ResultStore(tmp_path / "results.jsonl")
    for label, n in (("aligned", 32), ("seam", 100)):
        parts = {"model": f"/m/{label}", "judge": "j", "data": "d", "eval": {"hs_prompts": n, "seed": 0}}
        store.append([_row(label, "pre", "hs", 10.0, settings=f"s{label}"),
                      _row(label, "pre", "zs_mean", 60.0, settings=f"s{label}")], settings_parts=parts)
    assert store.label_evaluations(store.rows())["seam"]["hs_prompts"] == 100
    md = write_report(store.path, tmp_path / "report").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| SEAM before any attack"))
    assert "not comparable" in line and "eval.hs_prompts: 100 vs 32" in line and line.endswith("| not measured |")


@pytest.mark.parametrize("line, message", [
    ('[1, 2]', "is a JSON list, not a result row"),
    ('{"model": "aligned", "cell": "pre", "metric": "hs"}', r"has no \['defense', 'value'\]"),
    ('{"model": "a", "defense": "none", "cell": "pre", "metric": "hs", "value": 1, "judge": "j", "bogus": 1}',
     r"unknown fields \['bogus'\]"),
    ('{"model": "a", "defense": "none", "cell": "pre", "metric": "hs", "value": 1, "judge": "j", "write": "abc"}',
     "write 'abc' is not '<id>/<rows>'"),
    ('{"model": "a", "defense": "none", "cell": "pre", "metric": "hs", "value": 1, "judge": "j", "attack": 3}',
     "attack and versions must be JSON objects"),
    ('{"model": "a", "defense": "none", "cell": "pre", "metric": "hs", "value": "high", "judge": "j"}',
     "value must be a number"),
    # text fields that are not text: each named, never an AttributeError in the report
    ('{"model": 1, "defense": "none", "cell": "pre", "metric": "hs", "value": 1, "judge": "j"}',
     "model must be a JSON string, got 1: repair or delete that line"),
    ('{"model": "a", "defense": "none", "cell": ["a"], "metric": "hs", "value": 1, "judge": "j"}',
     r'cell must be a JSON string, got \["a"\]'),
    ('{"model": "a", "defense": "none", "cell": "pre", "metric": {"x": 1}, "value": 1, "judge": "j"}',
     "metric must be a JSON string"),
    ('{"model": "a", "defense": "none", "cell": "pre", "metric": "hs", "value": 1, "judge": 3}',
     "judge must be a JSON string or null, got 3"),
])
def test_a_hand_edited_row_is_a_clear_error_naming_its_line(tmp_path, line, message):
    store = ResultStore(tmp_path / "r.jsonl")
    store.append([_row()])
    with store.path.open("a") as f:
        f.write(line + "\n")
    with pytest.raises(DataError, match=f"r.jsonl:2.*{message}"):
        store.rows()


def test_one_labels_lm_eval_scores_come_from_one_document_set(tmp_path):
    """lm-eval's limit, local task files and version decide its scores: cells that both ran lm-eval tasks must
    share them (a cell without lm-eval, or with other tasks, is fine)."""
    store = ResultStore(tmp_path / "r.jsonl")
    ev = {"hs_prompts": 32, "zs_tasks": ["arc_easy"], "lm_eval_tasks": ["arc_easy"], "lm_eval_limit": 50,
          "lm_eval_version": "0.4.13"}
    parts = {"model": "sha256:aaa", "judge": "j", "data": "d1", "eval": ev}
    store.append([_row(settings="s1")], settings_parts=parts)
    without = {k: v for k, v in ev.items() if not k.startswith("lm_eval")}
    for other in (without, {**ev, "lm_eval_tasks": ["boolq"]}):
        store.check_label("aligned", {**parts, "eval": other})
    for other, said in (({"lm_eval_limit": 0}, "eval.lm_eval_limit: 50 → 0"),
                        ({"lm_eval_version": "0.5.0"}, "eval.lm_eval_version: '0.4.13' → '0.5.0'"),
                        ({"lm_eval_include_digest": "ab12"}, "eval.lm_eval_include_digest: None → 'ab12'")):
        with pytest.raises(DataError, match=re.escape(said)):
            store.check_label("aligned", {**parts, "eval": {**ev, **other}})


def test_rows_of_one_key_that_disagree_are_refused_naming_the_file_and_lines(tmp_path, capsys):
    """Two runs' results files joined into one (a label evaluated two ways): the report would key the rows by
    (model, cell, metric) and show the later row's values only, with no word of the other."""
    from seamlm.cli import main

    runs = []
    for i, (value, settings) in enumerate(((10.0, "s1"), (50.0, "s2"))):
        store = ResultStore(tmp_path / f"run{i}" / "results.jsonl")
        store.append([_row(model="tiny", value=value, settings=settings), _row(model="tiny", metric="zs_mean",
                                                                             value=40.0, settings=settings)])
        runs.append(store.path.read_text())
    joined = tmp_path / "cat.jsonl"
    joined.write_text("".join(runs))
    assert main(["report", str(joined), "--out", str(tmp_path / "rep")]) == 1
    err = capsys.readouterr().err
    assert f"{joined}: lines 1 and 3 both hold hs of model 'tiny', cell 'pre'" in err
    assert "value 10.0 vs 50.0; settings 's1' vs 's2'" in err and "Traceback" not in err
    assert not (tmp_path / "rep" / "report.md").exists()
    # one setting alone differing is refused as well (the values may agree by chance)
    store = ResultStore(tmp_path / "settings.jsonl")
    store.append([_row(settings="s1")])
    store.append([_row(settings="s2")])
    with pytest.raises(DataError, match=r"lines 1 and 2 .*\(settings 's1' vs 's2'\)"):
        store.rows()


def test_equal_repeated_rows_are_accepted_as_before(tmp_path):
    """A results file joined to itself repeats each row unchanged (NaN included): nothing disagrees."""
    store = ResultStore(tmp_path / "r.jsonl")
    store.append([_row(settings="s1"), _row(cell="x", attack={"status": "diverged"}, value=float("nan"), settings="s1")])
    store.path.write_text(store.path.read_text() * 2)
    assert len(store.rows()) == 4
    write_report(store.path, tmp_path / "rep")
