"""Probes: Q(x, a) = a small network of one feature vector (the estimator contract of STYLE.md).

`__init__` stores hyper-parameters only; `fit` learns the attributes ending in `_` and returns the
probe; `score` gives Q for features [N, d] in numpy (no torch needed to score a loaded probe).
Weights live in `params_` as numpy arrays named like the layers of a torch ``nn.Sequential``.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import numpy as np

from qprobe.errors import ConfigError, NotFittedError, SpecMismatchError
from qprobe.features.spec import FeatureSpec

__all__ = ["ARCHITECTURES", "LinearProbe", "MLPProbe", "Probe"]


class Probe:
    """Base class. Subclasses define `architecture` and `layer_shapes(dim)`."""

    architecture: ClassVar[str] = ""

    def __init__(self, *, loss: str = "pg", loss_options: dict[str, Any] | None = None,
                 train: Any = None, standardize: bool | None = None, seed: int = 0) -> None:
        self.loss = loss
        self.loss_options = dict(loss_options or {})
        self.train = train  # a TrainConfig; None = the default (recipe "fast")
        self.standardize = standardize  # None = the recipe's choice (fast: True, paper: False)
        self.seed = seed

    # -- hyper-parameters --------------------------------------------------------------------
    def hyper_parameters(self) -> dict[str, Any]:
        """The architecture's own hyper-parameters (what config.json needs to rebuild it)."""
        return {}

    def layer_shapes(self, dim: int) -> list[tuple[int, int]]:
        """(out, in) of each linear layer, first to last; the last has out = 1."""
        raise NotImplementedError

    def get_params(self) -> dict[str, Any]:
        return {"loss": self.loss, "loss_options": self.loss_options, "train": self.train,
                "standardize": self.standardize, "seed": self.seed, **self.hyper_parameters()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # -- fitting -----------------------------------------------------------------------------
    def fit(self, features: np.ndarray | None = None, rewards: np.ndarray | None = None,
            groups: np.ndarray | None = None, *, pairs: tuple[np.ndarray, np.ndarray] | None = None,
            pair_rows: np.ndarray | None = None, spec: FeatureSpec | None = None,
            source: dict[str, Any] | None = None) -> Probe:
        """Learn Q from features [N, d] with rewards [N] and a prompt id per row (`groups`; grouped
        and pairwise losses compare samples of one prompt), or from `pairs` (chosen [P, d],
        rejected [P, d]). `pair_rows` [P, 2] (chosen, rejected row numbers of `features`, both of
        one prompt; `qprobe.store.pairs.ordered_pairs`) are the pairs a pairwise loss trains on,
        instead of every within-prompt pair. `spec` is stored and checked when the probe is later
        used; `source` (the training run, feature key, ...) goes into the saved config. Returns self."""
        from qprobe.probes.data import make_examples
        from qprobe.probes.train import fit_probe

        examples = make_examples(features, rewards, groups, pairs, pair_rows)
        if spec is not None and spec.pooling != "tokens" and spec.dim != examples.features.shape[1]:
            raise SpecMismatchError(
                f"expected features of dim {spec.dim} ({spec.describe()}), got {examples.features.shape[1]}"
            )
        fit_probe(self, examples)
        self.feature_spec_ = spec
        self.source_ = dict(source or {})
        return self

    def _set_learned(self, params: dict[str, np.ndarray], mean: np.ndarray | None,
                     scale: np.ndarray | None, history: dict[str, Any]) -> None:
        """Called by the trainer (and the loader) with the learned values."""
        self.params_ = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in params.items()}
        self.mean_ = None if mean is None else np.asarray(mean, dtype=np.float32)
        self.scale_ = None if scale is None else np.asarray(scale, dtype=np.float32)
        self.n_features_in_ = int(self.params_["layers.0.weight"].shape[1])
        self.history_ = history

    def _check_fitted(self) -> None:
        if not hasattr(self, "params_"):
            raise NotFittedError(
                f"expected a fitted {type(self).__name__}, got an unfitted one; call fit(...) or "
                "load one with Probe.from_pretrained(path)"
            )

    @property
    def standardized_(self) -> bool:
        self._check_fitted()
        return self.mean_ is not None

    # -- scoring -----------------------------------------------------------------------------
    def check_spec(self, spec: FeatureSpec) -> None:
        """Raise SpecMismatchError unless `spec` describes the features this probe was trained on."""
        self._check_fitted()
        if self.feature_spec_ is not None:
            self.feature_spec_.check_compatible(spec)
        elif spec.dim != self.n_features_in_:
            raise SpecMismatchError(f"expected features of dim {self.n_features_in_}, got {spec.describe()}")

    def transform(self, features: np.ndarray) -> np.ndarray:
        """Standardised features [N, d] (as trained), float32."""
        self._check_fitted()
        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.n_features_in_:
            raise SpecMismatchError(
                f"expected features [N, {self.n_features_in_}] like the probe's training features, got "
                f"shape {x.shape}; use features of the same model, layer and pooling"
            )
        if self.mean_ is not None and self.scale_ is not None:
            x = (x - self.mean_) / self.scale_  # [N, d]
        return x

    def score(self, features: np.ndarray, spec: FeatureSpec | None = None) -> np.ndarray:
        """Q values [N] (float32) for features [N, d]; with `spec`, check it first."""
        if spec is not None:
            self.check_spec(spec)
        z = self.transform(features)  # [N, d]
        n_layers = len(self.params_) // 2
        for i in range(n_layers):
            z = z @ self.params_[f"layers.{i}.weight"].T + self.params_[f"layers.{i}.bias"]  # [N, out]
            if i < n_layers - 1:
                z = np.maximum(z, 0.0)
        return z[:, 0]

    # -- files (qprobe.probes.io) ------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Write config.json, model.safetensors and README.md to `path` (atomically)."""
        from qprobe.probes.io import save_probe

        save_probe(self, path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], spec: FeatureSpec | None = None, *,
                        local_files_only: bool = False) -> Probe:
        """Load a probe directory, or a Hub probe `hf://org/name[@revision]` (needs qprobe[hub];
        `local_files_only`: from the Hub cache, no network); with `spec`, refuse features of another
        model/layer/pooling. A path that does not exist is an error, never a Hub look-up."""
        from qprobe.probes.io import load_probe

        probe = load_probe(path, ARCHITECTURES, local_files_only=local_files_only)
        if cls is not Probe and not isinstance(probe, cls):
            raise ConfigError(f"expected a {cls.__name__} in {path}, got a {type(probe).__name__}; use Probe.from_pretrained")
        if spec is not None:
            probe.check_spec(spec)
        return probe

    def push_to_hub(self, repo_id: str, **options: Any) -> str:
        """Upload the probe directory to the Hugging Face Hub (needs qprobe[hub]); returns the pinned
        name `hf://org/name@COMMIT` that `from_pretrained` loads."""
        from qprobe.probes.io import push_probe

        return push_probe(self, repo_id, **options)


class LinearProbe(Probe):
    """Q = w . x + b on (optionally standardised) features: the paper's default probe."""

    architecture = "linear"

    def layer_shapes(self, dim: int) -> list[tuple[int, int]]:
        return [(1, dim)]


class MLPProbe(Probe):
    """`depth` hidden ReLU layers of `width` units, then a linear output (the paper's "3 layer"
    probe is depth=2)."""

    architecture = "mlp"

    def __init__(self, *, depth: int = 2, width: int = 256, **options: Any) -> None:
        super().__init__(**options)
        self.depth = depth
        self.width = width

    def hyper_parameters(self) -> dict[str, Any]:
        return {"depth": self.depth, "width": self.width}

    def layer_shapes(self, dim: int) -> list[tuple[int, int]]:
        if not (isinstance(self.depth, int) and self.depth >= 1 and isinstance(self.width, int) and self.width >= 1):
            raise ConfigError(f"expected MLP depth >= 1 and width >= 1 (integers), got {self.depth}, {self.width}")
        ins = [dim] + [self.width] * self.depth
        outs = [self.width] * self.depth + [1]
        return list(zip(outs, ins, strict=True))


ARCHITECTURES: dict[str, type[Probe]] = {"linear": LinearProbe, "mlp": MLPProbe}
