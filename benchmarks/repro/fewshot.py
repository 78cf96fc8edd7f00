"""Table 1's 5-shot block for report.py: the paper's "5-shot on successes" rows on the problems the
5-shot runs cover (a subset of each test split), beside the zero-shot rows on the same problems."""

from __future__ import annotations

from typing import Any

from methods import Method, mean_reward_values, pass_k_values


def fewshot_problems(ex: Any) -> dict[str, list[str]]:
    """Per split, the test problems every 5-shot run of it holds (the 5-shot runs cover a subset)."""
    out = {}
    for s in ex.tests:
        sets = [set(sp.prompts()) for sp in (ex.fewshot.get(s), ex.fewshot_greedy.get(s)) if sp is not None]
        if sets:
            out[s] = [p for p in ex.prompts[s] if all(p in x for x in sets)]
    return out


def fewshot_rows(ex: Any, key: tuple[str, ...], k: int) -> dict[str, Any]:
    """Table 1's few-shot rows at k, as their own block: 5 successful MBPP-train completions in
    context, greedy (the paper's "5-shot on successes"), sampled (pass@1, pass@k) and reranked by a
    pg probe trained on zero-shot MBPP-train samples, beside the zero-shot rows they are compared
    with, EVERY row on the same problems: those of the 5-shot runs (a subset of the test split).
    Gains are against the zero-shot pass@1 of those problems."""
    problems = fewshot_problems(ex)
    if not problems:
        return {"problems": {}, "rows": {}}

    def only(values: dict[str, float] | None, s: str) -> dict[str, float] | None:
        return None if values is None or s not in problems else {p: values[p] for p in problems[s] if p in values}

    shots = {s: sp for s, sp in ex.fewshot.items() if k <= sp.n}
    pg = Method("pg", loss="pg", keys=key)
    seeds, beta = ex.args.seeds, ex.args.beta
    rows = {
        "zero-shot pass@1": {s: ex.row(s, only(ex.p1[s], s), k) for s in ex.tests},
        "zero-shot greedy": {s: ex.row(s, only(mean_reward_values(ex.greedy[s]), s), k) if s in ex.greedy else None
                             for s in ex.tests},
        "zero-shot pg (fast)": {s: ex.row(s, only(ex.fits.values(pg, seeds, s, k, beta), s), k) if s in problems else None
                                for s in ex.tests},
        "5-shot greedy": {s: ex.row(s, only(mean_reward_values(ex.fewshot_greedy[s]), s), k) if s in ex.fewshot_greedy else None
                          for s in ex.tests},
        "5-shot pass@1": {s: ex.row(s, only(mean_reward_values(shots[s]), s), k) if s in shots else None for s in ex.tests},
        "5-shot + pg": {s: ex.row(s, only(ex.fits.values(pg, seeds, f"{s}_5shot", k, beta), s), k)
                        if s in shots else None for s in ex.tests},
        f"5-shot pass@{k}": {s: ex.row(s, only(pass_k_values(shots[s], k), s), k) if s in shots else None for s in ex.tests},
        f"zero-shot pass@{k}": {s: ex.row(s, only(ex.pk[(s, k)], s), k) for s in ex.tests},
    }
    rows = {name: row for name, row in rows.items() if any(v is not None for v in row.values())}
    if not any(name.startswith("5-shot") for name in rows):  # k > 5-shot n: no block
        rows = {}
    return {"problems": {s: len(p) for s, p in problems.items()}, "rows": rows}


def fewshot_comparisons(ex: Any, key: tuple[str, ...]) -> dict[str, Any]:
    """The paired differences behind the claim "few-shot and Q-probe add up", each over the problems
    both sides hold (so on the 5-shot runs' problems): per split, [mean, low, high] or None."""
    a, beta = ex.args, ex.args.beta
    pg = Method("pg", loss="pg", keys=key)
    fast_pg = {s: ex.fits.values(pg, a.seeds, s, ex.k, beta) for s in ex.tests}
    pg5 = {s: ex.fits.values(pg, a.seeds, f"{s}_5shot", ex.k, beta) if ex.k <= shot.n else None
           for s, shot in ex.fewshot.items()}
    greedy5 = {s: mean_reward_values(g) for s, g in ex.fewshot_greedy.items()}
    return {
        "5shot greedy-greedy": {s: ex.paired(greedy5[s], mean_reward_values(ex.greedy[s]))
                                if s in greedy5 and s in ex.greedy else None for s in ex.tests},
        "5shot pass@1-pass@1": {s: ex.paired(mean_reward_values(ex.fewshot[s]), ex.p1[s]) if s in ex.fewshot else None
                                for s in ex.tests},
        "5shot+pg-5shot": {s: ex.paired(pg5.get(s), mean_reward_values(ex.fewshot[s])) if s in ex.fewshot else None
                           for s in ex.tests},
        "5shot+pg-pg": {s: ex.paired(pg5.get(s), fast_pg[s]) for s in ex.tests},
        "5shot+pg-5shot greedy": {s: ex.paired(pg5.get(s), greedy5.get(s)) for s in ex.tests},
    }
