"""Applications of the decompositions: ablation & sparsity, training-free segmentation, distribution-shift
monitoring and spurious-feature removal (docs/methods.md §1-§5)."""
