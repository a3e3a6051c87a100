"""Language models that stack residual blocks from `ssm` or `attention` behind one interface.

Dimension letters used in shape comments and einsum strings throughout the codebase:

  b  batch                      t  time (query positions)      s  key positions (attention)
  d  model width (d_model)      e  expanded width (Mamba)      n  SSM state size (d_state)
  w  conv window (d_conv)       r  dt rank                     h  query heads
  g  key/value heads            k  head dimension              f  feed-forward width
  v  vocabulary (padded)
"""

from models.layers import RMSNorm
from models.lm import LanguageModel

__all__ = ["LanguageModel", "RMSNorm"]
