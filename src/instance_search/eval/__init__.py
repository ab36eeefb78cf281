"""Evaluation: the field's metrics (metrics.py), benchmark datasets (datasets/), a recipe's figures on a
benchmark (runner.py) and the papers' sweeps (sweeps.py)."""
