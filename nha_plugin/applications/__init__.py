"""Applications of the decompositions: ablation & sparsity, training-free segmentation, distribution-shift
monitoring and spurious-feature removal (shared/METHODS.md §A, §B)."""
