"""Evaluation: perplexity and lm-eval tasks."""
