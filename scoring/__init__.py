"""The scoring graph (scorer.py: uint8 images in, scores and maps out) and how it runs for inference: device,
runtime, precision, memory format (inference.py)."""
