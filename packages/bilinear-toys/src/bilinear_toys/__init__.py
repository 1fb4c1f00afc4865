"""Polynomial toy transformers (quadratic attention, bilinear MLPs) and weight-based circuit analysis."""
