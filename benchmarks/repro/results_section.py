"""Write the reproduction's section of benchmarks/RESULTS.md (and its summary-table row) from
report.json, so that the figures there are the report's own after every rerun.

    python benchmarks/repro/results_section.py [--report benchmarks/repro/report.json] [--results benchmarks/RESULTS.md]

The section lies between the markers `<!-- repro:begin -->` and `<!-- repro:end -->`; the summary
row is the one starting `| Table 1 at k=`. The file is rewritten whole through a temporary file.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from render import PAPER, SPLITS, cell, claims, fewshot_block, fmt_ci, subset_title  # noqa: E402

BEGIN, END = "<!-- repro:begin -->", "<!-- repro:end -->"


def _mean(row: dict[str, Any] | None, s: str) -> str:
    x = (row or {}).get(s)
    return "n/a" if x is None else f"{x['mean']:.3f}"


def _gap(row: dict[str, Any] | None, s: str) -> str:
    x = (row or {}).get(s)
    return "n/a" if x is None or x["gap_closed"] is None else f"{x['gap_closed'][0]:.2f} [{x['gap_closed'][1]:.2f}, {x['gap_closed'][2]:.2f}]"


def table(r: dict[str, Any]) -> list[str]:
    """Table 1 at the headline k with the best variants beyond the paper, paper's numbers beside."""
    splits, k = list(r["test_prompts"]), r["k"]
    rows, shots, problems = fewshot_block(r["table1"], str(k))
    pp, cons, vis = r["push_past"], r.get("consensus", {}), r.get("visible_test", {}).get("rows", {})
    picked = {name: rows[name] for name in ("pass@1", "greedy", "mse (fast)", "ce (fast)", "pg (fast)",
                                            "mse (paper)", "ce (paper)", "pg (paper)") if name in rows}
    picked[f"best probe variant by MBPP-train CV: {pp['best']}"] = pp["rows"][pp["best"]]["test"]
    if cons.get("rows"):
        name = next(iter(cons["rows"]))
        picked[f"{name} (beyond the paper)"] = cons["rows"][name]
    for name, row in vis.items():
        if name.startswith("pg") and any(row.values()):
            picked[f"yardstick, not a probe (runs code): {name}"] = row
    picked[f"pass@{k}"] = rows[f"pass@{k}"]
    head = "| method | " + " | ".join(f"{SPLITS[s]} ({r['test_prompts'][s]}) | gap closed" for s in splits)
    lines = [head + " | paper MBPP / HE (CodeLlama-7B, k=48) |", "|---" * (2 * len(splits) + 2) + "|"]
    for name, row in picked.items():
        key = "pass@k" if name == f"pass@{k}" else name
        fewer = [f"first {row[s]['n_prompts']} {SPLITS[s]}" for s in splits
                 if row.get(s) and row[s].get("n_prompts", r["test_prompts"][s]) < r["test_prompts"][s]]
        name += f" ({', '.join(fewer)} problems)" if fewer else ""
        paper = " / ".join(str(v) for v in PAPER[key]) if key in PAPER else "-"
        cells = " | ".join(f"{cell(row.get(s))} | {_gap(row, s)}" for s in splits)
        lines.append(f"| {name} | {cells} | {paper} |")
    return lines + fewshot_table(r, shots, problems)


def fewshot_table(r: dict[str, Any], shots: dict[str, Any], problems: dict[str, int]) -> list[str]:
    """The paper's 5-shot rows, apart: the 5-shot runs cover a subset of the problems, so these rows
    are compared only with each other and with the zero-shot rows on the same problems."""
    if not shots:
        return []
    splits, k = [s for s in r["test_prompts"] if s in problems], r["k"]
    lines = ["", f"5-shot on successes (the paper's few-shot rows), on {subset_title(problems, r['test_prompts'])} "
             "problems only (the 5-shot runs cover those): compare these rows with each other, not with the table "
             "above; gain = paired difference to the zero-shot pass@1 of the same problems (this block alone: "
             "`python benchmarks/repro/report.py --runs runs/repro --fewshot-into benchmarks/repro/report.json`).", "",
             "| method (same problems) | " + " | ".join(f"{SPLITS[s]} ({problems[s]}) | gain vs zero-shot pass@1" for s in splits)
             + " | paper MBPP / HE |", "|---" * (2 * len(splits) + 2) + "|"]
    for name, row in shots.items():
        key = "pass@k" if name == f"zero-shot pass@{k}" else name
        paper = " / ".join(str(v) for v in PAPER[key]) if key in PAPER else "-"
        cells = " | ".join(f"{cell(row.get(s))} | {fmt_ci(row[s]['gain'], True) if row.get(s) else 'n/a'}" for s in splits)
        lines.append(f"| {name} | {cells} | {paper} |")
    return lines


def section(r: dict[str, Any]) -> str:
    splits, k = list(r["test_prompts"]), r["k"]
    sizes = ", ".join(f"{r['test_prompts'][s]} {SPLITS[s]}" for s in splits)
    fs = r["feature_sweep"]
    md = [BEGIN, f"## The paper's Table 1 / Figures 2-4, re-measured ({r['train_prompts']} MBPP-train, {sizes} problems)", "",
          "Full report with every table, figure and command: [repro/REPORT.md](repro/REPORT.md); machine-readable "
          "headline numbers: `results/mbpp.json`. Collected with `QPROBE=qprobe bash benchmarks/repro/collect.sh` "
          "(resumable, stages from small to the paper's sizes) into `runs/repro-full` (seven features a sample, not "
          "committed); its stage c writes the committed copies `runs/repro` (`qprobe copy`: rows + L18_mean + MiniLM). "
          "Analysed with `python benchmarks/repro/report.py --runs runs/repro-full --out "
          "benchmarks/repro` (`--runs runs/repro` gives every table but the layer sweep); this section is written "
          "from its report.json by `python benchmarks/repro/results_section.py`. "
          f"Default model ({r['model']}), n = {r['n']}, k = {k}, beta = {r['beta']}, {r['seeds']} probe seeds, probes "
          f"trained on MBPP-train only, feature {'+'.join(fs['headline'])} (best CV among the features every run "
          "carries). Cells: mean [95% bootstrap CI over problems]; gap closed = (method - pass@1) / "
          f"(pass@{k} - pass@1).", ""]
    md += table(r)
    md += ["", "The paper's claims on our model (verdicts from paired 95% bootstrap CIs over test problems):", ""]
    md += ["- " + line for line in claims(r)[1:]]
    pp = r["push_past"]
    best = pp["rows"][pp["best"]]["test"]
    closed = ", ".join(f"{SPLITS[s]} {best[s]['gap_closed'][0]:.2f}" for s in splits if best.get(s) and best[s]["gap_closed"])
    md += ["", f"Pushing past the paper (goal: close half the pass@1 -> pass@{k} gap): {len(pp['rows'])} probe variants "
           f"(layers, pooling, concatenated layers, within-prompt centring and PCA, listwise and Bradley-Terry losses, "
           f"MLP, seed and loss ensembles), the final one chosen by CV on MBPP-train: {pp['best']}, gap closed {closed}."]
    cons = r.get("consensus", {})
    if cons.get("rows"):
        name, row = next(iter(cons["rows"].items()))
        md[-1] += (f" Adding the candidates' agreement ({name}): "
                   + ", ".join(f"{SPLITS[s]} {_gap(row, s)}" for s in splits) + ".")
    vis = r.get("visible_test", {}).get("rows", {})
    for name, row in vis.items():
        if name.startswith("pg") and any(row.values()):
            md[-1] += (f" For scale, executing the candidates on the test an MBPP prompt shows ({name}; not a probe, "
                       "benchmarks/repro/visible.py): " + ", ".join(f"{SPLITS[s]} {_gap(row, s)}" for s in splits if row.get(s)) + ".")
    api = r.get("api_setting", {})
    if api.get("splits"):
        md += ["", f"API setting (paper Sec. 6.3; REPORT.md \"API setting\"): probes on the generator's own "
               f"{'+'.join(api['own'])} minus probes on the external {api['external']}, paired: "
               + "; ".join(f"{SPLITS.get(s, 'HumanEval through the API server')} ({x['problems']} problems) "
                           + ", ".join(f"{loss} {fmt_ci(d, True)}" for loss, d in x["own_minus_external"].items())
                           for s, x in api["splits"].items())
               + ". GSM8K best-of-k: `results/gsm8k_bestofk.md`."]
    return "\n".join(md + ["", END])


def summary_row(r: dict[str, Any]) -> str:
    splits, k = list(r["test_prompts"]), r["k"]
    rows = r["table1"]["rows"][str(k)]
    sizes = " / ".join(f"{SPLITS[s]} {r['test_prompts'][s]}" for s in splits)
    cons = r.get("consensus", {}).get("rows", {})
    cons_row = next(iter(cons.values())) if cons else None
    both = " / ".join
    return (f"| Table 1 at k={k} ({r['train_prompts']} MBPP-train problems; {sizes}) | pg {both(_mean(rows['pg (fast)'], s) for s in splits)}"
            f" vs pass@1 {both(_mean(rows['pass@1'], s) for s in splits)}"
            + (f"; pg + consensus {both(_mean(cons_row, s) for s in splits)}" if cons_row else "")
            + f"; pass@{k} {both(_mean(rows[f'pass@{k}'], s) for s in splits)} | close half the gap | "
            "`python benchmarks/repro/report.py --runs runs/repro-full` |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--report", default="benchmarks/repro/report.json")
    ap.add_argument("--results", default="benchmarks/RESULTS.md")
    args = ap.parse_args()
    r = json.loads(Path(args.report).read_text())
    path = Path(args.results)
    text = path.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"expected the markers {BEGIN} and {END} in {path}, got none; put them around the section")
    text = text[:text.index(BEGIN)] + section(r) + text[text.index(END) + len(END):]
    text, n = re.subn(r"^\| Table 1 at k=.*$", lambda _: summary_row(r), text, count=1, flags=re.M)
    if n != 1:
        sys.exit(f"expected a summary row starting '| Table 1 at k=' in {path}, got none")
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    print(f"wrote {path}: section from {args.report} ({r['train_prompts']} train problems)")


if __name__ == "__main__":
    main()
