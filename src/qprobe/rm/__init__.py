"""Reward models with a trainable trunk: LoRA adapters on the top blocks of the model plus a head.

Heads (`qprobe.catalog.RM_HEADS`, one module each, on the interface of `qprobe.rm.base`): `ex`
(EX-RM, `qprobe.rm.ex`), `im` (IM-RM, `qprobe.rm.im`), `qrm` (Q-RM, `qprobe.rm.qrm`). The trunk
and its exact frozen-bottom cache: `qprobe.rm.trunk`; training and rewards: `qprobe.rm.model`;
resumable training folders: `qprobe.rm.workdir`; files: `qprobe.rm.io`; the adapters as a llama.cpp
GGUF LoRA adapter (sampling the adapted policy on llama.cpp): `qprobe.rm.gguf_adapter`. Needs the
`rm` extra (transformers + peft; gguf for the export).
"""

from qprobe.rm.gguf_adapter import export_gguf_lora
from qprobe.rm.io import load_rm, save_rm
from qprobe.rm.model import RewardModel, RMConfig

__all__ = ["RMConfig", "RewardModel", "export_gguf_lora", "load_rm", "save_rm"]
