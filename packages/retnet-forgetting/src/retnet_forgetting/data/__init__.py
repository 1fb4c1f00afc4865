"""Datasets: the associative-recall generator (``recall``)."""
