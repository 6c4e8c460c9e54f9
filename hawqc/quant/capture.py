"""Capture a float PyTorch model as a small graph of quantizable operations.

``torch.fx`` traces the model; conv -> BatchNorm -> ReLU, linear -> ReLU and add -> ReLU chains
become single nodes (ReLU6 and ``Hardtanh(0, m)`` are ReLUs with an upper bound), Dropout and
Identity vanish. A convolution is an ``nn.Conv2d`` module or ``F.conv2d`` called with a Conv2d
module's own weight (as "same"-padding subclasses do); zero padding (``nn.ZeroPad2d``,
``F.pad``) whose readers are all convolutions folds into their (possibly asymmetric) padding.
A mean over H and W is a global average pool (and a flatten without ``keepdim``); an adaptive average
pool to a larger size is an average pool whose window the input's size fixes; ``x.chunk(k, 1)``
gives channel slices and ``x.unflatten(1, (g, -1)).transpose(1, 2).flatten(1, 2)`` is a channel
shuffle (ShuffleNet). Sigmoid, HardSigmoid, SiLU and HardSwish are activations of their own, a
product of two tensors a ``mul`` (squeeze-excite gates), a BatchNorm2d that follows no conv (DenseNet)
a ``bn`` (a per-channel affine map), ``F.interpolate(mode="bilinear")`` a resize.
Shape values (``x.size(0)``, ``x.shape[0]``) are not tensors: they may only serve a reshape to
``(batch, -1)``, which is a flatten, or give an interpolation its size (``t.shape[-2:]``). Everything
else the tracer finds must be one of the supported operations, or capture fails with one error that
names the operation and where it is.
"""

from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from hawqc.quant.activations import activation_kind

_RELU = {F.relu, torch.relu, torch.relu_}
_CONV = {F.conv2d, torch.conv2d}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_RESHAPE_METHODS = ("view", "reshape")
_ADD = {operator.add, operator.iadd, torch.add}
_MUL = {operator.mul, operator.imul, torch.mul}
_PASS_MODULES = (nn.Dropout, nn.Identity)


@dataclass
class Node:
    """One operation of a captured graph; ``inputs`` name earlier nodes."""

    name: str
    kind: str
    """input, conv, dense, add, concat, maxpool, avgpool, gap, flatten, relu, slice (a ``chunk`` part),
    shuffle, act (``attrs["fn"]``: a key of ``ACTIVATIONS``), mul (of two tensors), bn (a BatchNorm2d no
    conv absorbed), resize (bilinear) or output."""
    inputs: list[str]
    layer: str | None = None
    """For conv/dense: the module name of the Conv2d/Linear in the source model; for bn: of the BatchNorm2d."""
    bn: str | None = None
    """For conv: the module name of the folded BatchNorm2d."""
    relu: bool = False
    """A ReLU fused into this node's output."""
    relu_max: float | None = None
    """The upper bound of the fused ReLU (of a relu node: its own), 6.0 for ReLU6; None: unbounded."""
    attrs: dict[str, Any] = field(default_factory=dict)

    def reads(self) -> list[str]:
        """The nodes whose values this one needs: its inputs, and for a resize to another tensor's size that tensor."""
        return self.inputs + ([self.attrs["size_of"]] if "size_of" in self.attrs else [])


def capture(model: nn.Module) -> list[Node]:
    """Trace ``model`` (in eval mode) into a topologically ordered list of :class:`Node`."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as err:  # fx raises many types; the user needs the first line only
        raise ValueError(f"cannot trace the model with torch.fx: {str(err).splitlines()[0]}") from None
    modules = dict(model.named_modules())  # the model's own: gm holds bare stand-ins for get_attr owners
    users = {n: list(n.users) for n in gm.graph.nodes}
    alias: dict[str, str] = {}
    nodes: list[Node] = []
    absorbed: set[str] = set()
    not_tensors: set[str] = set()
    pads: dict[str, list[int]] = {}

    def src(arg: Any) -> str:
        if arg.name in not_tensors:
            raise ValueError(f"unsupported use of {arg.name!r} (a parameter or shape value) as a tensor")
        return alias.get(arg.name, arg.name)

    def only_user(n: torch.fx.Node, accept: Any) -> torch.fx.Node | None:
        (u,) = users[n] if len(users[n]) == 1 else (None,)
        return u if u is not None and accept(u) else None

    def fuse_relu(node: Node, tail: torch.fx.Node) -> None:
        relu = only_user(tail, lambda u: _relu_max(gm, u, modules) is not None)
        if relu is not None:
            node.relu, node.relu_max = True, _finite(_relu_max(gm, relu, modules))
            absorbed.add(relu.name)
            alias[relu.name] = node.name

    for n in gm.graph.nodes:
        if n.name in absorbed:
            continue
        module = modules.get(n.target) if n.op == "call_module" else None
        if n.op == "placeholder":
            nodes.append(Node(n.name, "input", []))
        elif n.op == "output":
            if not isinstance(n.args[0], torch.fx.Node):
                raise ValueError("the model must return a single tensor (put it in eval mode)")
            nodes.append(Node(n.name, "output", [src(n.args[0])]))
        elif n.op == "get_attr" or _is_shape_value(n):
            not_tensors.add(n.name)
        elif isinstance(module, _PASS_MODULES):
            alias[n.name] = src(n.args[0])
        elif (padding := _zero_padding(gm, n, module)) is not None:
            if not all(_is_conv(u, modules) for u in users[n]):
                raise ValueError(f"{n.name}: zero padding is supported only directly before convolutions")
            pads[n.name] = padding
            alias[n.name] = src(n.args[0])
        elif _is_conv(n, modules):
            layer, x, padding = _conv_layer(n, modules)
            if x.name in pads:
                padding = [p + q for p, q in zip(padding, pads[x.name])]
            node = Node(n.name, "conv", [src(x)], layer=layer, attrs={"padding": padding})
            tail = n
            bn = only_user(n, lambda u: u.op == "call_module" and isinstance(modules[u.target], nn.BatchNorm2d))
            if bn is not None:
                node.bn, tail = bn.target, bn
                absorbed.add(bn.name)
                alias[bn.name] = node.name
            fuse_relu(node, tail)
            nodes.append(node)
        elif isinstance(module, nn.Linear):
            node = Node(n.name, "dense", [src(n.args[0])], layer=n.target)
            fuse_relu(node, n)
            nodes.append(node)
        elif (relu_max := _relu_max(gm, n, modules)) is not None:
            nodes.append(Node(n.name, "relu", [src(n.args[0])], relu_max=_finite(relu_max)))
        elif n.op == "call_function" and n.target in _ADD and len(n.args) == 2 and all(
                isinstance(a, torch.fx.Node) for a in n.args) and n.kwargs.get("alpha", 1) == 1:
            node = Node(n.name, "add", [src(a) for a in n.args])
            fuse_relu(node, n)
            nodes.append(node)
        elif _is_method(n, "chunk") or (n.op == "call_function" and n.target is torch.chunk):
            parts = n.args[1] if len(n.args) > 1 else n.kwargs["chunks"]
            dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
            if dim != 1 or not all(u.op == "call_function" and u.target is operator.getitem for u in users[n]):
                raise ValueError(f"{n.name}: only x.chunk(k, dim=1) indexed by part is supported")
            for u in users[n]:  # each part a channel slice of the input
                attrs = {"index": int(u.args[1]), "parts": int(parts)}
                nodes.append(Node(u.name, "slice", [src(n.args[0])], attrs=attrs))
                absorbed.add(u.name)
        elif (groups := _channel_shuffle(n, users)) is not None:
            transpose, flatten = users[n][0], users[users[n][0]][0]
            nodes.append(Node(flatten.name, "shuffle", [src(n.args[0])], attrs={"groups": groups}))
            absorbed.update((transpose.name, flatten.name))
        elif (mean := _spatial_mean(gm, n)) is not None:  # x.mean((2, 3)): a global average pool (and a flatten)
            keepdim, x = mean
            nodes.append(Node(n.name if keepdim else f"{n.name}_pool", "gap", [src(x)]))
            if not keepdim:
                nodes.append(Node(n.name, "flatten", [f"{n.name}_pool"]))
        elif n.op == "call_function" and n.target is torch.cat:
            kwargs = n.normalized_arguments(gm, normalize_to_only_use_kwargs=True).kwargs
            if kwargs.get("dim", 0) != 1:
                raise ValueError(f"{n.name}: only channel concatenation (dim=1) is supported")
            nodes.append(Node(n.name, "concat", [src(a) for a in kwargs["tensors"]]))
        elif (act := activation_kind(n, module)) is not None:
            nodes.append(Node(n.name, "act", [src(n.args[0])], attrs={"fn": act}))
        elif n.op == "call_function" and n.target in _MUL and len(n.args) == 2 and all(
                isinstance(a, torch.fx.Node) for a in n.args):
            nodes.append(Node(n.name, "mul", [src(a) for a in n.args]))
        elif isinstance(module, nn.BatchNorm2d):  # one no conv absorbed (DenseNet's pre-activation)
            node = Node(n.name, "bn", [src(n.args[0])], layer=n.target)
            fuse_relu(node, n)
            nodes.append(node)
        elif n.op == "call_function" and n.target is F.interpolate:
            x, attrs = _resize_attrs(n, src)
            nodes.append(Node(n.name, "resize", [x], attrs=attrs))
        else:
            nodes.append(_pool_or_flatten(gm, n, module, src))
    return nodes


def _resize_attrs(n: torch.fx.Node, src: Any) -> tuple[str, dict[str, Any]]:
    """The input and attrs of ``F.interpolate`` (bilinear): ``align_corners`` and the output size, as numbers
    (``size``), factors (``scale_factor``) or the H, W of another tensor (``size_of``: ``t.shape[-2:]``)."""
    call = inspect.signature(F.interpolate).bind(*n.args, **n.kwargs).arguments
    if call.get("mode", "nearest") != "bilinear" or call.get("antialias") or call.get("recompute_scale_factor"):
        raise ValueError(f"{n.name}: only bilinear interpolation (F.interpolate(mode='bilinear')) is supported")
    attrs: dict[str, Any] = {"align_corners": bool(call.get("align_corners"))}
    size, factor = call.get("size"), call.get("scale_factor")
    if isinstance(size, torch.fx.Node):
        shape = size.args[0] if size.target is operator.getitem and size.args[1] == slice(-2, None) else None
        owner = shape.args[0] if isinstance(shape, torch.fx.Node) and (
            _is_method(shape, "size") and len(shape.args) == 1 or shape.target is getattr) else None
        if not isinstance(owner, torch.fx.Node):
            raise ValueError(f"{n.name}: interpolate to a size that is numbers or another tensor's shape[-2:]")
        attrs["size_of"] = src(owner)
    elif size is not None:
        attrs["size"] = _pair(size)
    else:
        attrs["scale_factor"] = [float(f) for f in (factor if isinstance(factor, (tuple, list)) else (factor, factor))]
    return src(call["input"]), attrs


def _is_method(n: torch.fx.Node, name: str) -> bool:
    return n.op == "call_method" and n.target == name


def _channel_shuffle(n: torch.fx.Node, users: dict[torch.fx.Node, list[torch.fx.Node]]) -> int | None:
    """The groups of ShuffleNet's channel shuffle ``x.unflatten(1, (g, -1)).transpose(1, 2).flatten(1, 2)``
    starting at ``n``; None where ``n`` starts none."""
    if not _is_method(n, "unflatten") or list(n.args[1:2]) != [1] or len(users[n]) != 1:
        return None
    sizes, (transpose,) = n.args[2], users[n]
    if not (_is_method(transpose, "transpose") and list(transpose.args[1:]) == [1, 2] and len(users[transpose]) == 1):
        return None
    (flatten,) = users[transpose]
    if not (_is_method(flatten, "flatten") and list(flatten.args[1:]) == [1, 2]) or len(sizes) != 2 or sizes[1] != -1:
        return None
    return int(sizes[0])


def _spatial_mean(gm: torch.fx.GraphModule, n: torch.fx.Node) -> tuple[bool, torch.fx.Node] | None:
    """``(keepdim, input)`` of a mean over H and W of an NCHW tensor (``x.mean((2, 3))``, ``torch.mean(x,
    [-2, -1], keepdim=True)``); None for anything else."""
    if not ((n.op == "call_method" and n.target == "mean") or (n.op == "call_function" and n.target is torch.mean)):
        return None
    x, *rest = n.args
    dims = rest[0] if rest else n.kwargs.get("dim")
    keepdim = rest[1] if len(rest) > 1 else n.kwargs.get("keepdim", False)
    if not isinstance(dims, (list, tuple)) or sorted(int(d) % 4 for d in dims) != [2, 3]:
        raise ValueError(f"{n.name}: only a mean over H and W (dims 2, 3) is supported")
    return bool(keepdim), x


def _finite(bound: float) -> float | None:
    return None if math.isinf(bound) else bound


def _relu_max(gm: torch.fx.GraphModule, n: torch.fx.Node, modules: dict[str, nn.Module]) -> float | None:
    """The upper bound of a ReLU-like node (``inf`` for ReLU, 6 for ReLU6, ``m`` for Hardtanh(0, m)),
    None for anything else."""
    module = modules.get(n.target) if n.op == "call_module" else None
    if isinstance(module, nn.ReLU) or (n.op == "call_function" and n.target in _RELU) or (
            n.op == "call_method" and n.target in ("relu", "relu_")):
        return math.inf
    if isinstance(module, nn.Hardtanh):  # nn.ReLU6 is Hardtanh(0, 6)
        return float(module.max_val) if module.min_val == 0 else None
    if n.op == "call_function" and n.target in (F.relu6, F.hardtanh):
        kwargs = n.normalized_arguments(gm, normalize_to_only_use_kwargs=True).kwargs
        if n.target is F.relu6:
            return 6.0
        return float(kwargs.get("max_val", 1.0)) if kwargs.get("min_val", -1.0) == 0 else None
    return None


def _zero_padding(gm: torch.fx.GraphModule, n: torch.fx.Node, module: nn.Module | None) -> list[int] | None:
    """[top, left, bottom, right] of a zero-padding node (``nn.ZeroPad2d``, ``nn.ConstantPad2d(.., 0)``,
    ``F.pad`` with constant 0), None for anything else."""
    if isinstance(module, (nn.ZeroPad2d, nn.ConstantPad2d)) and module.value == 0:
        widths = list(module.padding)
    elif n.op == "call_function" and n.target is F.pad:
        kwargs = n.normalized_arguments(gm, normalize_to_only_use_kwargs=True).kwargs
        if kwargs.get("mode", "constant") != "constant" or kwargs.get("value") or len(kwargs["pad"]) not in (2, 4):
            raise ValueError(f"{n.name}: only zero padding of the last two dimensions is supported")
        widths = list(kwargs["pad"])
    else:
        return None
    left, right, top, bottom = (widths + [0, 0])[:4]
    if min(widths) < 0:
        raise ValueError(f"{n.name}: negative padding (cropping) is not supported")
    return [top, left, bottom, right]


def _is_conv(n: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    return (n.op == "call_module" and isinstance(modules[n.target], nn.Conv2d)) or (
        n.op == "call_function" and n.target in _CONV)


def _conv_layer(n: torch.fx.Node, modules: dict[str, nn.Module]) -> tuple[str, torch.fx.Node, list[int]]:
    """``(Conv2d module name, input node, padding [top, left, bottom, right])`` of a conv node: a
    Conv2d module, or ``F.conv2d`` on a Conv2d module's own weight, bias and geometry."""
    if n.op == "call_module":
        conv, name, x, padding = modules[n.target], n.target, n.args[0], modules[n.target].padding
        if conv.padding_mode != "zeros":
            raise ValueError(f"{name}: only zero padding is supported, got padding_mode={conv.padding_mode!r}")
    else:
        call = {**dict(zip(_CONV_ARGS, n.args)), **n.kwargs}
        weight, bias = call["weight"], call.get("bias")
        name = weight.target.rpartition(".")[0] if isinstance(weight, torch.fx.Node) and weight.op == "get_attr" else ""
        conv, x, padding = modules.get(name), call["input"], call.get("padding", 0)
        if not (isinstance(conv, nn.Conv2d) and weight.target == f"{name}.weight"):
            raise ValueError(f"{n.name}: F.conv2d is supported only on a Conv2d module's own weight")
        if (bias.target if isinstance(bias, torch.fx.Node) else bias) != (None if conv.bias is None else f"{name}.bias"):
            raise ValueError(f"{n.name}: F.conv2d must use the bias of {name!r}")
        geometry = [_pair(call.get(k, d)) for k, d in (("stride", 1), ("dilation", 1))] + [call.get("groups", 1)]
        if geometry != [_pair(conv.stride), _pair(conv.dilation), conv.groups]:
            raise ValueError(f"{n.name}: F.conv2d must use the stride, dilation and groups of {name!r}")
    if isinstance(padding, str):
        raise ValueError(f"{name}: only explicit zero padding is supported, got {padding!r}")
    ph, pw = _pair(padding)
    return name, x, [ph, pw, ph, pw]


def _is_shape_value(n: torch.fx.Node) -> bool:
    """``x.size()``, ``x.size(d)``, ``x.shape`` or an item of one: an int, not a tensor."""
    return (n.op == "call_method" and n.target == "size") or (
        n.op == "call_function" and n.target is getattr and n.args[1] == "shape") or (
        n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], torch.fx.Node)
        and _is_shape_value(n.args[0]))


def _is_batch_size(a: Any) -> bool:
    """``x.size(0)``, ``x.size()[0]`` or ``x.shape[0]``."""
    if not isinstance(a, torch.fx.Node):
        return False
    if a.op == "call_method" and a.target == "size":
        return a.args[1:2] == (0,) or a.kwargs.get("dim") == 0
    return a.target is operator.getitem and a.args[1] == 0 and _is_shape_value(a.args[0])


def _is_flatten_reshape(n: torch.fx.Node) -> bool:
    """``x.view(x.size(0), -1)``, ``x.reshape(x.shape[0], -1)``, ``torch.reshape(x, (n, -1))``: a flatten."""
    if n.op == "call_method" and n.target in _RESHAPE_METHODS:
        shape = n.args[1:] if len(n.args) > 2 or not isinstance(n.args[1], (tuple, list)) else n.args[1]
    elif n.op == "call_function" and n.target is torch.reshape:
        shape = n.args[1] if len(n.args) > 1 else n.kwargs.get("shape")
    else:
        return False
    return len(shape) == 2 and _is_batch_size(shape[0]) and shape[1] == -1


def _pool_or_flatten(gm: torch.fx.GraphModule, n: torch.fx.Node, module: nn.Module | None, src: Any) -> Node:
    """Pooling and flatten nodes, from modules or functions; anything else is unsupported."""
    module_op = _module_op(module) if module is not None else None
    if module_op is not None:
        kind, args = module_op
    elif module is None and n.op == "call_function" and n.target in _FUNCTION_KINDS:
        kind = _FUNCTION_KINDS[n.target]
        args = dict(n.normalized_arguments(gm, normalize_to_only_use_kwargs=True).kwargs)
        args.pop("input", None)
    elif module is None and n.op == "call_method" and n.target == "flatten":
        kind, args = "flatten", {"start_dim": n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)}
    elif _is_flatten_reshape(n):
        kind, args = "flatten", {"start_dim": 1}
    else:
        what = f"{type(module).__name__} module" if module is not None else f"{n.op} {getattr(n.target, '__name__', n.target)}"
        where = n.target if module is not None else n.name
        raise ValueError(f"unsupported operation {what} at {where!r}; hawqc quantizes conv (with zero padding), "
                         "linear, add, mul, cat, max/avg/global-avg pool, flatten or reshape(batch, -1), BatchNorm2d, bilinear "
                         "interpolate, relu, relu6, sigmoid, hardsigmoid, silu and hardswish")
    attrs = _pool_attrs(n.name, kind, args)
    return Node(n.name, "avgpool" if "output_size" in attrs else kind, [src(n.args[0])], attrs=attrs)


def _module_op(module: nn.Module) -> tuple[str, dict[str, Any]] | None:
    if isinstance(module, nn.MaxPool2d):
        return "maxpool", {k: getattr(module, k) for k in ("kernel_size", "stride", "padding", "dilation", "ceil_mode")}
    if isinstance(module, nn.AvgPool2d):
        return "avgpool", {k: getattr(module, k) for k in ("kernel_size", "stride", "padding", "ceil_mode",
                                                           "count_include_pad", "divisor_override")}
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return "gap", {"output_size": module.output_size}
    if isinstance(module, nn.Flatten):
        return "flatten", {"start_dim": module.start_dim, "end_dim": module.end_dim}
    return None


_FUNCTION_KINDS = {F.max_pool2d: "maxpool", torch.max_pool2d: "maxpool", F.avg_pool2d: "avgpool",
                   F.adaptive_avg_pool2d: "gap", torch.flatten: "flatten"}


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


def pool_window(attrs: dict[str, Any], size: Any) -> dict[str, Any]:
    """An average pool's window: its own, or that of an adaptive pool to ``output_size`` on an input of
    ``size`` (H, W): kernel = stride = size / output size (torchvision's VGG pools 7x7 to 7x7, the identity)."""
    if "output_size" not in attrs:
        return attrs
    size, out = [int(d) for d in size], attrs["output_size"]
    if any(d % o for d, o in zip(size, out)):
        raise ValueError(f"adaptive average pooling of a {size[0]}x{size[1]} input to {out[0]}x{out[1]}: hawqc "
                         "needs the input a multiple of the output size")
    kernel = [d // o for d, o in zip(size, out)]
    return {"kernel": kernel, "stride": kernel, "padding": [0, 0]}


def _pool_attrs(name: str, kind: str, args: dict[str, Any]) -> dict[str, Any]:
    """Normalise pooling/flatten arguments, refusing the variants the integer graph does not have."""
    if kind == "flatten":
        if args.get("start_dim", 0) != 1 or args.get("end_dim", -1) != -1:
            raise ValueError(f"{name}: only flatten(x, 1) is supported")
        return {}
    if kind == "gap":
        size = args["output_size"]
        if any(not isinstance(d, int) for d in (size if isinstance(size, (tuple, list)) else [size])):
            raise ValueError(f"{name}: adaptive average pooling needs an output size in numbers, got {size!r}")
        return {} if _pair(size) == [1, 1] else {"output_size": _pair(size)}
    if args.get("ceil_mode") and kind == "avgpool":
        raise ValueError(f"{name}: ceil_mode average pooling is not supported (ceil_mode max pooling is)")
    kernel = _pair(args["kernel_size"])
    stride = _pair(args.get("stride") or kernel)
    attrs = {"kernel": kernel, "stride": stride, "padding": _pair(args.get("padding", 0)),
             **({"ceil_mode": True} if args.get("ceil_mode") else {})}
    if kind == "maxpool" and _pair(args.get("dilation", 1)) != [1, 1]:
        raise ValueError(f"{name}: dilated max pooling is not supported")
    if kind == "avgpool" and (not args.get("count_include_pad", True) or args.get("divisor_override")):
        raise ValueError(f"{name}: average pooling must count padding (count_include_pad=True)")
    return attrs
