"""Model defaults, written once: the constructors, ``from_schema`` and ``train/fit.py`` read them.

``HIDDEN`` is the widths of every MLP (fastai's TabularModel, DLRM's bottom and top archs, DCN-v2's
deep network), the seed notebook's ``layers=[512, 256]``; DLRM's interaction needs one embedding dim
for every table; TabularModel and DCN-v2 keep the schema's per-table dims, capped (the seed notebook
capped them at 16; 64 trained better on the embedded data: bench/RESULTS.md, "Training"). ``NUMERIC_DIM`` is
the width per continuous column of a numeric embedding in TabularModel and DCN-v2.
"""

from __future__ import annotations

HIDDEN: tuple[int, ...] = (512, 256)
DLRM_EMBEDDING_DIM = 16
TABULAR_MAX_DIM = 64
DCN_CROSS_LAYERS = 3  # DCN-v2's cross layers
# d per column of a numeric embedding (ctrflow.models.numeric, fit.py --numeric-embedding) in every model (DLRM's
# legacy "slots" layout uses its embedding dim instead); periodic: PeriodicEncoding's default (rtdl_num_embeddings').
NUMERIC_DIM: dict[str, int] = {"ple": 16, "periodic": 24}
# fit.py's --numeric-embedding auto: this kind whenever the dataset records quantiles for every continuous column.
# With it (and the row warm-up) all 12 model / real-set runs of bench/quality.py and the embedded data's DLRM did
# better than with the raw columns: bench/RESULTS.md "Rare rows warm up, numeric embeddings by default".
NUMERIC_EMBEDDING = "ple"
