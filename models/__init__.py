"""ctrflow.models: TabularModel (fastai's), DLRM (torchrec's archs), fused sparse embeddings.

Models take ``(categorical [B, F], continuous [B, n_cont])`` and return logits; the loss lives in
the trainer. Both build from a processed dataset with ``from_schema(path_or_schema)``.
"""

from ctrflow.models.dlrm import DLRM, DenseArch, InteractionArch, OverArch, SparseArch
from ctrflow.models.embedding import EmbeddingTables, FusedEmbedding, sparse_embedding_modules
from ctrflow.models.sizes import embedding_sizes
from ctrflow.models.tabular import TabularModel

__all__ = [
    "DLRM",
    "DenseArch",
    "EmbeddingTables",
    "FusedEmbedding",
    "InteractionArch",
    "OverArch",
    "SparseArch",
    "TabularModel",
    "embedding_sizes",
    "sparse_embedding_modules",
]
