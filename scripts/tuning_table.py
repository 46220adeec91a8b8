"""One Markdown row per demo directory: the SEAM settings, the defence log's end state, and the measured outcome.

    python scripts/tuning_table.py runs/tune/*/         # the table in docs/demo-tuning.md comes from this

Every number is read from the run's own files (``demo_config.json``, ``models/seam/log.jsonl``, ``results.jsonl``).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from seamlm.results import ResultStore  # noqa: E402


def _fmt(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _lookahead(cfg: dict) -> str:
    lr = cfg.get("defense_lookahead_lr", 0.0)  # absent from demos run before the option existed
    if not lr:
        return "–"
    weight = cfg.get("defense_lookahead_weight", 1.0)
    return f"{lr:g} × {cfg.get('defense_lookahead_steps', 1)}" + (f", w {weight:g}" if weight != 1 else "")


def _mean_or_blank(rows: list[dict], key: str, fmt: str) -> str:
    return fmt.format(statistics.mean(r[key] for r in rows)) if all(key in r for r in rows) else ""


def summarize(run: Path) -> str | None:
    cfg_path, log_path = run / "demo_config.json", run / "models" / "seam" / "log.jsonl"
    if not cfg_path.is_file() or not log_path.is_file():
        return None
    cfg = json.loads(cfg_path.read_text())
    log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    tail = log[-5:]
    rows = ResultStore(run / "results.jsonl").rows() if (run / "results.jsonl").exists() else []
    val = {(r.model, r.attack.get("lr", "pre"), r.metric): r.value for r in rows}

    def cell(model: str, lr: object) -> str:
        hs, ref = val.get((model, lr, "hs")), val.get((model, lr, "refusal_rate"))
        zs, ppl = val.get((model, lr, "zs_mean")), val.get((model, lr, "coherence_ppl"))
        return f"{_fmt(hs)} / {_fmt(ref, 0)} / {_fmt(zs)} / {_fmt(ppl)}"

    lrs = cfg["attack_lrs"]
    parts = [
        run.name, str(cfg["defense_steps"]), f"{cfg['defense_beta']:g}", f"{cfg['defense_lr']:g}",
        cfg["defense_unlearn_loss"], f"{cfg['defense_epsilon']:g}", _lookahead(cfg),
        f"{statistics.mean(r['cos_g_a_g_b'] for r in tail):+.2f}" + _mean_or_blank(tail, "cos_lookahead", " (θ': {:+.2f})"),
        f"{statistics.mean(r['ce_harmful'] for r in tail):.2f}", f"{statistics.mean(r['ce_benign'] for r in tail):.2f}",
        cell("aligned", "pre"), cell("seam", "pre"),
        *[f"{cell('aligned', lr)} → {cell('seam', lr)}" for lr in lrs],
    ]
    return "| " + " | ".join(parts) + " |"


def main() -> None:
    runs = [Path(a) for a in sys.argv[1:]]
    lrs = next((json.loads((r / "demo_config.json").read_text())["attack_lrs"] for r in runs
                if (r / "demo_config.json").is_file()), [])
    head = ["run", "steps", "β", "lr", "L_ul", "ε", "look-ahead η × k", "cos (last 5)", "CE(H) (last 5)", "CE(B) (last 5)",
            "aligned pre", "SEAM pre", *[f"attack lr {lr:g}: aligned → SEAM" for lr in lrs]]
    print("Cells: HS % / refusal % / ZS % / benign perplexity.\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for run in runs:
        line = summarize(run)
        if line:
            print(line)


if __name__ == "__main__":
    main()
