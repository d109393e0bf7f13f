"""reproduce.py: the grid of variants x categories x seeds (grid.py), its figures, and the synthetic demo data."""
