"""The trunk's flat settings, shared by the configs of everything that trains one (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrunkConfig:
    """Base of RMConfig, RLConfig and IterConfig (`qprobe.cli.options.trunk_options` is their CLI side)."""

    model: str = ""  # "" = the packaged default GGUF, through transformers
    top_blocks: int = 4
    lora_r: int = 16
    lora_alpha: float = 32.0
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"

    def lora(self) -> Any:
        """The `qprobe.rm.trunk.LoraSettings` of these fields (validated there)."""
        from qprobe.rm.trunk import LoraSettings

        return LoraSettings.of(self)
