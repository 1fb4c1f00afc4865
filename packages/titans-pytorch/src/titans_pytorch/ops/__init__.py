"""Operators of the neural memory: the gated associative scan and the MLP-memory dual form."""
