"""Frontends: quantized graphs in, integer-only Relax modules out."""
