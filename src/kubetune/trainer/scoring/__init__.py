"""Scores of generated answers beyond overlap metrics: an LLM judge, BERTScore and
benchmark suites."""
