"""Hand-written integer kernels (TIR) for hawqc's targets."""
