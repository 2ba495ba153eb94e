"""Evaluation on frozen backbone features: extraction (extract), the reference's weighted
k-NN (knn) and linear-probe grid (linear), and instance retrieval (retrieval)."""
