"""Probes: small networks that score a completion's features (Q values), their training and files.

Importing this package does not import torch; training does.
"""

from qprobe.probes.models import ARCHITECTURES, LinearProbe, MLPProbe, Probe
from qprobe.probes.token import TokenProbe  # registers architecture "token"
from qprobe.probes.train import TrainConfig, rerank_metrics, select_feature

__all__ = ["ARCHITECTURES", "LinearProbe", "MLPProbe", "Probe", "TokenProbe", "TrainConfig", "rerank_metrics",
           "select_feature"]
