"""hawqc: HAWQ-V3 integer-only quantization compiled with Apache TVM.

Importing the package is cheap: torch and tvm load only where they are used.
"""

from typing import Any

from hawqc.bitconfig import BitConfig, LayerBits

__version__ = "0.1.0"

__all__ = ["BitConfig", "LayerBits", "__version__", "compile_integer_only", "load", "quantize", "search_bit_config"]
_LAZY = {"quantize": "hawqc.quant.model", "compile_integer_only": "hawqc.api", "load": "hawqc.api",
         "search_bit_config": "hawqc.api"}


def __getattr__(name: str) -> Any:
    """Heavy entry points load on first use, keeping ``import hawqc`` free of torch and tvm."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hawqc' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazy entry points too (``dir(hawqc)``, tab completion)."""
    return sorted({*globals(), *_LAZY})
