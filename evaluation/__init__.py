"""eval.py's evaluation: per-category scores and tables beside the paper's (evaluate.py), the metrics, the plots
and the HTML report."""
