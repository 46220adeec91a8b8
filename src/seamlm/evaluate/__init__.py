"""Evaluation: harmfulness (generation + judges), zero-shot utility, benign fine-tuning, coherence."""
