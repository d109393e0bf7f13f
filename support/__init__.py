"""Support code of the scripts: everything the design card's six modules and the entry scripts share.

- options: the command-line flags, declared once (argparse parents); imports nothing heavy
- errors: the one-line user-facing error and the entry-point wrapper
- runtime: device, bf16 and memory-format choice, generators, embedding in batches
- checkpoints: self-describing checkpoints, ImageNet weights, atomic writes, the checkpoint-folder scan
- training: the training loop behind run_training.py; runstate (resume, Ctrl-C), records (logs),
  distributed (torchrun), cudagraphs (the augmentation replayed on CUDA)
- evaluation: scoring, tables and plots behind eval.py; patches (patch batches, dense maps),
  gradcam, metrics, plots
- detector: scoring new images (predict.py); download and demo_data: getting data
"""
