"""Kernels: TIR computes and schedules for integer conv2d/dense (x86 VNNI, CUDA Tensor Cores)."""
