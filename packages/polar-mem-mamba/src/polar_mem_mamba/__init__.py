"""Hybrid Mamba-2 encoder-decoder with polarized channels, a memory pool and gated cross-attention."""
