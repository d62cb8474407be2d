"""Reference ops, integer grids, kernels, layer bytes."""
