"""Using a trained model: the Detector (the public Python API: a Scorer, its threshold, decoding), the exported
files of export.py, and predict.py's program (inputs, CSV, overlays)."""
