"""Fused kernels with pure-PyTorch references: RMSNorm and cross-entropy.

Each op takes ``backend="auto"|"torch"|"triton"``: ``"auto"`` runs the Triton kernel on CUDA tensors
and the reference elsewhere. The Triton modules themselves load only when a kernel first runs.
The functions are bound over their same-named submodules, so
``from seqmem_shared.kernels import rms_norm`` gives the function.
"""

from seqmem_shared.kernels.cross_entropy import cross_entropy, linear_cross_entropy
from seqmem_shared.kernels.rms_norm import RMSNorm, rms_norm

__all__ = ["RMSNorm", "cross_entropy", "linear_cross_entropy", "rms_norm"]
