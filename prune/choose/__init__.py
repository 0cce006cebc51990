"""Choosing the blocks to remove: score-only rules and model-based strategies, in one registry."""
