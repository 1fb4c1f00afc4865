"""Synthetic data with planted rules."""

from bilinear_toys.data.synthetic import (
    RULE_NAMES,
    SyntheticLanguage,
    SyntheticRules,
    repeated_random_tokens,
)

__all__ = ["RULE_NAMES", "SyntheticLanguage", "SyntheticRules", "repeated_random_tokens"]
