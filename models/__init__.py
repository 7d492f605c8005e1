"""ctrflow.models: TabularModel (fastai's), DLRM (torchrec's archs), DCN-v2, fused sparse embeddings.

Models take ``(categorical [B, F], continuous [B, n_cont])`` and return logits; the loss lives in
the trainer. All build from a processed dataset with ``from_schema(path_or_schema)``; with
``features=FeatureConfig(...)`` (per-feature options, shared tables) they also take list features as
``model(categorical, continuous, lists=batch.lists, weights=batch.weights)``.
"""

from ctrflow.models.dcn import CrossNet, DCNv2
from ctrflow.models.dlrm import DLRM, DenseArch, InteractionArch, OverArch
from ctrflow.models.embedding import EmbeddingTables, FusedEmbedding, SparseArch, sparse_embedding_modules
from ctrflow.models.embedding_part import EmbeddingPart, build_embedding
from ctrflow.models.feature_embedding import FeatureEmbedding
from ctrflow.models.features import EmbeddingOption, FeatureConfig
from ctrflow.models.sizes import embedding_sizes
from ctrflow.models.tabular import TabularModel

__all__ = [
    "CrossNet",
    "DCNv2",
    "DLRM",
    "DenseArch",
    "EmbeddingOption",
    "EmbeddingPart",
    "EmbeddingTables",
    "FeatureConfig",
    "FeatureEmbedding",
    "FusedEmbedding",
    "InteractionArch",
    "OverArch",
    "SparseArch",
    "TabularModel",
    "build_embedding",
    "embedding_sizes",
    "sparse_embedding_modules",
]
