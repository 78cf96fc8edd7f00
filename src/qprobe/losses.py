"""Public, stable home of the probe losses: `LOSSES` maps a name to a loss function.

Importing this module imports torch. See `qprobe.probes.losses` for the calling conventions
(each function's `kind` says whether it takes samples, groups of one prompt, or pairs).
"""

from qprobe.probes.losses import (
    KINDS,
    LOSSES,
    bt_loss,
    ce_loss,
    dpo_loss,
    listwise_loss,
    loss_kind,
    margin_bt_loss,
    mse_loss,
    pg_loss,
)

__all__ = [
    "KINDS", "LOSSES", "bt_loss", "ce_loss", "dpo_loss", "listwise_loss", "loss_kind", "margin_bt_loss",
    "mse_loss", "pg_loss",
]
