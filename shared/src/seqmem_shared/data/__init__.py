"""Data for the seqmem packages: ``mqar`` (synthetic associative recall) and ``text`` (streaming text)."""
