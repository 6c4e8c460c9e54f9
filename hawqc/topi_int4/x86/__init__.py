"""x86 kernels: VNNI int8 conv/dense with the requantization fused (:mod:`.conv2d`), the lowering that
plugs them into the integer graph (:mod:`.lowering`) and schedules for every other op (:mod:`.schedules`)."""
