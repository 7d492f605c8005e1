"""The MLP every ctrflow model stacks: Linear layers with ReLU between them, optional dropout.

Dropout shares the activation's slot in the ``nn.Sequential`` (``Sequential(ReLU, Dropout)`` where it
applies), so the Linear layers keep their indices and a model's state_dict keys do not depend on its
dropout: a checkpoint trained with dropout loads into the same model without it, and vice versa.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def mlp(in_features: int, sizes: Sequence[int], last_activation: bool = True, dropout: float = 0.0,
        last_dropout: bool = False) -> nn.Sequential:
    """Linear layers of the given widths with ReLU between them (and after the last if asked).

    Args:
        in_features: input width.
        sizes: output width of each Linear layer.
        last_activation: ReLU after the last layer too (a bottom MLP whose output feeds another arch).
        dropout: dropout probability after every hidden layer's ReLU (every layer but the last); 0: none.
        last_dropout: after the last layer's ReLU too (its output feeds another layer of the model).

    Returns:
        ``[B, in_features] -> [B, sizes[-1]]``.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    layers: list[nn.Module] = []
    for i, width in enumerate(sizes):
        layers.append(nn.Linear(in_features, width))
        hidden = i < len(sizes) - 1
        if last_activation or hidden:
            relu = nn.ReLU(inplace=True)
            drop = dropout and (hidden or last_dropout)
            layers.append(nn.Sequential(relu, nn.Dropout(dropout)) if drop else relu)
        in_features = width
    return nn.Sequential(*layers)
