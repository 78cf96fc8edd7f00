"""What a feature array is: the spec probes check before they score anything."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from qprobe.errors import ConfigError, SpecMismatchError

POOLINGS = ("last", "mean", "tokens")


@dataclass(frozen=True)
class FeatureRequest:
    """Which features to compute: a layer (negative counts from the top), and a pooling.

    `last`: the state at the last completion token; `mean`: mean over completion tokens;
    `tokens`: every completion token's state (token-level probes). `embedder` names an
    external embedding model instead of the generator's own hidden states ("" = own).
    """

    layer: int = -1
    pooling: str = "last"
    embedder: str = ""

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ConfigError(f"expected pooling in {list(POOLINGS)}, got '{self.pooling}'")

    @property
    def key(self) -> str:
        """A file-system-safe name, e.g. 'L-1_last' or 'minilm_mean'."""
        if self.embedder:
            safe = "".join(c if c.isalnum() or c in "-." else "-" for c in self.embedder)
            return f"E{safe}_{self.pooling}"
        return f"L{self.layer}_{self.pooling}"

    @classmethod
    def parse(cls, text: str) -> FeatureRequest:
        """'-1:last', '18:mean' or 'embed=NAME:mean'."""
        head, _, pooling = text.partition(":")
        pooling = pooling or "last"
        if head.startswith("embed="):
            return cls(layer=-1, pooling=pooling, embedder=head[len("embed="):])
        try:
            return cls(layer=int(head), pooling=pooling)
        except ValueError:
            raise ConfigError(
                f"expected a feature like '-1:last' or '18:mean' (layer:pooling), got '{text}'"
            ) from None


@dataclass(frozen=True)
class FeatureSpec:
    """Provenance of one feature array; two arrays are comparable iff their specs are equal."""

    backend: str
    model: str
    sha256: str
    layer: int
    pooling: str
    dim: int
    dtype: str = "float32"
    embedder: str = ""

    @property
    def key(self) -> str:
        return FeatureRequest(self.layer, self.pooling, self.embedder).key

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def describe(self) -> str:
        src = f"embedder {self.embedder}" if self.embedder else f"layer {self.layer}"
        return (
            f"{self.backend}:{self.model} (sha256 {self.sha256[:12] or '?'}), {src}, "
            f"{self.pooling} pooling, dim {self.dim}"
        )

    def check_compatible(self, other: FeatureSpec) -> None:
        """Raise unless `other` describes the same features (dtype may differ)."""
        a, b = self.to_dict(), other.to_dict()
        a.pop("dtype"), b.pop("dtype")
        # The back-end that produced a hidden state does not matter when the weights match.
        if a["sha256"] and a["sha256"] == b["sha256"]:
            a.pop("backend"), b.pop("backend"), a.pop("model"), b.pop("model")
        if a != b:
            raise SpecMismatchError(
                f"expected features {self.describe()}, got {other.describe()}; "
                "collect features with the probe's model, layer and pooling, or train a probe on these"
            )
