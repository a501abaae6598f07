"""Evaluation: perplexity on token shards or text."""
