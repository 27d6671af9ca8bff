"""Decisions over stored scores (decide: bands, recipe limits, per-recipe overrides, inherited parent
verdicts, duplicates) and deduplication (dedup)."""
