"""Data: sources, multi-crop augmentation, iBOT masking and the Grain input pipelines."""
