"""Loaders for local copies of real datasets (ImageNet-S, PASCAL Context-59, Stanford Cars, Waterbirds), used by the
harness and the applications. Nothing is downloaded: each loader reads a folder the user points it at and says what
layout it expects. Generated ground-truth scenes live in :mod:`nha_plugin.scenes`."""
