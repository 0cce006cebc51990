"""Measurements: redundancy scores (in memory or sequential), perplexity, lm-eval."""
