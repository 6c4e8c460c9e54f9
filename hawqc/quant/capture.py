"""Capture a float PyTorch model as a small graph of quantizable operations.

``torch.fx`` traces the model; conv -> BatchNorm -> ReLU, linear -> ReLU and add -> ReLU chains
become single nodes, Dropout and Identity vanish. Everything else the tracer finds must be one of
the supported operations, or capture fails with one error that names the operation and where it is.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

_RELU = {F.relu, torch.relu, torch.relu_}
_ADD = {operator.add, operator.iadd, torch.add}
_PASS_MODULES = (nn.Dropout, nn.Identity)


@dataclass
class Node:
    """One operation of a captured graph; ``inputs`` name earlier nodes."""

    name: str
    kind: str
    """input, conv, dense, add, concat, maxpool, avgpool, gap, flatten, relu or output."""
    inputs: list[str]
    layer: str | None = None
    """For conv/dense: the module name of the Conv2d/Linear in the source model."""
    bn: str | None = None
    """For conv: the module name of the folded BatchNorm2d."""
    relu: bool = False
    """A ReLU fused into this node's output."""
    attrs: dict[str, Any] = field(default_factory=dict)


def capture(model: nn.Module) -> list[Node]:
    """Trace ``model`` (in eval mode) into a topologically ordered list of :class:`Node`."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as err:  # fx raises many types; the user needs the first line only
        raise ValueError(f"cannot trace the model with torch.fx: {str(err).splitlines()[0]}") from None
    modules = dict(gm.named_modules())
    users = {n: list(n.users) for n in gm.graph.nodes}
    alias: dict[str, str] = {}
    nodes: list[Node] = []
    absorbed: set[str] = set()

    def src(arg: Any) -> str:
        return alias.get(arg.name, arg.name)

    def only_user(n: torch.fx.Node, accept: Any) -> torch.fx.Node | None:
        (u,) = users[n] if len(users[n]) == 1 else (None,)
        return u if u is not None and accept(u) else None

    def is_relu(n: torch.fx.Node) -> bool:
        return (n.op == "call_function" and n.target in _RELU) or (
            n.op == "call_module" and isinstance(modules[n.target], nn.ReLU)) or (
            n.op == "call_method" and n.target in ("relu", "relu_"))

    def fuse_relu(node: Node, tail: torch.fx.Node) -> None:
        relu = only_user(tail, is_relu)
        if relu is not None:
            node.relu = True
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
        elif isinstance(module, _PASS_MODULES):
            alias[n.name] = src(n.args[0])
        elif isinstance(module, nn.Conv2d):
            _check_conv(n.target, module)
            node = Node(n.name, "conv", [src(n.args[0])], layer=n.target)
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
        elif is_relu(n):
            nodes.append(Node(n.name, "relu", [src(n.args[0])]))
        elif n.op == "call_function" and n.target in _ADD and len(n.args) == 2 and all(
                isinstance(a, torch.fx.Node) for a in n.args) and n.kwargs.get("alpha", 1) == 1:
            node = Node(n.name, "add", [src(a) for a in n.args])
            fuse_relu(node, n)
            nodes.append(node)
        elif n.op == "call_function" and n.target is torch.cat:
            kwargs = n.normalized_arguments(gm, normalize_to_only_use_kwargs=True).kwargs
            if kwargs.get("dim", 0) != 1:
                raise ValueError(f"{n.name}: only channel concatenation (dim=1) is supported")
            nodes.append(Node(n.name, "concat", [src(a) for a in kwargs["tensors"]]))
        else:
            nodes.append(_pool_or_flatten(gm, n, module, src))
    return nodes


def _check_conv(name: str, conv: nn.Conv2d) -> None:
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"{name}: only explicit zero padding is supported, got {conv.padding!r}/{conv.padding_mode}")


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
    else:
        what = f"{type(module).__name__} module" if module is not None else f"{n.op} {getattr(n.target, '__name__', n.target)}"
        where = n.target if module is not None else n.name
        raise ValueError(f"unsupported operation {what} at {where!r}; hawqc quantizes conv, linear, add, cat, "
                         "max/avg/global-avg pool, flatten and relu")
    return Node(n.name, kind, [src(n.args[0])], attrs=_pool_attrs(n.name, kind, args))


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


def _pool_attrs(name: str, kind: str, args: dict[str, Any]) -> dict[str, Any]:
    """Normalise pooling/flatten arguments, refusing the variants the integer graph does not have."""
    if kind == "flatten":
        if args.get("start_dim", 0) != 1 or args.get("end_dim", -1) != -1:
            raise ValueError(f"{name}: only flatten(x, 1) is supported")
        return {}
    if kind == "gap":
        if _pair(args["output_size"]) != [1, 1]:
            raise ValueError(f"{name}: only global average pooling (output size 1) is supported")
        return {}
    if args.get("ceil_mode"):
        raise ValueError(f"{name}: ceil_mode pooling is not supported")
    kernel = _pair(args["kernel_size"])
    stride = _pair(args.get("stride") or kernel)
    attrs = {"kernel": kernel, "stride": stride, "padding": _pair(args.get("padding", 0))}
    if kind == "maxpool" and _pair(args.get("dilation", 1)) != [1, 1]:
        raise ValueError(f"{name}: dilated max pooling is not supported")
    if kind == "avgpool" and (not args.get("count_include_pad", True) or args.get("divisor_override")):
        raise ValueError(f"{name}: average pooling must count padding (count_include_pad=True)")
    return attrs
