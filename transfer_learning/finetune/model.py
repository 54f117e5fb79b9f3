"""The fine-tune network: the cut backbone split into a frozen prefix and a trainable tail, pooled, then a head.

`unfreeze` counts the backbone's blocks (backbones.Anatomy) that the cut keeps: the last k are the tail, the rest
the prefix. The split is made on the torch.fx graph (split_module), so it needs no per-architecture code, and
the prefix and tail share their parameters with the backbone model, which keeps its own parameter names.

Frozen means frozen: the prefix never leaves eval mode (its BatchNorm statistics stay what pretraining left),
its parameters do not require grad. `bn: frozen` also keeps the tail's BatchNorm layers in eval mode (their
affine weights still train, as in the Keras fine-tuning guide); `bn: train` lets them update (fastai).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.fx.passes.split_module import split_module
from torchvision.models.feature_extraction import create_feature_extractor

from transfer_learning.backbone.anatomy import Anatomy, Block, pool_features
from transfer_learning.common.errors import UserError
from transfer_learning.heads.files import Head
from transfer_learning.heads.torch_layers import layers_module

ABSENT_CLASS_BIAS = -1.0e4  # a class the init head never saw: never predicted until training moves it


@dataclass(frozen=True)
class Split:
    kept: list[Block]  # the blocks the cut keeps
    trainable: list[Block]  # the last `unfreeze` of them
    prefix_node: str | None  # graph node whose output the tail takes; None: no prefix (all trainable)


def plan_split(anatomy: Anatomy, cut_node: str, unfreeze: int | str) -> Split:
    order = {node: i for i, node in enumerate(anatomy.node_names)}
    kept = [b for b in anatomy.blocks if order[b.output_node] <= order[cut_node]]
    if unfreeze == "all":
        k = len(kept)
    elif isinstance(unfreeze, int) and 0 <= unfreeze <= len(kept):
        k = unfreeze
    else:
        raise UserError(f"finetune.unfreeze={unfreeze!r}: the cut keeps {len(kept)} blocks "
                        f"({kept[0].name} … {kept[-1].name}); valid: 0..{len(kept)}, all, auto")
    if k == len(kept):
        prefix_node = None
    elif k == 0:
        prefix_node = cut_node
    else:
        prefix_node = kept[len(kept) - k - 1].output_node
    return Split(kept, kept[len(kept) - k:], prefix_node)


def split_body(model: nn.Module, cut_node: str, prefix_node: str | None) -> tuple[nn.Module, nn.Module]:
    """(prefix, tail) with tail(prefix(x)) == the backbone's output at cut_node."""
    if prefix_node is None:
        return nn.Identity(), create_feature_extractor(model, {cut_node: "out"})
    if prefix_node == cut_node:
        return create_feature_extractor(model, {cut_node: "out"}), nn.Identity()
    body = create_feature_extractor(model, {prefix_node: "prefix", cut_node: "features"})
    graph = list(body.graph.nodes)
    outputs = graph[-1].args[0]
    boundary = graph.index(outputs["prefix"])
    position = {node: i for i, node in enumerate(graph)}
    parts = split_module(body, model, lambda node: 0 if position[node] <= boundary else 1)
    tail = parts.submod_1
    placeholders = [n for n in tail.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UserError(f"finetune.unfreeze: the network cannot be cut at {prefix_node!r} (the later blocks also read "
                        "earlier values); choose another finetune.unfreeze, 0 or all")
    return parts.submod_0, tail


def _unwrap(out):
    return out["out"] if isinstance(out, dict) else out


def tail_features(tail: nn.Module, x: torch.Tensor, pool: str) -> torch.Tensor:
    """The tail's output on the prefix's output `x`, pooled: what the head takes."""
    return pool_features(_unwrap(tail(x)), pool)


class Standardize(nn.Module):
    """The init head's standardization, (x - mean) / scale, as fixed buffers.

    Not folded into the first Linear's weights: the function would be the same, but AdamW is not invariant to
    that reparameterization. Folded, a weight on a feature with a small scale and a large mean moves the logits
    far more per step than the others (measured: the train loss went from 0.8 to 8.8 in the first epoch)."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


def head_module(head: Head | None, feature_dim: int, n_classes: int, seed: int = 0) -> nn.Sequential:
    """The init head as torch layers after its standardization; a fresh Linear, initialized from `seed`
    (not from the global RNG, so two runs, or a run and its resumption, start from the same head), when None."""
    if head is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return nn.Sequential(nn.Identity(), layers_module(feature_dim, [], n_classes, 0.0))
    layers = head.layers
    hidden = [w.shape[0] for w, _ in layers[:-1]]
    module = layers_module(feature_dim, hidden, n_classes, float(head.meta["spec"].get("dropout") or 0.0))
    linears = [m for m in module if isinstance(m, nn.Linear)]
    for i, (linear, (weight, bias)) in enumerate(zip(linears, layers)):
        if i == len(layers) - 1:  # rows for the dataset's classes; the head's own cover class_indices
            full_w = np.zeros((n_classes, weight.shape[1]), np.float32)
            full_b = np.full(n_classes, ABSENT_CLASS_BIAS, np.float32)
            full_w[head.meta["class_indices"]], full_b[head.meta["class_indices"]] = weight, bias
            weight, bias = full_w, full_b
        with torch.no_grad():
            linear.weight.copy_(torch.as_tensor(weight))
            linear.bias.copy_(torch.as_tensor(bias))
    return nn.Sequential(Standardize(head.arrays["mean"], head.arrays["scale"]), module)


class FineTuneNet(nn.Module):
    """images -> logits; `forward(x, from_prefix=True)` takes the frozen prefix's output instead of images."""

    def __init__(self, model: nn.Module, anatomy: Anatomy, cut_node: str, pool: str, unfreeze: int | str,
                 bn: str, init_head: Head | None, n_classes: int, input_size: int, seed: int = 0):
        super().__init__()
        self.split = plan_split(anatomy, cut_node, unfreeze)
        self.backbone = model.eval()
        self.prefix, self.tail = split_body(model, cut_node, self.split.prefix_node)
        self.pool = pool
        self.bn = bn
        with torch.no_grad():
            self.feature_dim = int(self.features(torch.zeros(1, 3, input_size, input_size)).shape[1])
        if init_head is not None and init_head.layers[0][0].shape[1] != self.feature_dim:
            raise UserError(f"finetune.init_head: {init_head.name!r} takes {init_head.layers[0][0].shape[1]} features, "
                            f"the backbone cut gives {self.feature_dim}: run `dvc repro train_heads`")
        self.head = head_module(init_head, self.feature_dim, n_classes, seed)
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(False)
        for block in self.split.trainable:
            for parameter in self.backbone.get_submodule(block.name).parameters():
                parameter.requires_grad_(True)
        self.train(False)

    def features(self, x: torch.Tensor, from_prefix: bool = False) -> torch.Tensor:
        if not from_prefix:
            x = self.prefix_output(x)
        return tail_features(self.tail, x, self.pool)

    def forward(self, x: torch.Tensor, from_prefix: bool = False) -> torch.Tensor:
        return self.head(self.features(x, from_prefix))

    def train(self, mode: bool = True) -> FineTuneNet:
        super().train(mode)
        self.backbone.eval()  # the prefix and tail share their modules with the backbone model
        self.tail.train(mode)
        self.prefix.eval()
        if mode and self.bn == "frozen":
            for module in self.tail.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(head, backbone) parameters that train."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        return list(self.head.parameters()), backbone

    def prefix_output(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _unwrap(self.prefix(x))


class Probabilities(nn.Module):
    """What is exported to ONNX: normalized images -> (class probabilities, logits). The logits are there for
    the parity check: probabilities near 0 and 1 would hide differences."""

    def __init__(self, net: FineTuneNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        return torch.softmax(logits, dim=1), logits
