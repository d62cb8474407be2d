"""The quantization core: integer grids, reference ops, layer selection, the block driver, GPTQ."""
