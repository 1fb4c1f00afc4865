"""polar-mem-mamba: hybrid Mamba-2 encoder-decoder with polarized channels, a cross-layer memory pool and
gated cross-attention; MQAR training and the capacity-cliff study.

Public API: ``Config`` (+ ``ARCHITECTURES``, ``ConfigError``) and ``HybridMambaEncoderDecoder``.
"""

from polar_mem_mamba.config import ARCHITECTURES, Architecture, Config, ConfigError
from polar_mem_mamba.models import HybridMambaEncoderDecoder

__all__ = ["ARCHITECTURES", "Architecture", "Config", "ConfigError", "HybridMambaEncoderDecoder"]
