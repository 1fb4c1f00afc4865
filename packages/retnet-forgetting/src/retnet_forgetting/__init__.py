"""RetNet state extraction, associative-recall probes and forgetting curves."""
