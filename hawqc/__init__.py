"""hawqc: HAWQ-V3 integer-only quantization compiled with Apache TVM.

Importing the package is cheap: torch and tvm load only where they are used.
"""

from hawqc.bitconfig import BitConfig, LayerBits

__version__ = "0.1.0"

__all__ = ["BitConfig", "LayerBits", "__version__"]
