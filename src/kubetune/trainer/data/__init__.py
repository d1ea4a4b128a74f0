"""The data stage: raw sources to clean, deduplicated, split training sets (docs/data.md)."""
