"""The ETL's defaults, written once: ``etl/run.py``'s flags (and its ``--help``) and the benchmarks read them.

The library's ops keep NVTabular's own defaults (``Categorify(freq_threshold=0)`` keeps every value, as
NVTabular 23.08 does, so migrating code gets the same ids); the command line and the benchmarks use
the Criteo settings below.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EtlDefaults:
    """Defaults of ``etl/run.py``.

    Attributes:
        output: processed dataset directory (what ``train/fit.py`` reads by default).
        freq_threshold: Categorify keeps values seen at least this often in the training input.
        negatives: continuous values below 0: ``signed`` (``sign(x) log1p(|x|)``) or ``clip`` (to 0, then
            ``log1p``: NVTabular's Criteo recipe).
        max_size: cap of each cardinality (0: none).
        synthetic_rows: rows of the generated data when no ``--input`` is given.
        valid_fraction: share of ``--input`` held out when no ``--valid`` is given.
        seed: seed of the generator and of the random split.
        compression: parquet compression of the output (``none``: plain pages the loader maps).
        task: what the label holds.
        label: the label column.
    """

    output: str = "data/processed"
    freq_threshold: int = 2
    negatives: str = "clip"
    max_size: int = 0
    synthetic_rows: int = 2_000_000
    valid_fraction: float = 0.1
    seed: int = 0
    compression: str = "none"
    task: str = "binary"
    label: str = "label"


DEFAULTS = EtlDefaults()
