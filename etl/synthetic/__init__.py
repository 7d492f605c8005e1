"""The embedded synthetic data set: Criteo-shaped click logs with a known click probability.

``python etl/run.py`` without ``--input`` calls :func:`generate`. The package holds the writer
(``generator``: parquet parts and ``synthetic.json``), the click model (``model``), the optional
sequence features (``sequences``, ``--with-sequences``) and the oracle metrics (``oracle``).

Example:
    >>> from ctrflow.etl.synthetic import VERSION, generate
    >>> meta = generate("raw/", rows=100_000, seed=0)  # doctest: +SKIP
"""

from ctrflow.etl.synthetic import sequences as seqs
from ctrflow.etl.synthetic.generator import GENERATOR, VERSION, generate
from ctrflow.etl.synthetic.model import CATEGORICAL, CATS, CONTINUOUS, CONTS
from ctrflow.etl.synthetic.oracle import auc, logloss

__all__ = ["CATEGORICAL", "CATS", "CONTINUOUS", "CONTS", "GENERATOR", "VERSION", "auc", "generate", "logloss", "seqs"]
