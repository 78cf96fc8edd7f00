"""Token-level reward probes (Q-RM, arXiv 2505.23363): one linear head scores every response token.

Q-RM scores each response token t with Z_t = v . h_t and trains on preference pairs with
-log sigmoid(0.2 (mean_t Z_w - mean_t Z_l) - 2.0). With a frozen trunk and a linear head,
mean_t (v . h_t + b) = v . (mean_t h_t) + b, so Q-RM is a margin-BT linear probe on the
mean-pooled response states, and the per-token credits Z_t come for free from the same weights
(PAPER.md, Q-RM). Standardisation is affine too, so it folds into the head (`token_head`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from qprobe.errors import ConfigError, DataError, SpecMismatchError
from qprobe.features.spec import FeatureSpec
from qprobe.probes.models import ARCHITECTURES, LinearProbe, Probe

__all__ = ["AGGREGATIONS", "QRM_LOSS_OPTIONS", "TRAINED_AGGREGATIONS", "TokenProbe"]

AGGREGATIONS = ("mean", "min", "last")  # how token scores make a candidate's score for ranking
TRAINED_AGGREGATIONS = ("mean", "last")  # what a head can be trained on: the pooled feature of that name
QRM_LOSS_OPTIONS = {"beta": 0.2, "gamma": 2.0}  # Q-RM's margin-BT constants (homzer/Q-RM)


class TokenProbe(LinearProbe):
    """A linear head Z_t = v . h_t + b on a completion's token states, trained on pooled states.

    `aggregation` is what the head is trained for, recorded in its config: "mean" (Q-RM: the
    sequence score is the mean of the token scores, trained on mean-pooled features such as
    `L18_mean`; default loss `margin_bt` with beta 0.2, gamma 2.0) or "last" (the ORM baseline:
    Bradley-Terry on the last token's state only, `TokenProbe(aggregation="last", loss="bt")`
    trained on `L18_last`, a separately trained model; `LinearProbe(loss="bt")` on `L18_last`
    trains the same head, but only this class scores token states). Any pairwise or grouped loss
    of `qprobe ls` trains it too.

    Which tokens count: in qprobe every pooling (last, mean, tokens) uses the same tokens, the
    completion's kept tokens: the generated tokens of the text up to, not including, the stop
    sequence (re-tokenised when the stop began inside a token; a completion from elsewhere is its
    text tokenised); the end-of-sequence token is not included, and prompt tokens never count (an
    empty completion uses the last prompt token's state, one row). Q-RM's code appends EOS and
    scores it: its mean has one term more, and its ORM reads the EOS state where ours reads the
    last kept token's.

    Scoring (float64): `score(pooled [n, d])` gives the trained sequence score; `score_tokens(
    states [t, d]) -> [t]` the per-token credits, whose mean equals `score` of the mean-pooled
    states up to float rounding (stored float16 features round the pooled and the token states
    separately); `sequence_scores(list of [t_i, d], aggregation)` ranks candidates by "mean",
    "min" (the mean-trained head's weakest token) or "last".
    """

    architecture = "token"

    def __init__(self, *, aggregation: str = "mean", loss: str = "margin_bt",
                 loss_options: dict[str, Any] | None = None, **options: Any) -> None:
        if loss == "margin_bt":  # Q-RM's constants unless given: recorded in the config either way
            loss_options = {**QRM_LOSS_OPTIONS, **(loss_options or {})}
        super().__init__(loss=loss, loss_options=loss_options, **options)
        self.aggregation = aggregation

    def hyper_parameters(self) -> dict[str, Any]:
        return {"aggregation": self.aggregation}

    def layer_shapes(self, dim: int) -> list[tuple[int, int]]:
        if self.aggregation not in TRAINED_AGGREGATIONS:
            raise ConfigError(f"expected a TokenProbe trained for aggregation in {list(TRAINED_AGGREGATIONS)}, got "
                              f"{self.aggregation!r}; 'min' ranks with a mean-trained head: "
                              "sequence_scores(states, aggregation='min')")
        return super().layer_shapes(dim)

    # -- fitting -----------------------------------------------------------------------------
    def fit(self, features: np.ndarray | None = None, rewards: np.ndarray | None = None,
            groups: np.ndarray | None = None, *, pairs: tuple[np.ndarray, np.ndarray] | None = None,
            pair_rows: np.ndarray | None = None, spec: FeatureSpec | None = None,
            source: dict[str, Any] | None = None) -> Probe:
        """As `Probe.fit`, on pooled features whose pooling is `aggregation` (`spec`, when given,
        is checked: Q-RM trains on mean-pooled states, the ORM on last-token states)."""
        self.layer_shapes(1)  # a clear error for an aggregation no head is trained for
        if spec is not None and spec.pooling != self.aggregation:
            raise SpecMismatchError(
                f"expected {self.aggregation}-pooled features to train TokenProbe(aggregation='{self.aggregation}'), "
                f"got {spec.pooling} pooling ({spec.key}); pass a feature like L18_{self.aggregation}, or "
                f"aggregation='{spec.pooling}'" + (" (train on pooled states)" if spec.pooling == "tokens" else "")
            )
        return super().fit(features, rewards, groups, pairs=pairs, pair_rows=pair_rows, spec=spec, source=source)

    # -- the head ----------------------------------------------------------------------------
    def token_head(self) -> tuple[np.ndarray, float]:
        """(v [d], b) in raw feature space, standardisation folded in: Z_t = v . h_t + b (float64)."""
        self._check_fitted()
        v = self.params_["layers.0.weight"][0].astype(np.float64)  # [d]
        b = float(self.params_["layers.0.bias"][0])
        if self.mean_ is not None and self.scale_ is not None:
            v = v / self.scale_.astype(np.float64)  # (h - m) / s . w = h . (w / s) - m . (w / s)
            b -= float(self.mean_.astype(np.float64) @ v)
        return v, b

    def _matrix(self, x: Any, what: str) -> np.ndarray:
        try:
            arr = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError):  # a ragged list of token states
            arr = None
        if arr is None or arr.ndim != 2 or arr.shape[1] != self.n_features_in_:
            shape = f"shape {arr.shape}" if arr is not None else f"a ragged {type(x).__name__}"
            raise SpecMismatchError(
                f"expected {what} with d = {self.n_features_in_} (the probe's training features), got {shape}; "
                "pooled features [n, d] go to score(), one completion's token states [t, d] to score_tokens(), "
                "a list of them to sequence_scores()"
            )
        return arr

    # -- specs -------------------------------------------------------------------------------
    def check_spec(self, spec: FeatureSpec) -> None:
        """Refuse unless `spec` describes pooled features of the pooling the probe was trained on."""
        self._check_fitted()
        if spec.pooling != self.aggregation:
            hint = ("score them with score_tokens(states) or sequence_scores([...], spec=spec)"
                    if spec.pooling == "tokens" else f"use {self.aggregation}-pooled features")
            raise SpecMismatchError(f"expected {self.aggregation}-pooled features (as this probe was trained), "
                                    f"got {spec.pooling} pooling ({spec.key}); {hint}")
        super().check_spec(spec)

    def check_token_spec(self, spec: FeatureSpec) -> None:
        """Refuse unless `spec` describes per-token states of the probe's model and layer."""
        self._check_fitted()
        if spec.pooling != "tokens":
            raise SpecMismatchError(f"expected per-token states (tokens pooling) for score_tokens/sequence_scores, "
                                    f"got {spec.pooling} pooling ({spec.key}); pooled features go to score()")
        if self.feature_spec_ is not None:
            self.feature_spec_.check_compatible(replace(spec, pooling=self.feature_spec_.pooling))
        elif spec.dim != self.n_features_in_:
            raise SpecMismatchError(f"expected token states of dim {self.n_features_in_}, got {spec.describe()}")

    # -- scoring -----------------------------------------------------------------------------
    def score(self, features: np.ndarray, spec: FeatureSpec | None = None) -> np.ndarray:
        """Sequence scores [n] (float64) of pooled features [n, d] of the trained pooling."""
        if spec is not None:
            self.check_spec(spec)
        self._check_fitted()
        v, b = self.token_head()
        return self._matrix(features, "pooled features [n, d]") @ v + b  # [n]

    def score_tokens(self, states: np.ndarray, spec: FeatureSpec | None = None) -> np.ndarray:
        """Per-token scores Z_t [t] (float64) of one completion's token states [t, d]."""
        if spec is not None:
            self.check_token_spec(spec)
        self._check_fitted()
        v, b = self.token_head()
        return self._matrix(states, "one completion's token states [t, d]") @ v + b  # [t]

    def sequence_scores(self, states: Sequence[np.ndarray] | np.ndarray, aggregation: str | None = None,
                        spec: FeatureSpec | None = None) -> np.ndarray:
        """Each candidate's ranking score [n] (float64). `states`: per-token states, one [t_i, d]
        array per candidate (a list, or one [n, t, d] array), or pooled features [n, d] of the trained
        pooling (which give that aggregation only). `aggregation` (default: the trained one): "mean"
        (Q-RM), "min" (the weakest token) or "last" (the last kept token)."""
        agg = self.aggregation if aggregation is None else aggregation
        if agg not in AGGREGATIONS:
            raise ConfigError(f"expected aggregation in {list(AGGREGATIONS)}, got {agg!r}")
        if isinstance(states, np.ndarray) and states.ndim == 2:
            if spec is not None and spec.pooling == "tokens":
                raise SpecMismatchError("expected a list of per-token arrays [t_i, d] with a tokens spec, got one "
                                        f"array {states.shape}; wrap one completion's states as [states]")
            if agg != self.aggregation:
                raise ConfigError(f"expected per-token states (a list of [t_i, d]) for aggregation '{agg}', got "
                                  f"pooled features {states.shape}, which give the '{self.aggregation}' score only")
            return self.score(states, spec)
        if spec is not None:
            self.check_token_spec(spec)
        out = np.empty(len(states), dtype=np.float64)
        for i, s in enumerate(states):
            z = self.score_tokens(s)  # [t_i]
            if z.size == 0:
                raise DataError(f"expected at least one token state per candidate, got none for candidate {i}")
            out[i] = z.mean() if agg == "mean" else z.min() if agg == "min" else z[-1]
        return out


ARCHITECTURES[TokenProbe.architecture] = TokenProbe  # `qprobe train --arch token`, and loading by io
