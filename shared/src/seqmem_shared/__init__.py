"""seqmem-shared: building blocks shared by the seqmem research packages.

Submodules: ``tokenization``, ``kernels`` (RMSNorm, cross-entropy), ``optim``, ``data`` (MQAR,
streaming text), ``train`` (the shared training loop), ``config`` (validated config dataclasses,
YAML/JSON loading, ``key=value`` overrides), ``benchmarking`` (timers and environment for ``bench/``
scripts), ``backends`` and ``io``.
"""

__version__ = "0.1.0"
