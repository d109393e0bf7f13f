"""run_training.py's training: the loop (loop.py), resume and locks (runstate.py), run records, devices and
precision (devices.py), torchrun (distributed.py), the augmentation's CUDA graph, the ImageNet weights."""
