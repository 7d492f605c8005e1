"""What a ctrflow model provides (:class:`CTRModel`), and the models ``train/fit.py`` can build by name.

The trainer, the server and ``fit.py`` rely on exactly this and nothing model-specific, so a new model
(DCN-v2 was) is one class implementing the Protocol plus one :data:`MODELS` entry (and its export from
``ctrflow.models``, where the server finds a checkpoint's class by name):

* ``forward(categorical [B, F] int, continuous [B, n_cont] float, lists=None, weights=None)`` returns
  logits [B, 1] (the loss lives in the trainer);
* ``config``: the JSON-safe constructor arguments, so a checkpoint rebuilds the model
  (``type(model)(**config)``, see ``ctrflow.serve.predictor``);
* ``from_schema(schema, **kwargs)``: the model sized from a processed dataset's ``schema.json``;
* ``from_options(schema, layers, bottom_layers, embedding_dim, features, dropout, numeric_embedding)``: the
  same from ``fit.py``'s model flags, each model reading them its own way (``None``: its default;
  ``numeric_embedding``: ``"ple"`` | ``"periodic"``, :mod:`ctrflow.models.numeric`, kept in ``config``);
* ``check_input(categorical, continuous, lists=None)``: ``ValueError`` naming what does not fit;
* ``takes_lists``: whether ``forward`` reads list features (the trainer then passes ``lists=`` /
  ``weights=``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from ctrflow.models.dcn import DCNv2
from ctrflow.models.dlrm import DLRM
from ctrflow.models.tabular import TabularModel


@runtime_checkable
class CTRModel(Protocol):
    """The interface every ctrflow model implements (see the module docstring)."""

    config: dict[str, Any]

    @property
    def takes_lists(self) -> bool: ...

    @classmethod
    def from_schema(cls, schema: Any, **kwargs: Any) -> CTRModel: ...

    @classmethod
    def from_options(cls, schema: Any, layers: Sequence[int] | None = None,
                     bottom_layers: Sequence[int] | None = None, embedding_dim: int | None = None,
                     features: Any = None, dropout: float | None = None,
                     numeric_embedding: str | None = None) -> CTRModel: ...

    def check_input(self, categorical: torch.Tensor, continuous: torch.Tensor | None, lists: Any = None) -> None: ...

    def forward(self, categorical: torch.Tensor, continuous: torch.Tensor, lists: Any = None,
                weights: Any = None) -> torch.Tensor: ...


# fit.py --model NAME
MODELS: dict[str, type] = {"dlrm": DLRM, "tabular": TabularModel, "dcn": DCNv2}
