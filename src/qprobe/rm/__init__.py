"""Reward models with a trainable trunk: LoRA adapters on the top blocks of the model plus a head.

Heads (`qprobe.catalog.RM_HEADS`, one module each, on the interface of `qprobe.rm.base`): `ex`
(EX-RM, `qprobe.rm.ex`), `im` (IM-RM, `qprobe.rm.im`), `qrm` (Q-RM, `qprobe.rm.qrm`). The trunk
and its exact frozen-bottom cache: `qprobe.rm.trunk`; training and rewards: `qprobe.rm.model`;
resumable training folders: `qprobe.rm.workdir`; files: `qprobe.rm.io`. Needs the `rm` extra
(transformers + peft).
"""

from qprobe.rm.io import load_rm, save_rm
from qprobe.rm.model import RewardModel, RMConfig

__all__ = ["RMConfig", "RewardModel", "load_rm", "save_rm"]
