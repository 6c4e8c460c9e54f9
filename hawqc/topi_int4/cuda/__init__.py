"""Turing (sm_75) Tensor Core kernels: implicit-GEMM int8/int4 conv2d with the dyadic requantization
fused in the epilogue (:mod:`.conv2d`), the Relax pipeline that uses them (:mod:`.pipeline`)."""
