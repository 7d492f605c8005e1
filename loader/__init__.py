"""ctrflow.loader: fast batches of processed parquet for PyTorch (no Dask needed).

``Loader`` reads big pieces with pyarrow in one producer thread, converts them once to tensors on the
target device, shuffles rows inside each chunk and yields ``Batch`` es (column-major views); list
columns come as values + offsets (``to_kjt_layout`` gives torchrec's KeyedJaggedTensor layout) or,
with ``list_format="padded"``, as dense ``[B, L]`` tensors.
"""

from ctrflow.loader.batch import Batch
from ctrflow.loader.jagged import KJTLayout, to_kjt_layout, to_padded
from ctrflow.loader.loader import Loader, resolve_device

__all__ = ["Batch", "KJTLayout", "Loader", "resolve_device", "to_kjt_layout", "to_padded"]
