"""PyTorch side of hawqc: quantizers, dyadic arithmetic, QAT modules, calibration, QDQ export."""
