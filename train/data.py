"""Kept for old imports: ``TensorLoader`` lives in ``ctrflow.loader.tensors`` (batches are cut only in
``ctrflow.loader``); ``from ctrflow.train import TensorLoader`` works too."""

from __future__ import annotations

from ctrflow.loader.tensors import TensorLoader

__all__ = ["TensorLoader"]
