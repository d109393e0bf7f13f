"""What is written and read: self-describing checkpoints (checkpoints.py), safe file writes and names (files.py), the
data set download (download.py)."""
