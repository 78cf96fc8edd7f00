"""Token credits of one prompt's candidates: a linear probe's score of each completion-token state.

The states are the run's stored per-token feature of the probe's layer (`L{layer}_tokens`) when it
has one whose rows match the tokenizer's tokens, else they are computed for that one prompt with
the run's own back-end (or the back-end the probe's features came from), as `qprobe embed` does:
the completion re-tokenised from its text. The token strings always come from that back-end's
tokenizer (`Embedder.token_pieces`), one per state row.

Only linear probes (one linear layer, `LinearProbe` and the token probe): their score of a state
matrix [t, d] is the per-row score [t], and its mean is the score of the mean-pooled state.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from qprobe.core.types import Completion
from qprobe.errors import ConfigError, DataError, SpecMismatchError
from qprobe.evaluation.credits import CandidateCredits, CreditMap
from qprobe.features.spec import FeatureRequest, FeatureSpec
from qprobe.store.run import Run


def is_linear(probe: Any) -> bool:
    """Whether the probe's Q is one affine map of the (standardised) features."""
    params = getattr(probe, "params_", None)
    if not isinstance(params, dict):
        return False
    return sum(1 for k in params if k.startswith("layers.") and k.endswith(".weight")) == 1


def check_probe(probe: Any, run: Run, where: str) -> FeatureSpec:
    """The probe's feature spec, refused unless the probe is linear and its feature is a hidden-state
    layer of the run's model."""
    arch = getattr(probe, "architecture", type(probe).__name__)
    if not is_linear(probe):
        raise ConfigError(
            f"expected a linear probe (per-token scores need a linear head), got a '{arch}' probe in "
            f"{where}; train one with `qprobe train --arch linear` (or a token probe)"
        )
    spec = getattr(probe, "feature_spec_", None)
    if spec is None:
        raise SpecMismatchError(f"expected a probe that records its feature spec, got none in {where}; "
                                "train it with `qprobe train --run ...`")
    if spec.embedder:
        raise SpecMismatchError(
            f"expected a probe on a hidden-state layer of the run's model, got one on the external "
            f"embedder '{spec.embedder}' ({where}); credits need the model's own token states"
        )
    want = str(run.manifest.get("model", {}).get("sha256") or "")
    if spec.sha256 and want and spec.sha256 != want:
        raise SpecMismatchError(
            f"expected a probe trained on the run's model (sha256 {want[:12]}), got {spec.describe()} "
            f"({where}); use a probe trained on this model's features"
        )
    return spec


def prompt_rows(run: Run, prompt_id: str) -> list[tuple[int, dict[str, Any]]]:
    """(row number in storage order, row) of the prompt's samples, by sample index."""
    table = run.table().to_pylist()
    rows = [(i, r) for i, r in enumerate(table) if r["prompt_id"] == prompt_id]
    if not rows:
        ids = list(dict.fromkeys(r["prompt_id"] for r in table))
        raise DataError(
            f"expected a prompt id of run {run.path}, got '{prompt_id}'; it has {len(ids)} prompts, "
            f"e.g. {', '.join(repr(i) for i in ids[:5])}"
        )
    return sorted(rows, key=lambda ir: int(ir[1]["sample_index"]))


def stored_states(run: Run, key: str, spec: FeatureSpec, numbers: list[int]) -> list[np.ndarray] | None:
    """The run's stored per-token states [t, d] of these row numbers, or None when the run has no
    `key` of the probe's dimension and weights."""
    if key not in run.feature_keys:
        return None
    stored = run.feature_spec(key)
    if stored.pooling != "tokens" or stored.dim != spec.dim or (spec.sha256 and stored.sha256 != spec.sha256):
        return None
    wanted = set(numbers)
    got = {i: np.asarray(a, dtype=np.float32) for i, a in enumerate(run.token_features(key)) if i in wanted}
    return [got[i] for i in numbers]


def credit_map(probe: Any, run_path: str | os.PathLike[str], prompt_id: str, *, model: str | None = None,
               backend_options: dict[str, Any] | None = None, probe_name: str = "") -> CreditMap:
    """Token credits of every candidate of `prompt_id` in the run, with the probe's per-token scores."""
    from qprobe.collection.embed import backend_for, prompt_for
    from qprobe.features import make_embedder

    run = Run.open(run_path)
    where = probe_name or "the probe"
    spec = check_probe(probe, run, where)
    rows = prompt_rows(run, prompt_id)
    text = str(rows[0][1]["prompt"])
    comps = [Completion(r["completion"], int(r["n_tokens"]), r["finish_reason"], int(r["seed"])) for _, r in rows]
    request = FeatureRequest(spec.layer, "tokens")
    run_backend = run.manifest.get("backend", {}).get("name")
    other = spec.backend if spec.backend and spec.backend != run_backend else None
    backend = backend_for(run, model, other, **(backend_options or {}))
    try:
        embedder = make_embedder(backend, "")
        try:
            pieces = embedder.token_pieces(comps)
            states = stored_states(run, request.key, spec, [i for i, _ in rows])
            source = f"stored feature {request.key}"
            if states is None or any(len(s) != len(p) for s, p in zip(states, pieces, strict=True)):
                own = prompt_for(text, backend, run_backend)
                states = list(embedder.embed(own, comps, [request])[request.key])  # k arrays [t, d]
                source = f"computed by {backend.name} (layer {spec.layer}, completion re-tokenised)"
        finally:
            embedder.close()
    finally:
        backend.close()
    # A token probe names its per-token scorer; any other linear probe scores rows one by one.
    per_token = getattr(probe, "score_tokens", None) or probe.score
    candidates = []
    for (_, row), toks, h in zip(rows, pieces, states, strict=True):
        z = per_token(np.asarray(h, dtype=np.float32))  # [t]: the head is linear per row
        reward = row["reward"]
        candidates.append(CandidateCredits(int(row["sample_index"]), None if reward is None else float(reward),
                                           tuple(toks), z))
    about = (("probe", probe_name or type(probe).__name__), ("probe loss", str(getattr(probe, "loss", ""))),
             ("trained on", f"{spec.describe()}"), ("run", str(run.path)), ("token states", source))
    return CreditMap(prompt_id=prompt_id, prompt=text, candidates=tuple(candidates), about=about)
