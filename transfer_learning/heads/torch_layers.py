"""The layers of a linear or MLP head in torch: what the torch heads train and the fine-tune starts from. Apart from
torch_heads.py, whose scikit-learn classifier interface imports scikit-learn (seconds of CPU in every fine-tune
process, which has no use for it)."""
from __future__ import annotations

from torch import nn


def layers_module(feature_dim: int, hidden: list[int], n_out: int, dropout: float) -> nn.Sequential:
    """Linear (hidden=[]) or MLP: Linear, ReLU, Dropout per hidden width, then the output Linear."""
    modules: list[nn.Module] = []
    width = feature_dim
    for out in hidden:
        modules += [nn.Linear(width, out), nn.ReLU(), nn.Dropout(dropout)]
        width = out
    modules.append(nn.Linear(width, n_out))
    return nn.Sequential(*modules)
