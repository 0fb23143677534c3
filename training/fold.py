"""Fold eval-mode BatchNorm into the Conv / ConvTranspose / Linear layer before it (torch.fx pass).

In eval mode a BatchNorm is a per-channel affine map,

    bn(y) = (y - running_mean) * gamma / sqrt(running_var + eps) + beta = y * scale + shift,

and the layer before it is affine per output channel too, so the pair collapses into one layer:
W' = W * scale along the output-channel axis, b' = (b - running_mean) * scale + beta.

The torch utilities are not used on purpose: ``torch.fx.experimental.optimization.fuse`` skips
ConvTranspose and SyncBatchNorm and fails on Linear + BN(affine=False), ``torch.ao``'s
``fuse_modules`` folds a conv whose output has other users (corrupting them), and
``torch.nn.utils.fusion`` scales ConvTranspose weights along dim 0 unless passed transpose=True,
and fails on grouped ones even then.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["FoldError", "fold_batchnorm"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_LAYERS = (*_CONV, *_CONV_TRANSPOSE, nn.Linear)


class FoldError(ValueError):
    """The model cannot be folded as it is; the message names the layer and the fix."""


def fold_batchnorm(model: nn.Module) -> fx.GraphModule:
    """Return a new eval-mode GraphModule with each foldable BatchNorm folded into its producer.

    A BatchNorm (any ``_BatchNorm`` subclass, SyncBatchNorm included) is folded when its only
    input is the output of a Conv{1,2,3}d, ConvTranspose{1,2,3}d or Linear module that is called
    once in the graph and whose output feeds nothing but that BatchNorm. Any other BatchNorm
    (first layer, after an activation, after a layer whose output is also used elsewhere) is left
    in place and still computes the same thing. ``model`` itself is not modified.

    Linear + BatchNorm1d is folded assuming the Linear output is (N, C). On an (N, L, C) output,
    BatchNorm1d normalises dim 1 (L); such a model only runs when L == C, and is folded wrongly.

    Raises:
        FoldError: a submodule is in training mode, or a BatchNorm would use batch statistics in
            eval (``track_running_stats=False`` or missing running stats).
    """
    _check_foldable(model)
    gm = fx.symbolic_trace(copy.deepcopy(model))
    modules = dict(gm.named_modules())
    # Who reads each module's weights: its calls, and get_attr of e.g. "conv.weight" (owner "conv").
    readers = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    readers += [str(n.target).rpartition(".")[0] for n in gm.graph.nodes if n.op == "get_attr"]

    for bn_node in list(gm.graph.nodes):
        bn = modules.get(bn_node.target) if bn_node.op == "call_module" else None
        layer_node = bn_node.args[0] if bn_node.args else None
        if not isinstance(bn, _BatchNorm) or len(bn_node.args) != 1 or bn_node.kwargs:
            continue
        if not isinstance(layer_node, fx.Node) or layer_node.op != "call_module":
            continue
        target = layer_node.target
        assert isinstance(target, str)
        layer = modules[target]
        if not isinstance(layer, _LAYERS) or _out_channels(layer) != bn.num_features:
            continue
        # The layer's weights are rewritten, so every other reader of them would see BN applied:
        # its output must feed only this BN, and nothing else may call it or read its parameters.
        if len(layer_node.users) != 1 or readers.count(target) != 1:
            continue
        _set_submodule(gm, target, _fold_layer_bn(layer, bn))
        bn_node.replace_all_uses_with(layer_node)
        gm.graph.erase_node(bn_node)

    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm.eval()


def _fold_layer_bn(layer: nn.Module, bn: _BatchNorm) -> nn.Module:
    """Return a copy of ``layer`` (Conv/ConvTranspose/Linear) computing ``bn(layer(x))`` in eval."""
    assert bn.running_mean is not None and bn.running_var is not None
    weight, bias = layer.weight, layer.bias
    assert isinstance(weight, torch.Tensor)
    # Fold in float64 so that dead channels (running_var ~ 0, huge scale) lose nothing extra.
    mean, var = bn.running_mean.double(), bn.running_var.double()  # (C_out,)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    b = bias.double() if isinstance(bias, torch.Tensor) else torch.zeros_like(mean)
    scale = gamma * torch.rsqrt(var + bn.eps)  # (C_out,)

    w = weight.double()
    if isinstance(layer, _CONV_TRANSPOSE):
        # (C_in, C_out/groups, *k): output channel g * C_out/groups + j is w[g's rows, j], so
        # split dim 0 into groups and scale dim 1 with that group's slice of `scale`.
        g, k = layer.groups, w.dim() - 2
        w = w.unflatten(0, (g, -1)) * scale.reshape(g, 1, -1, *[1] * k)
        w = w.flatten(0, 1)
    else:
        # Conv: (C_out, C_in/groups, *k); Linear: (C_out, C_in). Output channel is dim 0.
        w = w * scale.reshape(-1, *[1] * (w.dim() - 1))

    fused = copy.deepcopy(layer)
    fused.weight = nn.Parameter(w.to(weight.dtype), weight.requires_grad)
    fused.bias = nn.Parameter(((b - mean) * scale + beta).to(weight.dtype), weight.requires_grad)
    return fused


def _check_foldable(model: nn.Module) -> None:
    """Raise FoldError unless every submodule is in eval mode and every BN has running stats."""
    for name, module in model.named_modules():
        where = name or type(model).__name__
        if module.training:
            raise FoldError(
                f"{where!r} is in training mode: BatchNorm folding needs running statistics; "
                "call model.eval() first"
            )
        if not isinstance(module, _BatchNorm):
            continue
        if not module.track_running_stats:
            raise FoldError(
                f"{where!r} has track_running_stats=False, so it normalises with batch statistics "
                "even in eval mode and cannot be folded; train it with track_running_stats=True"
            )
        if module.running_mean is None or module.running_var is None:
            raise FoldError(
                f"{where!r} has no running_mean/running_var, so it uses batch statistics in eval "
                "mode; load a checkpoint with its running statistics before folding"
            )


def _out_channels(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    assert isinstance(layer, _CONV + _CONV_TRANSPOSE)
    return layer.out_channels


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent), name, module)
