"""Outputs of report.py: results/mbpp.json, report.json, REPORT.md and fig*.png, with the claims
paragraph written from the numbers (so it stays true when the report is rerun on more data)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.core.files import write_json_atomic

SPLITS = {"mbpp_test": "MBPP-test", "humaneval": "HumanEval"}
# Table 1 of the paper (Code-LLaMA-7B, k=48, beta=0.1, 464 MBPP-train problems): MBPP-test, HumanEval
PAPER = {"pass@1": (0.29, 0.24), "greedy": (0.38, 0.30), "mse (fast)": (0.38, 0.29), "ce (fast)": (0.40, 0.32),
         "pg (fast)": (0.46, 0.34), "mse (paper)": (0.38, 0.29), "ce (paper)": (0.40, 0.32),
         "pg (paper)": (0.46, 0.34), "pass@k": (0.76, 0.77),
         "5-shot greedy": (0.42, 0.33), "5-shot + pg": (0.52, 0.39)}  # the paper's 5-shot row is greedy
# Tables 2 and 5 (gpt-3.5 samples, k=48): probes on CodeLlama-70B states / on text-embedding-3-small,
# MBPP-test and HumanEval; pass@1 0.65 / 0.54, pass@48 0.80 / 0.81.
PAPER_API = {"mse": ((0.68, 0.57), (0.65, 0.54)), "ce": ((0.69, 0.64), (0.65, 0.54)),
             "pg": ((0.69, 0.58), (0.66, 0.54))}
SPLITS_ALL = {**SPLITS, "humaneval_api": "HumanEval through the API server"}
COLLECT = ("QPROBE=.venv/bin/qprobe bash benchmarks/repro/collect.sh  "
           "# into runs/repro-full (every feature); its stage c writes the committed copies runs/repro")
FROM_COPIES = (
    "The committed copies in `runs/repro` hold each run's rows (texts, rewards) with only L18_mean and "
    "Eminilm_mean (`qprobe copy`; the full runs are about five times larger). `report.py --runs runs/repro` "
    "reproduces every table from them except the layer sweep, which then compares the kept features only; "
    "to restore the other features of a run: `qprobe embed runs/repro/RUN --feature -1:last --feature -1:mean "
    "--feature 12:mean --feature 18:last --feature 21:last --feature-dtype float16` (llama.cpp re-evaluates "
    "each prompt+completion; cosine > 0.999 to the states captured while generating).")


# -------------------------------------------------------------------------------- verdicts
def verdict(ci: list[float] | None) -> str:
    if ci is None:
        return "not measured"
    if ci[1] > 0:
        return "holds"
    if ci[2] < 0:
        return "does not hold (reversed, CI < 0)"
    return "inconclusive (CI includes 0)"


def fmt_ci(ci: list[float] | None, sign: bool = False) -> str:
    if ci is None:
        return "n/a"
    f = "{:+.3f}" if sign else "{:.3f}"
    return f"{f.format(ci[0])} [{f.format(ci[1])}, {f.format(ci[2])}]"


def cell(row: dict[str, Any] | None) -> str:
    return "n/a" if row is None else fmt_ci([row["mean"], *row["ci"]])


def combine(parts: list[str]) -> str:
    if any(p.startswith("does not") for p in parts):
        return "does not hold"
    if parts and all(p == "holds" for p in parts):
        return "holds"
    return "inconclusive"


def claims(r: dict[str, Any]) -> list[str]:
    """One sentence per claim of the paper, each with its verdict and the numbers behind it."""
    out, comp, splits = [], r["table1"]["comparisons"], list(r["test_prompts"])
    sizes = f"{r['train_prompts']} MBPP-train problems, " + ", ".join(
        f"{r['test_prompts'][s]} {SPLITS[s]} problems" for s in splits) + f", n={r['n']} samples each"
    out.append(f"Data actually used: {sizes} (the paper: 464 train problems, 500/164 test problems, 200 "
               f"samples, k=48). Verdicts use 95% paired bootstrap CIs over test problems at k={r['k']}, "
               f"beta={r['beta']}, fast recipe, {r['seeds']} seeds.")
    for s in splits:
        parts = [verdict(comp["pg-ce"][s]), verdict(comp["ce-mse"][s])]
        out.append(f"**L_PG > L_CE > L_Q** ({SPLITS[s]}): {combine(parts)} — pg-ce {fmt_ci(comp['pg-ce'][s], True)} "
                   f"({parts[0]}), ce-mse {fmt_ci(comp['ce-mse'][s], True)} ({parts[1]}); pg-mse "
                   f"{fmt_ci(comp['pg-mse'][s], True)}.")
    f3 = r["figure3"]
    for s in splits:
        g, d = f3["gain_k"]["pg"][s], [f3["gain_k_diff"][f"pg-{b}"][s] for b in ("mse", "ce")]
        if g is None:
            continue
        pg_up, slope = verdict(g), combine([verdict(x) for x in d])
        if pg_up == "holds" and slope == "holds":
            v = "holds"
        elif pg_up.startswith("does not") or slope == "does not hold":
            v = "does not hold"
        elif pg_up == "holds":
            v = "partly: L_PG improves with k, but its advantage over L_Q/L_CE in that improvement is inconclusive"
        else:
            v = "inconclusive"
        others = ", ".join(f"{b} {fmt_ci(f3['gain_k'][b][s], True)}" for b in ("mse", "ce"))
        out.append(f"**L_PG keeps improving with k while L_Q/L_CE do not** ({SPLITS[s]}, k={f3['k_lo']} -> "
                   f"{f3['k_hi']}): {v} — pg {fmt_ci(g, True)}, {others}; pg's gain minus mse's "
                   f"{fmt_ci(d[0], True)}, minus ce's {fmt_ci(d[1], True)}.")
    f2 = r["figure2"]
    total, sizes_l = f2["sizes"][-1], f2["sizes"]
    at = max([x for x in sizes_l if x <= 50] or [sizes_l[0]])
    full = (f2["curves"]["pg"][str(total)].get("mbpp_test") or {})
    part = (f2["curves"]["pg"][str(at)].get("mbpp_test") or {})
    if total <= 50 or not full:
        out.append(f"**Most of the gain with ~50 training prompts**: cannot be tested — only {total} training "
                   "problems collected.")
    else:
        frac = part["gain"][0] / full["gain"][0] if full["gain"][0] > 0 else float("nan")
        if verdict(full["gain"]) != "holds":
            v = "inconclusive (the gain with all training problems is not significant)"
        else:
            v = "holds" if frac >= 0.5 else "does not hold"
        out.append(f"**Most of the gain with ~50 training prompts** (MBPP-test, pg): {v} — gain over pass@1 "
                   f"with {at} problems {fmt_ci(part['gain'], True)}, with {total} {fmt_ci(full['gain'], True)} "
                   f"(fraction {frac:.2f}; {f2['seeds']} seeds, each its own random subset).")
    if not any(v is not None for v in comp.get("5shot+pg-5shot", {}).values()):
        out.append("**Few-shot and Q-probe add up**: not collected (no mbpp-test-5shot / humaneval-5shot runs).")
    shot_problems = fewshot_block(r["table1"], str(r["k"]))[2]
    for s in splits:
        add, over = comp.get("5shot+pg-5shot", {}).get(s), comp.get("5shot+pg-pg", {}).get(s)
        if add is None:
            continue
        g5 = comp.get("5shot greedy-greedy", {}).get(s)
        vs_g5 = comp.get("5shot+pg-5shot greedy", {}).get(s)
        where = f", on the {shot_problems[s]} problems of the 5-shot runs" if s in shot_problems else ""
        out.append(f"**Few-shot and Q-probe add up** ({SPLITS[s]}{where}): {combine([verdict(add), verdict(over)])} — "
                   f"5-shot + pg minus 5-shot pass@1 {fmt_ci(add, True)}, minus zero-shot pg {fmt_ci(over, True)}"
                   + (f", minus 5-shot greedy (the paper's baseline) {fmt_ci(vs_g5, True)}" if vs_g5 is not None else "")
                   + (f"; 5-shot greedy minus greedy {fmt_ci(g5, True)}" if g5 is not None else "") + ".")
    api = r.get("api_setting", {}).get("splits", {})
    for s, a in api.items():
        diffs = a["own_minus_external"]
        parts = [verdict(diffs[loss]) for loss in diffs]
        out.append(f"**External embeddings help less than the generator's own states** ({SPLITS_ALL[s]}, k={a['k']}): "
                   f"{combine(parts)} — own minus {r['api_setting']['external']} per loss: "
                   + ", ".join(f"{loss} {fmt_ci(d, True)}" for loss, d in diffs.items()) + ".")
    f4 = r["figure4"]
    for s in ["mbpp_train", *splits]:
        if s not in f4.get("pg", {}):
            continue
        p = {loss: f4[loss][s]["pearson"] for loss in ("mse", "ce", "pg")}
        track = all(p[loss][1] > 0 for loss in ("mse", "ce"))
        less = all(p["pg"][0] < p[loss][0] for loss in ("mse", "ce"))
        v = "holds" if track and less else ("partly (they track it, pg as much)" if track else "does not hold")
        name = SPLITS.get(s, "MBPP-train")
        out.append(f"**L_Q/L_CE probes track problem difficulty, L_PG less** ({name} problems): {v} — Pearson r "
                   + ", ".join(f"{loss} {fmt_ci(p[loss])}" for loss in p) + " (Fisher CIs; pg-vs-others is a "
                   "comparison of point estimates).")
    for s in splits:
        g = comp["greedy-pass@1"][s]
        if g is not None:
            out.append(f"Greedy beats pass@1 ({SPLITS[s]}): {verdict(g)} — {fmt_ci(g, True)}.")
    return out


# ------------------------------------------------------------------------------- markdown
def fewshot_block(t1: dict[str, Any], kk: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
    """(full-set rows, 5-shot block rows, problems per split of the block) of Table 1 at k=kk.

    The 5-shot runs cover a subset of each test split: their rows never sit in a table of full-set
    rows, only in their own block, beside the zero-shot rows on the same problems. A report.json
    of the older layout (5-shot rows among the full-set rows) is split the same way; its block then
    holds the 5-shot rows alone (each still paired with the zero-shot pass@1 of its problems)."""
    rows = t1["rows"][kk]
    main = {name: row for name, row in rows.items() if not name.startswith("5-shot")}
    fewshot = t1.get("fewshot")  # the older layout: a list of the 5-shot splits
    block = fewshot.get(kk) if isinstance(fewshot, dict) else None
    if isinstance(block, dict) and "rows" in block:
        return main, block["rows"], block["problems"]
    shots = {name: row for name, row in rows.items() if name.startswith("5-shot")}
    problems: dict[str, int] = {}
    for row in shots.values():
        for split, x in row.items():
            if x is not None:
                problems[split] = x["n_prompts"]
    return main, shots, problems


def subset_title(problems: dict[str, int], sizes: dict[str, int]) -> str:
    return ", ".join(f"{'the first ' if n < sizes.get(s, n) else 'all '}{n} {SPLITS[s]}" for s, n in problems.items())


def method_table(rows: dict[str, Any], splits: list[str], paper: bool = True, extra: dict[str, str] | None = None,
                 names: dict[str, str] = SPLITS) -> list[str]:
    head = "| method |" + "".join(f" {names[s]} | gain vs pass@1 | gap closed |" for s in splits)
    head += (" paper MBPP / HE |" if paper else "") + ("".join(f" {h} |" for h in extra) if extra else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, row in rows.items():
        line = f"| {name} |"
        for s in splits:
            x = row.get(s)
            gap = "n/a" if x is None or x["gap_closed"] is None else f"{x['gap_closed'][0]:.2f} [{x['gap_closed'][1]:.2f}, {x['gap_closed'][2]:.2f}]"
            line += f" {cell(x)} | {fmt_ci(x['gain'], True) if x else 'n/a'} | {gap} |"
        if paper:
            key = "pass@k" if name.startswith("pass@") and name != "pass@1" else name
            line += f" {' / '.join(str(v) for v in PAPER[key])} |" if key in PAPER else " |"
        lines.append(line)
    return lines


def api_markdown(r: dict[str, Any]) -> list[str]:
    """The API-setting table (paper Tables 2 and 5): own states vs an external embedding."""
    a = r.get("api_setting", {})
    if not a.get("splits"):
        return []
    md = ["## API setting: the generator's own states vs an external embedding (paper Sec. 6.3, Tables 2 and 5)", "",
          f"Probes trained on MBPP-train with the generator's own **{'+'.join(a['own'])}** or the external "
          f"**{a['external']}** (all-MiniLM-L6-v2, mean-pooled over prompt+completion), {r['seeds']} seeds, beta="
          f"{r['beta']}. The HumanEval-API run's samples came through llama-cpp-python's OpenAI-compatible server "
          "(`--backend openai --backend-option serve=default`); its own states were added afterwards from the same "
          "GGUF (`qprobe embed --backend llamacpp`). The paper: gpt-3.5 samples, CodeLlama-70B states (Table 2) or "
          "text-embedding-3-small (Table 5), k=48.", ""]
    for s, x in a["splits"].items():
        md += [f"{SPLITS_ALL[s]} ({x['problems']} problems, n={x['n']}, k={x['k']}):", ""]
        md += method_table({name: {s: row} for name, row in x["rows"].items()}, [s], paper=False, names=SPLITS_ALL)
        md += ["", "| loss | own minus external (paired) | paper: CodeLlama-70B / OpenAI embedding, MBPP / HE |",
               "|---|---|---|"]
        for loss, d in x["own_minus_external"].items():
            ext, emb = PAPER_API[loss]
            md.append(f"| {loss} | {fmt_ci(d, True)} | {ext[0]} / {ext[1]} vs {emb[0]} / {emb[1]} |")
        md.append("")
    return md


def visible_markdown(r: dict[str, Any], splits: list[str]) -> list[str]:
    """benchmarks/repro/visible.py: the execution yardstick (not a probe)."""
    v = r.get("visible_test")
    if not v or not v["rates"]:
        return []
    md = ["### Yardstick, not a probe: running the candidates on the test the prompt shows (visible.py)", "",
          "An MBPP prompt shows one of its tests. Keeping the candidates that pass it (CodeT-style filtering) "
          "executes model-written code at selection time, which a Q-probe never does; it is here so the probes "
          "can be judged against what a user could do instead. "
          + " ".join(f"{SPLITS[s]}: {x['passed_visible']:.3f} of the samples pass the visible test; their reward "
                     f"rate is {x['reward_given_passed']:.3f}"
                     + (f", of those failing it {x['reward_given_failed']:.3f}."
                        if x["reward_given_failed"] is not None else ".") for s, x in v["rates"].items()), ""]
    return md + method_table(v["rows"], splits, paper=False) + [""]


def consensus_markdown(r: dict[str, Any], splits: list[str]) -> list[str]:
    """benchmarks/repro/consensus.py: probe value plus agreement with the other candidates."""
    c = r.get("consensus")
    if not c:
        return []
    k = r["k"]
    md = ["### Q-probe + consensus among the candidates (consensus.py)", "",
          "Score of candidate i in its set S: Q(x, a_i) + lam * mean similarity to the other members of S "
          "(Jaccard of token sets, or cosine of centred features); expected return exact over all "
          f"k-subsets. lam and similarity chosen by {c['criterion']}: **{c['best']}** (CV "
          f"{c['cv'][c['best']]:.4f}; lam=0, the plain pg probe: "
          + ", ".join(f"{kd} {c['cv'][f'{kd} lam=0']:.4f}" for kd in c["kinds"][:1]) + "). "
          "\"only\" rows drop the probe (lam large, no training: self-consistency / MBR).", ""]
    md += method_table(c["rows"], splits, paper=False)
    chosen = next(iter(c["rows"].values()))
    closed = {s: chosen[s]["gap_closed"][0] for s in splits if chosen.get(s) and chosen[s]["gap_closed"]}
    md += ["", f"Gap closed at k={k} by the CV-chosen setting: "
           + ", ".join(f"{SPLITS[s]} {v:.2f}" for s, v in closed.items())
           + (" — the goal (0.5) is reached on " + ", ".join(SPLITS[s] for s, v in closed.items() if v >= 0.5)
              if any(v >= 0.5 for v in closed.values()) else " — the goal (0.5) is not reached") + ".", ""]
    return md


def markdown(r: dict[str, Any], results: Path) -> str:
    splits, t1, k = list(r["test_prompts"]), r["table1"], r["k"]
    argv = " ".join(shlex.quote(a) for a in r["argv"])
    md = [f"# Q-probe reproduction: Table 1 and Figures 2-4 on {r['model']}", "",
          f"Model {r['model']}, temperature 0.8, top_p 0.95, n={r['n']} samples per problem, chat prompts. Probes "
          f"trained on {r['train_prompts']} MBPP-train problems (only those with all {r['n']} samples scored), "
          f"feature **{'+'.join(r['feature'])}** (chosen by CV on MBPP-train, see the layer sweep), "
          f"headline k={k}, beta={r['beta']}, {r['seeds']} probe seeds (paper recipe: "
          f"{t1['paper_seeds']}). Test problems: " + ", ".join(f"{SPLITS[s]} {n}" for s, n in r["test_prompts"].items())
          + ". Expected return is exact over all k-subsets of the n samples (qprobe.metrics); intervals are 95% "
          "bootstrap over test problems; gains are paired against pass@1 on the same problems; gap closed = "
          "(method - pass@1) / (pass@k - pass@1) at the same k (interval: the gain's, over the fixed gap).", "",
          "Commands:", "", "```", COLLECT, f"python benchmarks/repro/report.py {argv}", "```", "", FROM_COPIES, ""]
    md += [f"Note: {n}" for n in r["notes"]] + ([""] if r["notes"] else [])
    md += ["## Claims of the paper on our model", ""] + [f"- {c}" for c in claims(r)] + [""]
    for kk in t1["rows"]:
        main, shots, problems = fewshot_block(t1, kk)
        md += [f"## Table 1 at k={kk}" + (" (headline)" if int(kk) == k else " (all samples)"), ""]
        md += method_table(main, splits) + [""]
        if shots:
            md += [f"### 5-shot on successes at k={kk}: on {subset_title(problems, r['test_prompts'])} problems only", "",
                   "The 5-shot runs cover these problems only: every row of this table is on them (compare within "
                   "it, not with the table above); gains are paired against the zero-shot pass@1 of the same problems.",
                   ""]
            md += method_table(shots, [s for s in splits if s in problems]) + [""]
    md += api_markdown(r)
    md += ["The paper's numbers are Code-LLaMA-7B with k=48 of 200 samples (its pass@k column is pass@48); "
           "ours are a 0.5B model with k of 16. Greedy rows use only problems present in the greedy run.", ""]
    f2 = r["figure2"]
    md += ["## Figure 2: test return vs number of training problems", "",
           f"Fast recipe, MBPP-test expected return (the figure plots the paired gain over pass@1), k={k}, "
           f"beta={r['beta']}, {f2['seeds']} seeds (each a random subset).", "",
           "| loss |" + "".join(f" {s} |" for s in f2["sizes"]), "|---|" + "---|" * len(f2["sizes"])]
    for loss, c in f2["curves"].items():
        md.append(f"| {loss} |" + "".join(f" {cell(c[str(s)].get('mbpp_test'))} |" for s in f2["sizes"]))
    md += ["", "![fig2](fig2_train_size.png)", ""]
    f3 = r["figure3"]
    md += [f"## Figure 3: return vs k (beta={r['beta']})", ""]
    for s in splits:
        show = sorted({1, f3["k_lo"], k, f3["k_hi"]})
        md += [f"{SPLITS[s]}:", "", "| method |" + "".join(f" k={x} |" for x in show), "|---|" + "---|" * len(show)]
        for name, ys in f3["curves"][s].items():
            if ys is not None:
                md.append(f"| {name} |" + "".join(f" {ys[x - 1]:.3f} |" for x in show))
        md += ["", f"![fig3](fig3_{s}.png)", ""]
    f4 = r["figure4"]
    md += ["## Figure 4: per-problem probe value vs base success rate", "",
           "| loss | split | Pearson r [95% CI] | Spearman rho (p) |", "|---|---|---|---|"]
    for loss, per in f4.items():
        for s, v in per.items():
            md.append(f"| {loss} | {s} | {fmt_ci(v['pearson'])} | {v['spearman']:.3f} ({v['spearman_p']:.2g}) |")
    md += ["", "![fig4](fig4_difficulty.png)", "", f"## beta sweep (k={k}; beta enters at evaluation only)", "",
           "| method |" + "".join(f" beta={b} {SPLITS[s]} |" for b in ("0.0", "0.01", "0.1", "1.0") for s in splits),
           "|---|" + "---|" * (4 * len(splits))]
    for name, per in r["beta_sweep"].items():
        md.append(f"| {name} |" + "".join(f" {cell(per[b].get(s))} |" for b in per for s in splits))
    fs = r["feature_sweep"]
    md += ["", f"## Layer / pooling sweep (fast recipe, {fs['seeds']} seeds, k={k})", "",
           "CV = mean held-out expected return over folds of MBPP-train prompts (the selection criterion); "
           f"chosen per loss: {fs['chosen_per_loss']}; headline: {'+'.join(fs['headline'])}.", "",
           "| feature | loss | CV (train) |" + "".join(f" {SPLITS[s]} | gain |" for s in splits),
           "|---|---|---|" + "---|---|" * len(splits)]
    for key, per in fs["keys"].items():
        for loss in ("mse", "ce", "pg"):
            md.append(f"| {key} | {loss} | {per[loss]['cv']:.4f} |" + "".join(
                f" {cell(per[loss]['test'].get(s))} | {fmt_ci(per[loss]['test'][s]['gain'], True) if per[loss]['test'].get(s) else 'n/a'} |"
                for s in splits))
    pp = r["push_past"]
    md += ["", "## Pushing past the paper", "",
           f"Goal: close at least half of the pass@1 -> pass@{k} gap. The final method is chosen by {pp['criterion']}"
           " — on training data only, never on the test numbers below. For scale, the same CV folds give "
           + ", ".join(f"{n} {v:.4f}" for n, v in pp["cv_baselines"].items()) + ".", ""]
    md += method_table({f"{n} (CV {v['cv']:.4f})": v["test"] for n, v in pp["rows"].items()}, splits, paper=False)
    best = pp["rows"][pp["best"]]["test"].get("mbpp_test")
    reached = best is not None and best["gap_closed"] is not None and best["gap_closed"][0] >= 0.5
    md += ["", f"Chosen by CV: **{pp['best']}** — MBPP-test gap closed "
           + (f"{best['gap_closed'][0]:.2f}" if best and best["gap_closed"] else "n/a")
           + (": the goal is reached." if reached else ": the goal (0.5) is not reached."), ""]
    md += consensus_markdown(r, splits)
    md += visible_markdown(r, splits)
    tm = r["timings"]
    md += ["## Runtime", "", ", ".join(f"{n} {v:.0f} s" for n, v in tm.items() if n != "probes_fitted")
           + f"; {tm['probes_fitted']} probe trainings cached (1 torch thread).", "",
           f"Raw numbers: report.json; Table 1 summary: {results}.", ""]
    return "\n".join(md)


# -------------------------------------------------------------------------------- figures
def draw_figures(r: dict[str, Any], out: Path) -> list[Path]:
    from qprobe.evaluation.plots import new_axes, save

    made: list[Path] = []
    axes = new_axes()
    if axes is None:
        return made
    fig, ax = axes
    f2 = r["figure2"]
    for loss, c in f2["curves"].items():
        rows = [c[str(s)].get("mbpp_test") for s in f2["sizes"]]
        if all(x is not None for x in rows):  # the paired gain: its CI is not swamped by problem variance
            y = np.array([x["gain"][0] for x in rows])
            lo, hi = np.array([x["gain"][1] for x in rows]), np.array([x["gain"][2] for x in rows])
            ax.errorbar(f2["sizes"], y, yerr=[y - lo, hi - y], marker="o", ms=3, capsize=2, label=loss)
    ax.axhline(0.0, ls="--", color="gray", label="pass@1")
    ax.set_xscale("log")
    ax.set_xticks(f2["sizes"], [str(s) for s in f2["sizes"]])
    ax.minorticks_off()
    ax.set_xlabel("training problems (MBPP-train, random subset per seed)")
    ax.set_ylabel(f"MBPP-test gain over pass@1 (k={r['k']})")
    save(fig, ax, "Fig. 2: gain over pass@1 vs training set size (paired 95% CI)", out / "fig2_train_size.png")
    made.append(out / "fig2_train_size.png")
    for s, curves in r["figure3"]["curves"].items():
        fig, ax = new_axes()
        for name, ys in curves.items():
            if ys is not None:
                ax.plot(r["figure3"]["k"], ys, marker="o", ms=3, label=name,
                        linestyle="--" if name.startswith("pass@") or "paper" in name else "-")
        ax.set_xlabel("k (candidates)")
        ax.set_ylabel("expected return")
        save(fig, ax, f"Fig. 3: {SPLITS[s]} return vs k (beta={r['beta']})", out / f"fig3_{s}.png")
        made.append(out / f"fig3_{s}.png")
    fig, ax = new_axes()
    split = "mbpp_test" if "mbpp_test" in r["figure4"].get("pg", {}) else "mbpp_train"
    for loss, per in r["figure4"].items():
        v = per.get(split)
        if v:
            q = np.array(v["q"])
            q = (q - q.mean()) / (q.std() or 1.0)  # centred and normalised, as the paper's Fig. 4
            ax.scatter(v["r"], q, s=10, alpha=0.7, label=f"{loss} (r={v['pearson'][0]:.2f})")
    ax.set_xlabel("base model success rate of the problem")
    ax.set_ylabel("mean probe value (standardised)")
    save(fig, ax, f"Fig. 4: probe value vs difficulty ({split} problems)", out / "fig4_difficulty.png")
    made.append(out / "fig4_difficulty.png")
    return made


def summary(r: dict[str, Any]) -> dict[str, Any]:
    """results/mbpp.json: Table 1 at the headline k, {method: {split: [mean, low, high]}}."""
    rows, shots, problems = fewshot_block(r["table1"], str(r["k"]))
    names = {"pass@1": "pass@1", "greedy": "greedy", "mse (fast)": "mse", "ce (fast)": "ce", "pg (fast)": "pg",
             "mse (paper)": "mse (paper recipe)", "ce (paper)": "ce (paper recipe)", "pg (paper)": "pg (paper recipe)",
             f"pass@{r['k']}": "pass@k"}

    def cells(row: dict[str, Any]) -> dict[str, Any]:  # {split: [mean, low, high] or None}
        return {s: None if row.get(s) is None else [row[s]["mean"], *row[s]["ci"]] for s in r["test_prompts"]}

    methods = {new: cells(rows[old]) for old, new in names.items() if old in rows}
    pp = r["push_past"]
    best = pp["rows"][pp["best"]]["test"]
    methods[f"best by MBPP-train CV: {pp['best']}"] = cells(best)
    for name, row in r.get("consensus", {}).get("rows", {}).items():  # beyond the paper: set-dependent scores
        methods[f"consensus: {name}"] = cells(row)
    for name, row in r.get("visible_test", {}).get("rows", {}).items():  # executes code: not a probe
        if any(row.values()):
            methods[f"reference, runs the prompt's visible test (not a probe): {name}"] = cells(row)
    out = {"model": r["model"], "n": r["n"], "k": r["k"], "beta": r["beta"], "methods": methods}
    if shots:  # on a subset of the problems: apart from the full-set methods, with the zero-shot rows it is compared with
        out["fewshot_subset"] = {"problems": problems, "methods": {name: cells(row) for name, row in shots.items()}}
    return out


def write_outputs(r: dict[str, Any], out: Path, results: Path, figures: bool = True, say: Any = print) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results.parent.mkdir(parents=True, exist_ok=True)
    made = draw_figures(r, out) if figures else []
    write_json_atomic(out / "report.json", r)
    write_json_atomic(results, summary(r))
    text = markdown(r, results)
    tmp = out / "REPORT.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "REPORT.md")
    say(text.split("## Figure 2")[0])
    say(f"wrote {out / 'report.json'}, {out / 'REPORT.md'}, {results}" + "".join(f", {p}" for p in made))
    json.dumps(r)  # fail loudly here rather than on the next reader


def main(argv: list[str] | None = None) -> None:
    """Re-render REPORT.md and results/mbpp.json from a report.json without recomputing anything
    (figures only with --figures): for a change of presentation, not of numbers."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__.split("\n")[0] if main.__doc__ else None)
    ap.add_argument("--report", default="benchmarks/repro/report.json")
    ap.add_argument("--results", default="benchmarks/results/mbpp.json")
    ap.add_argument("--figures", action="store_true")
    args = ap.parse_args(argv)
    path = Path(args.report)
    write_outputs(json.loads(path.read_text()), path.parent, Path(args.results), figures=args.figures,
                  say=lambda *_: None)
    print(f"wrote {path.parent / 'REPORT.md'} and {args.results} from {path}")


if __name__ == "__main__":
    main()
