"""Built-in models with random weights, quantized for tests (shared by the compile tests)."""

import numpy as np
import torch

from hawqc import BitConfig, LayerBits, models, quantize


def quantized(name: str, shape: tuple[int, ...], config: str, seed: int = 0) -> torch.nn.Module:
    """``name`` quantized with a preset, or ``mixed``: random 4/8-bit weights and activations per layer."""
    torch.manual_seed(seed)
    model = models.get(name)
    calib = [torch.randn(2, *shape)]
    models.recalibrate_bn(model, calib)
    if config == "mixed":
        rng = np.random.default_rng(seed)
        config = BitConfig(layers={n: LayerBits(int(rng.choice([4, 8])), int(rng.choice([4, 8])))
                                   for n in models.quantizable_layers(model)})
    return quantize(model, config, calib)
