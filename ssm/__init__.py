"""Mamba, the selective state space model: selective scan, mixer, block and checkpoint loading."""

from ssm.mamba import (
    CausalConv1d,
    MambaBlock,
    MambaCache,
    MambaConfig,
    MambaMixer,
    build_language_model,
)
from ssm.pretrained import from_pretrained, mamba_config_from_hf
from ssm.scan import SCAN_MODES, combine_linear_recurrence, selective_scan

__all__ = [
    "SCAN_MODES",
    "CausalConv1d",
    "MambaBlock",
    "MambaCache",
    "MambaConfig",
    "MambaMixer",
    "build_language_model",
    "combine_linear_recurrence",
    "from_pretrained",
    "mamba_config_from_hf",
    "selective_scan",
]
