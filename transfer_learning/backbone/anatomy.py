"""One small interface over any torchvision classification model: its blocks, its graph nodes, and a cut.

Nothing here knows an architecture by name. The graph comes from torchvision's feature_extraction; the
classifier is the last top-level child with parameters; the blocks are the top-level children in forward order,
where a child holding most of the parameters (`features` of MobileNet/EfficientNet, `encoder.layers` of ViT) is
split into its own children. "Keep the first N blocks" and "unfreeze the last k blocks" both count these.
What is computed here is recorded in meta.json and read back as backbone/nodes.py's `Anatomy`, without torch.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from transfer_learning.backbone.nodes import Anatomy, Block
from transfer_learning.common.errors import UserError

POOLS = ("avg", "max", "none")


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _owner(node: str, names: list[str]) -> str | None:
    return next((n for n in names if node == n or node.startswith(n + ".")), None)


def _split(module: nn.Module, path: str, total: int) -> list[str]:
    """`path`, or its children when it is the trunk (most parameters, several parametrized children)."""
    children = [(f"{path}.{n}", c) for n, c in module.named_children() if _numel(c) > 0]
    if len(children) >= 4:
        return [p for p, _ in children]
    dominant = [(p, c) for p, c in children if _numel(c) > total / 2]
    if dominant:
        (dom_path, dom), = dominant
        out: list[str] = []
        for p, c in children:
            out += _split(dom, dom_path, total) if p == dom_path else [p]
        return out
    return [path]


def anatomy(model: nn.Module) -> Anatomy:
    nodes = get_graph_node_names(model.eval())[1]
    top = dict(model.named_children())
    parametrized = [n for n in top if _numel(top[n]) > 0]
    classifier = next(n for n in reversed(nodes) if _owner(n, parametrized))
    classifier = _owner(classifier, parametrized)
    first_classifier_node = next(i for i, n in enumerate(nodes) if _owner(n, [classifier]))
    penultimate = nodes[first_classifier_node - 1]

    total = sum(_numel(top[n]) for n in parametrized if n != classifier)
    names: list[str] = []
    for name in parametrized:
        if name == classifier:
            continue
        names += _split(top[name], name, total) if _numel(top[name]) > total / 2 else [name]
    order = {n: i for i, n in enumerate(nodes)}
    owned = {b: [n for n in nodes if _owner(n, [b])] for b in names}
    names = sorted((b for b in names if owned[b]), key=lambda b: order[owned[b][0]])
    blocks = []
    for i, name in enumerate(names):
        if i + 1 < len(names):  # a block's output includes the parameter-free ops (relu, pool) after it
            output = nodes[order[owned[names[i + 1]][0]] - 1]
        else:
            output = owned[name][-1]
        blocks.append(Block(name, output))
    return Anatomy(nodes, classifier, penultimate, blocks)


class PooledFeatures(nn.Module):
    """The backbone up to one graph node, pooled to one vector per image."""

    def __init__(self, model: nn.Module, node: str, pool: str):
        super().__init__()
        if pool not in POOLS:
            raise UserError(f"backbone.pool={pool!r}; valid: {', '.join(POOLS)}")
        self.body = create_feature_extractor(model.eval(), return_nodes={node: "features"})
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool_features(self.body(x)["features"], self.pool)


def pool_features(features: torch.Tensor, pool: str) -> torch.Tensor:
    """One vector per image from a graph node's output: feature maps and token sequences pooled, or flattened."""
    if pool != "none" and features.dim() in (3, 4):
        dims = (2, 3) if features.dim() == 4 else (1,)  # feature maps: H, W; token sequences: tokens
        features = features.mean(dims) if pool == "avg" else features.amax(dims)
    return features.flatten(1)
