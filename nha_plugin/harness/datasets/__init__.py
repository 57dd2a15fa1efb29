"""Datasets for the harness and the applications: generated ground-truth scenes (``scenes``), and loaders
for local copies of ImageNet-S, PASCAL Context, Stanford Cars and Waterbirds."""
