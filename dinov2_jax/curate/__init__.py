"""Data curation (the DINOv2 paper's LVD-142M method): embed, dedup, retrieve, cluster, sample."""
