"""Mixed-precision search (HAWQ-V3): Hessian sensitivity, per-layer costs and the bit-allocation ILP."""
