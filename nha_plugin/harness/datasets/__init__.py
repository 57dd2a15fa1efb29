"""Datasets for the harness: generated ground-truth scenes (``scenes``)."""
