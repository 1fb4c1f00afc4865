"""Circuit analysis of polynomial toy transformers, read off the weights (quimb networks over torch).

- :mod:`~bilinear_toys.circuits.network`: the model as tensor networks; :func:`logits_from_network`.
- :mod:`~bilinear_toys.circuits.attention`: direct path, OV/QK circuits (per RoPE offset or content-only),
  the full 1-layer circuit in slices, skip-trigrams, composition scores, previous-token/induction heads.
- :mod:`~bilinear_toys.circuits.bilinear`: interaction matrices of bilinear MLPs, eigendecomposition,
  truncation curves, effective rank.
"""

from bilinear_toys.circuits.attention import (
    composition_scores,
    copying_score,
    direct_path,
    full_circuit_slices,
    head_scores_behaviour,
    induction_scores_weights,
    ov_circuit,
    ov_diagonal_score,
    ov_eigenvalues,
    positional_profile,
    previous_token_score_weights,
    qk_circuit,
    qk_pattern,
    skip_trigram_mask,
    top_skip_trigrams,
)
from bilinear_toys.circuits.bilinear import (
    effective_rank,
    interaction_eigen,
    interaction_matrices,
    rank_for_fraction,
    token_interaction_matrices,
    truncation_curve,
)
from bilinear_toys.circuits.network import attention_network, bilinear_network, logits_from_network

__all__ = [
    "attention_network",
    "bilinear_network",
    "composition_scores",
    "copying_score",
    "direct_path",
    "effective_rank",
    "full_circuit_slices",
    "head_scores_behaviour",
    "induction_scores_weights",
    "interaction_eigen",
    "interaction_matrices",
    "logits_from_network",
    "ov_circuit",
    "ov_diagonal_score",
    "ov_eigenvalues",
    "positional_profile",
    "previous_token_score_weights",
    "qk_circuit",
    "qk_pattern",
    "rank_for_fraction",
    "skip_trigram_mask",
    "token_interaction_matrices",
    "top_skip_trigrams",
    "truncation_curve",
]
