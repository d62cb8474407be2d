"""Each quantization method, against the reference ops and real models."""
