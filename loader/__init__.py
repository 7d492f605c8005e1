"""ctrflow.loader: fast batches of processed parquet for PyTorch (no Dask needed).

``Loader`` reads big pieces with pyarrow in one producer thread, converts them once to tensors on the
target device, shuffles rows inside each chunk and yields ``Batch`` es (column-major views); list
columns come as values + offsets (``to_kjt_layout`` gives torchrec's KeyedJaggedTensor layout) or,
with ``list_format="padded"``, as dense ``[B, L]`` tensors. ``TensorLoader`` cuts in-memory tensors into
the same ``Batch`` es. Batches are cut only here (``plan.py``: rows per rank, batches per chunk).
"""

from ctrflow.loader.batch import Batch
from ctrflow.loader.jagged import KJTLayout, to_kjt_layout, to_padded
from ctrflow.loader.loader import Loader, resolve_device
from ctrflow.loader.tensors import TensorLoader

__all__ = ["Batch", "KJTLayout", "Loader", "TensorLoader", "resolve_device", "to_kjt_layout", "to_padded"]
