"""The controlled persona experiment of EX-RM vs IM-RM (arXiv 2507.07981), built as the authors do.

Source: Anthropic's model-written persona statements (e.g. agreeableness.jsonl: rows
{question, statement, answer_matching_behavior, ...}). Prompts are the questions whose matching
answer is "Yes"; a seeded permutation puts the first `n_train` in "train" and the next `n_test`
in "test". `words="train"`: one pair a prompt, chosen = a random "yes" prefix + word, rejected =
a random "no" prefix + word (TRAIN_YES / TRAIN_NO). `words="unseen"`: per prompt one random
unseen prefix a side and every unseen yes word x no word (UNSEEN_YES / UNSEEN_NO), so the
accuracy over the pairs is the authors' average of P(r_yes > r_no) + P(tie)/2 over word pairs.
The random draws use numpy's generator seeded with `seed` (not the authors' torch stream, so
the prompts chosen differ from theirs; the construction is the same).
"""

from __future__ import annotations

import itertools
import os

import numpy as np

from qprobe.core.types import Prompt
from qprobe.errors import ConfigError, DataError
from qprobe.tasks.pairs import Pair, read_rows

# (prefixes, words) of each side, from the paper's persona setup
TRAIN_YES = (("In my view, the answer is ", "A truthful reply is "), ("yes", "sure"))
TRAIN_NO = (("My judgement: ", "Considering the statement, I say "), ("no", "never"))
UNSEEN_YES = (("My response would be ",), ("certainly", "absolutely"))
UNSEEN_NO = (("I lean toward ",), ("not really", "nope"))
SPLITS, WORDS = ("train", "test"), ("train", "unseen")


def persona_pairs(path: str | os.PathLike[str], split: str = "train", words: str = "train", n_train: int = 80,
                  n_test: int = 40, seed: int = 0) -> list[Pair]:
    """Pairs of the persona experiment (see the module docstring)."""
    if split not in SPLITS or words not in WORDS:
        raise ConfigError(f"expected split in {list(SPLITS)} and words in {list(WORDS)}, got '{split}' and '{words}'")
    if n_train < 1 or n_test < 1:
        raise ConfigError(f"expected n_train >= 1 and n_test >= 1 prompts, got {n_train} and {n_test}")
    rows = [r for r in read_rows(path) if str(r.get("answer_matching_behavior", "")).strip().lower() == "yes"]
    if any("question" not in r for r in rows) or len(rows) < n_train + n_test:
        raise DataError(f"expected at least {n_train + n_test} persona rows with a 'question' and matching answer "
                        f"'Yes' in '{path}', got {len(rows)}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))
    picked = order[:n_train] if split == "train" else order[n_train : n_train + n_test]
    draw = np.random.default_rng([seed, 1 if words == "train" else 2])
    out = []
    for i in picked:
        q = str(rows[i]["question"])
        prompt = Prompt(id=str(i), text=q, messages=({"role": "user", "content": q},))
        if words == "train":
            yes = TRAIN_YES[0][draw.integers(2)] + TRAIN_YES[1][draw.integers(2)]
            no = TRAIN_NO[0][draw.integers(2)] + TRAIN_NO[1][draw.integers(2)]
            out.append(Pair(str(i), prompt, yes, no))
            continue
        yes_prefix = UNSEEN_YES[0][draw.integers(len(UNSEEN_YES[0]))]
        no_prefix = UNSEEN_NO[0][draw.integers(len(UNSEEN_NO[0]))]
        for a, b in itertools.product(UNSEEN_YES[1], UNSEEN_NO[1]):
            out.append(Pair(f"{i}:{a}:{b}", prompt, yes_prefix + a, no_prefix + b))
    return out
