"""Where the defect is (Li et al., CVPR 2021, section 4.2): patch batches, patch embeddings and the receptive-field
upsampling of dense maps (patches.py), GradCAM for image-level models (gradcam.py)."""
