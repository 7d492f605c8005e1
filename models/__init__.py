"""ctrflow.models: TabularModel (fastai's), DLRM (torchrec's archs), fused sparse embeddings.

Models take ``(categorical [B, F], continuous [B, n_cont])`` and return logits; the loss lives in
the trainer. Both build from a processed dataset with ``from_schema(path_or_schema)``; with
``features=FeatureConfig(...)`` (per-feature options, shared tables) they also take list features as
``model(categorical, continuous, lists=batch.lists, weights=batch.weights)``.
"""

from ctrflow.models.dlrm import DLRM, DenseArch, InteractionArch, OverArch, SparseArch
from ctrflow.models.embedding import EmbeddingTables, FusedEmbedding, sparse_embedding_modules
from ctrflow.models.feature_embedding import FeatureEmbedding
from ctrflow.models.features import EmbeddingOption, FeatureConfig
from ctrflow.models.sizes import embedding_sizes
from ctrflow.models.tabular import TabularModel

__all__ = [
    "DLRM",
    "DenseArch",
    "EmbeddingOption",
    "EmbeddingTables",
    "FeatureConfig",
    "FeatureEmbedding",
    "FusedEmbedding",
    "InteractionArch",
    "OverArch",
    "SparseArch",
    "TabularModel",
    "embedding_sizes",
    "sparse_embedding_modules",
]
