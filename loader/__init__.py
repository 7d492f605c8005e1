"""ctrflow.loader: fast batches of processed parquet for PyTorch (no Dask needed).

``Loader`` reads big pieces with pyarrow in one producer thread, converts them once to tensors on the
target device, shuffles rows inside each chunk and yields ``Batch`` es (column-major views).
"""

from ctrflow.loader.batch import Batch
from ctrflow.loader.loader import Loader, resolve_device

__all__ = ["Batch", "Loader", "resolve_device"]
