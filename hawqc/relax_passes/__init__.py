"""Relax-level analyses and rewrites of integer-only modules.

QDQ folding itself happens on the integer graph (:mod:`hawqc.frontend.onnx_qdq`), so that the
golden model and the compiled module share their integers by construction; Relax sees an
integer-only module and TVM's ``FuseOps`` fuses each requantization into its producer.
"""
