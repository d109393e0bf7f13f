"""What every part shares, without torch: the paper's values and the project's defaults (paper.py), the user-facing
error and the one-line wrapper of the scripts (errors.py)."""
