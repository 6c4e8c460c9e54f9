"""Per-layer bit widths: which weight and activation precision each layer runs at.

A :class:`BitConfig` maps layer names (the ``named_modules`` names of a model's
convolutions and linear layers) to :class:`LayerBits`. Layers not listed take
``default``; with ``first_last`` set, the model's first and last quantizable
layers take those bits unless listed (HAWQ-V3 keeps them at 8 bits).
``a_bits`` is the precision of the layer's *input* activation, i.e. of the
operand its kernel multiplies.

JSON form (``schema_version`` is checked on load)::

    {"schema_version": 1,
     "default": {"w_bits": 4, "a_bits": 4},
     "first_last": {"w_bits": 8, "a_bits": 8},
     "layers": {"layer4.1.conv2": {"w_bits": 8, "a_bits": 8}}}
"""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hawqc.fileio import write_atomic

SCHEMA_VERSION = 1
JSON_FIELDS = frozenset({"schema_version", "layers", "default", "first_last"})
"""The fields of a bit config's JSON form."""
SUPPORTED_BITS = (4, 8)
"""Bit widths the compiler accepts today; widening this tuple is all 2- or 16-bit needs here."""


@dataclass(frozen=True)
class LayerBits:
    """Weight and input-activation bit widths of one layer."""

    w_bits: int
    a_bits: int

    def __post_init__(self) -> None:
        for kind, bits in (("weight", self.w_bits), ("activation", self.a_bits)):
            if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
                raise ValueError(f"{kind} bits must be one of {SUPPORTED_BITS}, got {bits!r}")

    @classmethod
    def parse(cls, spec: Any) -> LayerBits:
        """From a ``LayerBits``, an int (both widths), a ``(w, a)`` pair or a ``{"w_bits", "a_bits"}`` dict."""
        if isinstance(spec, LayerBits):
            return spec
        if isinstance(spec, int):
            return cls(spec, spec)
        if isinstance(spec, (tuple, list)) and len(spec) == 2:
            return cls(*spec)
        if isinstance(spec, Mapping) and set(spec) == {"w_bits", "a_bits"}:
            return cls(spec["w_bits"], spec["a_bits"])
        raise ValueError(f"cannot read layer bits from {spec!r}: give an int, (w_bits, a_bits) or "
                         '{"w_bits": .., "a_bits": ..}')

    def to_dict(self) -> dict[str, int]:
        return {"w_bits": self.w_bits, "a_bits": self.a_bits}


@dataclass(frozen=True)
class BitConfig:
    """Layer name -> :class:`LayerBits`, with optional defaults (see module docstring)."""

    layers: Mapping[str, LayerBits] = field(default_factory=dict)
    default: LayerBits | None = None
    first_last: LayerBits | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", {k: LayerBits.parse(v) for k, v in self.layers.items()})
        for name in ("default", "first_last"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, LayerBits.parse(value))

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> BitConfig:
        """A named preset: ``uniform8``, ``uniform4`` or ``w4a8`` (4-bit weights, 8-bit activations); the
        last two keep the first and last layer at 8 bits."""
        if name not in PRESETS:
            raise ValueError(f"unknown bit-config preset {name!r}; presets: {', '.join(PRESETS)}")
        return PRESETS[name]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BitConfig:
        """From the JSON form; the schema version must be one this release reads."""
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"bit config schema_version {version!r} is not supported (this hawqc reads "
                             f"version {SCHEMA_VERSION})")
        unknown = set(data) - JSON_FIELDS
        if unknown:
            raise ValueError(f"bit config has unknown fields: {', '.join(sorted(unknown))}")
        return cls(layers=data.get("layers", {}), default=data.get("default"),
                   first_last=data.get("first_last"))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BitConfig:
        """Read a JSON bit config written by :meth:`save` (or by ``hawqc search``)."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a bit config must be a JSON object")
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    @classmethod
    def from_any(cls, spec: BitConfig | Mapping[str, Any] | str | os.PathLike[str]) -> BitConfig:
        """A ``BitConfig``, its JSON dict (recognised by any of its fields: ``schema_version``,
        ``layers``, ``default``, ``first_last``; a dict without ``schema_version`` is read as this
        release's), a ``{layer: bits}`` dict, a JSON path or a preset name."""
        if isinstance(spec, BitConfig):
            return spec
        if isinstance(spec, Mapping):
            return cls.from_dict({"schema_version": SCHEMA_VERSION, **spec}) if set(spec) & JSON_FIELDS \
                else cls(layers=spec)
        if isinstance(spec, str) and spec in PRESETS:
            return PRESETS[spec]
        if Path(spec).is_file():
            return cls.load(spec)
        raise ValueError(f"{spec!s} is neither a bit-config file nor a preset ({', '.join(PRESETS)})")

    @classmethod
    def from_hawq(cls, source: Mapping[str, Any] | str | os.PathLike[str], name: str | None = None) -> BitConfig:
        """Read a HAWQ bit config (``bit_config.py`` presets) for a ResNet.

        ``source`` is one HAWQ preset dict (``{'stage1.unit1.quant_convbn1': 4, ...}``; values are
        ints or ``(bits, ...)`` tuples), or the path of HAWQ's ``bit_config.py`` with ``name`` the
        preset to take (e.g. ``"bit_config_resnet50_uniform4"``). HAWQ module names are translated
        to torchvision layer names.
        """
        if not isinstance(source, Mapping):
            source = _hawq_preset_from_file(Path(source), name)
        return cls(layers=_translate_hawq(source))

    # ---- use ----------------------------------------------------------------------------------
    def resolve(self, layers: Sequence[str] | Any) -> dict[str, LayerBits]:
        """Bits of every layer of a model, in the model's order.

        ``layers`` is the list of quantizable layer names, or a ``torch.nn.Module``. Names the
        config lists but the model lacks, and model layers the config leaves without bits, are
        reported together in one ``ValueError``.
        """
        names = _layer_names(layers) if hasattr(layers, "named_modules") else list(layers)
        ends = {names[0], names[-1]} if self.first_last is not None and names else set()
        resolved = {n: self.layers.get(n) or (self.first_last if n in ends else self.default) for n in names}
        unknown = sorted(set(self.layers) - set(names))
        missing = [n for n, bits in resolved.items() if bits is None]
        if unknown or missing:
            parts = [f"unknown layers {_short_list(unknown)}"] if unknown else []
            parts += [f"layers without bits {_short_list(missing)}"] if missing else []
            raise ValueError(f"bit config does not fit the model: {'; '.join(parts)}")
        return resolved

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        if self.default is not None:
            data["default"] = self.default.to_dict()
        if self.first_last is not None:
            data["first_last"] = self.first_last.to_dict()
        data["layers"] = {k: v.to_dict() for k, v in self.layers.items()}
        return data

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the JSON form atomically (a reader never sees a half-written file)."""
        write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")


PRESETS: dict[str, BitConfig] = {
    "uniform8": BitConfig(default=LayerBits(8, 8)),
    "uniform4": BitConfig(default=LayerBits(4, 4), first_last=LayerBits(8, 8)),
    "w4a8": BitConfig(default=LayerBits(4, 8), first_last=LayerBits(8, 8)),
}


def _layer_names(model: Any) -> list[str]:
    from hawqc.models import quantizable_layers

    return quantizable_layers(model)


def _short_list(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return f"({len(names)}): {shown}" + (", ..." if len(names) > limit else "")


# ---- HAWQ's bit_config.py -------------------------------------------------------------------------
# HAWQ names quantizer modules of its own ResNets; each rule maps one to (torchvision layer, field).
# ``quant_act`` quantizes a unit's input, which feeds conv1 and, where present, the downsample conv.
_HAWQ_RULES: list[tuple[re.Pattern[str], tuple[str, ...], str]] = [
    (re.compile(r"quant_input"), ("conv1",), "a_bits"),
    (re.compile(r"quant_init(?:_block)?_convbn"), ("conv1",), "w_bits"),
    (re.compile(r"stage(\d+)\.unit(\d+)\.quant_convbn(\d)"), ("layer{0}.{1}.conv{2}",), "w_bits"),
    (re.compile(r"stage(\d+)\.unit(\d+)\.quant_identity_convbn"), ("layer{0}.{1}.downsample.0",), "w_bits"),
    (re.compile(r"stage(\d+)\.unit(\d+)\.quant_act"), ("layer{0}.{1}.conv1", "layer{0}.{1}.downsample.0"), "a_bits"),
    (re.compile(r"stage(\d+)\.unit(\d+)\.quant_act(\d)"), ("layer{0}.{1}.conv{3}",), "a_bits"),
    (re.compile(r"quant_output"), ("fc",), "w_bits"),
    (re.compile(r"quant_act_output"), ("fc",), "a_bits"),
]
_HAWQ_IGNORED = re.compile(r"(?:stage\d+\.unit\d+\.)?quant_act_int32")
"""16-bit residual accumulators: not a layer's operand, so not part of a BitConfig."""


def _translate_hawq(preset: Mapping[str, Any]) -> dict[str, LayerBits]:
    fields: dict[str, dict[str, int]] = {}
    unknown = []
    for key, value in preset.items():
        bits = value[0] if isinstance(value, (tuple, list)) else value
        if _HAWQ_IGNORED.fullmatch(key):
            continue
        for pattern, targets, field_name in _HAWQ_RULES:
            match = pattern.fullmatch(key)
            if match:
                groups = list(match.groups())
                if len(groups) >= 2:  # HAWQ counts units from 1, torchvision blocks from 0
                    groups[1] = str(int(groups[1]) - 1)
                if len(groups) == 3 and field_name == "a_bits":  # quant_act<k> feeds conv<k+1>
                    groups.append(str(int(groups[2]) + 1))
                for target in targets:
                    fields.setdefault(target.format(*groups), {})[field_name] = bits
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"HAWQ config has keys outside HAWQ's ResNet naming {_short_list(unknown)}")
    # quant_act also names the input of a downsample conv that may not exist: keep complete layers only.
    layers = {name: f for name, f in fields.items() if "w_bits" in f}
    incomplete = sorted(name for name, f in layers.items() if "a_bits" not in f)
    if incomplete:
        raise ValueError(f"HAWQ config gives no activation bits for {_short_list(incomplete)}")
    return {name: LayerBits(f["w_bits"], f["a_bits"]) for name, f in layers.items()}


def _hawq_preset_from_file(path: Path, name: str | None) -> Mapping[str, Any]:
    """Read ``bit_config_dict`` from HAWQ's ``bit_config.py`` without executing it."""
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except SyntaxError as err:
        raise ValueError(f"{path}: not a Python file ({err.msg}, line {err.lineno})") from None
    presets: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue
            if all(isinstance(v, dict) for v in value.values()):
                presets.update(value)
    if not presets:
        raise ValueError(f"{path}: no dict of HAWQ bit-config presets found")
    if name is None and len(presets) == 1:
        return next(iter(presets.values()))
    if name not in presets:
        raise ValueError(f"{path}: choose a preset with name=..., one of {_short_list(sorted(presets))}")
    return presets[name]

