"""Settings without code: the paper's values and this project's defaults, importable without torch."""
