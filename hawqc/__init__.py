"""hawqc: HAWQ-V3 integer-only quantization compiled with Apache TVM.

Importing the package is cheap: torch and tvm load only where they are used.
"""

from typing import Any

from hawqc.bitconfig import BitConfig, LayerBits

__version__ = "0.1.0"

__all__ = ["BitConfig", "LayerBits", "__version__", "quantize"]


def __getattr__(name: str) -> Any:
    if name == "quantize":
        from hawqc.quant.model import quantize

        return quantize
    raise AttributeError(f"module 'hawqc' has no attribute {name!r}")
