"""A ``torch.export`` program (``.pt2``) as a module of standard layers that hawqc can capture.

The exported graph's ATen operations map back to layers: ``conv2d`` -> ``nn.Conv2d`` (named after its
weight, e.g. ``layer1.0.conv1``), ``batch_norm`` -> ``nn.BatchNorm2d``, ``linear`` -> ``nn.Linear``;
``relu``, ``relu6``, ``hardtanh(0, m)``, ``add``, ``cat`` on channels, ``max_pool2d``, ``avg_pool2d``,
``adaptive_avg_pool2d`` to 1x1, ``mean`` over H and W, ``flatten`` and ``view``/``reshape`` to
``(batch, -1)`` become the calls capture reads; ``dropout``, ``clone`` and ``contiguous`` vanish.
Anything else is refused by name. The rebuilt model is checked against the program on its example input.
"""

from __future__ import annotations

import operator
import os
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from hawqc.models.rebuild import GraphBuilder, batch_norm, check_same, conv2d, linear

aten = torch.ops.aten
_PASS = {aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
         aten.detach.default}
_RELU = {aten.relu.default, aten.relu_.default}
_IGNORED = {aten._assert_tensor_metadata.default, aten.sym_size.int}
SUPPORTED = ("conv2d, batch_norm, linear, relu, relu6, hardtanh(0, m), add, cat (channels), max_pool2d, "
             "avg_pool2d, adaptive_avg_pool2d (1x1), mean over H and W, flatten, view/reshape to (batch, -1)")


def load_program(path: str | os.PathLike[str]) -> Any:
    """``torch.export.load`` with a one-line error."""
    try:
        return torch.export.load(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except Exception as err:  # zip, pickle and schema errors alike
        raise ValueError(f"{path}: not a torch.export program ({str(err).splitlines()[0]})") from None


def from_exported(program: Any, name: str = "model") -> tuple[torch.fx.GraphModule, tuple[int, ...]]:
    """The program as an fx module of standard layers, and its example input's shape (with batch)."""
    signature = program.graph_signature
    sources = {**signature.inputs_to_parameters, **signature.inputs_to_buffers,
               **getattr(signature, "inputs_to_lifted_tensor_constants", {})}
    tensors = {**program.state_dict, **program.constants}
    user_inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name not in sources]
    if len(user_inputs) != 1:
        raise ValueError(f"{name}: the program must take one input tensor, it takes {len(user_inputs)}")
    builder = GraphBuilder()
    env: dict[str, Any] = {user_inputs[0].name: builder.input("x")}
    weights: dict[str, str] = {}  # placeholder name -> source tensor name

    def value(arg: Any) -> Any:
        if isinstance(arg, torch.fx.Node):
            if arg.name in weights:
                return tensors[weights[arg.name]].detach()
            return env[arg.name]
        if isinstance(arg, (list, tuple)):
            return type(arg)(value(a) for a in arg)
        return arg

    for node in program.graph.nodes:
        if node.op == "placeholder":
            if node.name in sources:
                weights[node.name] = sources[node.name]
            continue
        if node.op == "output":
            outputs = node.args[0]
            if len(outputs) != 1:
                raise ValueError(f"{name}: the program must return one tensor, it returns {len(outputs)}")
            module = builder.build(env[outputs[0].name])
            return module, tuple(user_inputs[0].meta["val"].shape)
        env[node.name] = _convert(builder, node, value, weights, name)
    raise ValueError(f"{name}: the program has no output")


def _convert(builder: GraphBuilder, node: torch.fx.Node, value: Any, weights: dict[str, str], name: str) -> Any:
    """One ATen node as builder calls; returns the node standing for its result (None for ignored ones)."""
    target = node.target
    args = [value(a) for a in node.args]
    kwargs = {k: value(v) for k, v in node.kwargs.items()}

    def layer(i: int) -> str:
        """The source module's name, from the weight tensor that argument ``i`` reads."""
        return weights[node.args[i].name].rpartition(".")[0]

    if target is aten.conv2d.default:
        x, w, b, stride, padding, dilation, groups = (args + [None, [1], [0], [1], 1][len(args) - 2:])[:7]
        return builder.layer(layer(1), conv2d(w, b, _pair(stride), _pair(padding), _pair(dilation), groups), x)
    if target is aten.linear.default:
        x, w, b = (args + [None])[:3]
        return builder.layer(layer(1), linear(w, b), x)
    if target in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default):
        x, w, b, mean, var = args[:5]
        eps = args[7] if target is aten.batch_norm.default else args[6]
        if target is aten.batch_norm.default and args[5]:
            raise ValueError(f"{name}: batch_norm in training mode: export the model in eval mode")
        source = layer(1) if node.args[1] is not None else layer(3)
        return builder.layer(source, batch_norm(w, b, mean, var, eps), x)
    if target is operator.getitem:  # the output of a multi-output op that kept only its first result
        if node.args[1] != 0:
            raise ValueError(f"{name}: {node.name} uses a secondary output of {node.args[0].name}")
        return args[0]
    if target in _PASS:
        return args[0]
    if target in _IGNORED:
        return None
    if target in _RELU:
        return builder.call(F.relu, args[0])
    if target is aten.relu6.default:
        return builder.call(F.hardtanh, args[0], 0.0, 6.0)
    if target is aten.hardtanh.default:
        return builder.call(F.hardtanh, args[0], *args[1:])
    if target in (aten.add.Tensor, aten.add_.Tensor) and kwargs.get("alpha", 1) == 1 and all(
            isinstance(a, torch.fx.Node) for a in node.args[:2]):
        return builder.call(operator.add, args[0], args[1])
    if target is aten.cat.default:
        return builder.call(torch.cat, args[0], args[1] if len(args) > 1 else 0)
    if target in (aten.max_pool2d.default, aten.max_pool2d_with_indices.default):
        return builder.call(F.max_pool2d, *args)
    if target is aten.avg_pool2d.default:
        return builder.call(F.avg_pool2d, *args)
    if target is aten.adaptive_avg_pool2d.default:
        return builder.call(F.adaptive_avg_pool2d, *args)
    if target is aten.mean.dim and sorted(d % 4 for d in args[1]) == [2, 3]:
        pooled = builder.call(F.adaptive_avg_pool2d, args[0], 1)
        return pooled if (args[2] if len(args) > 2 else kwargs.get("keepdim", False)) else builder.call(
            torch.flatten, pooled, 1)
    if target is aten.flatten.using_ints:
        return builder.call(torch.flatten, *args)
    if target in (aten.view.default, aten.reshape.default) and len(args[1]) == 2:
        return builder.call(torch.flatten, args[0], 1)  # checked against the program below
    raise ValueError(f"{name}: unsupported operation {target} at {node.name}; supported: {SUPPORTED}")


def _pair(v: Any) -> tuple[int, int]:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return (int(v[0]), int(v[-1]))


def load(path: str | os.PathLike[str]) -> tuple[torch.fx.GraphModule, tuple[int, ...]]:
    """A ``.pt2`` file as (module of standard layers, example input shape), checked against the program."""
    program = load_program(path)
    module, shape = from_exported(program, str(path))
    check_same(module, program.module(), shape, str(path))
    return module, shape
