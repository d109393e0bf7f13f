"""The values of Li et al., "CutPaste: Self-Supervised Learning for Anomaly Detection and Localization" (CVPR 2021),
and the project's defaults beside them, in one module of constants with no imports beyond the standard library:
the method files (cutpaste.py, model.py), the library's packages and the command-line flags read them from here."""
from pathlib import Path

# Section 4.1: images are resized to 256 x 256 pixels.
PAPER_SIZE = 256
# Section 4.1: 32 clean images per step, 64 with their CutPaste copies (96 in 3-way).
PAPER_BATCH_SIZE = 32
# Section 4.1: SGD with learning rate 0.03 (cosine-annealed), momentum 0.9 and weight decay 3e-5.
PAPER_LR = 0.03
SGD_MOMENTUM = 0.9
WEIGHT_DECAY = 3e-5
# Section 4.1: the backbone, a ResNet18 (any torchvision classifier can stand in, model.py).
DEFAULT_ARCH = "resnet18"
# Section 4.1's training length: Li et al. count 256 optimizer steps as one "epoch", and --epochs counts steps.
STEPS_PER_EPOCH = 256
# Section 3.1: CutPaste (normal), CutPaste-scar, their union (each a 2-way task) and the 3-way task.
VARIANTS = ("normal", "scar", "union", "3way")
# Table 1's single-model columns, as VARIANTS names.
PAPER_VARIANTS = ("normal", "scar", "3way")

# Section 4.2: 64 px patches of 256 px images, scored densely at stride 4.
PAPER_PATCH_SIZE = 64
PAPER_STRIDE = 4
# Section 4.2 with ResNet18, which downsamples 32x: a smaller patch shrinks to one pixel before its last block.
MIN_PATCH_SIZE = 32
# Section 4.2's patch Gaussians, one per location cell of this side (13 x 13 cells for 64 px patches of 256 px
# images), as appendix A.5 fits them for aligned objects; the project's choice of cell.
CELL_STRIDE = 16
# Section 4.2's dense scoring: patches per forward pass (memory, not results).
PATCH_BATCH = 512
# Section 4.2's dense scoring of a patch-level model in predict.py and its exports, and of the held-out clean
# images whose maxima set its threshold: a quarter of the paper's 64 px patch, 169 patches per 256 px image, 1/14
# of the paper's stride 4, so that the calibration costs training minutes on a CPU, not tens of minutes.
PATCH_SCORE_STRIDE = 16

# Section 3.3 scores images by their Gaussian density; the project's threshold for predict.py and the exports is
# this quantile of the held-out clean training scores (about 1 % false alarms).
DEFAULT_QUANTILE = 0.99
# Images decoded and scored at once by predict.py (memory, not results).
PREDICT_BATCH = 64

# The paper's results as CSV files: Table 1, image AUROC per category and variant; Table 2, pixel AUROC per category.
DOC = Path(__file__).resolve().parents[1] / "doc"
PAPER_TABLE1 = DOC / "paper_table1.csv"
PAPER_TABLE2 = DOC / "paper_table2.csv"
