"""The one module that owns the CPU / GPU choice (merlin-core's ``dispatch.py`` is the model).

It detects CUDA and RAPIDS once, exposes the dataframe library (pandas or cudf) and the array
library (numpy or cupy), and logs which one is in use. Ops never import cudf themselves: they call
the helpers here, which accept either library's objects.

Example:
    >>> backend = get_backend("cpu")
    >>> backend.name
    'cpu'
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger("ctrflow.etl")


@dataclass(frozen=True)
class Backend:
    """The libraries one ETL run uses.

    Attributes:
        name: ``"cpu"`` (pandas + numpy) or ``"gpu"`` (cudf + cupy).
        df: the dataframe module (pandas or cudf).
        xp: the array module (numpy or cupy).
    """

    name: str
    df: ModuleType
    xp: ModuleType

    @property
    def dask_backend(self) -> str:
        """Value for Dask's ``dataframe.backend`` option."""
        return "cudf" if self.name == "gpu" else "pandas"


@functools.lru_cache(maxsize=1)
def rapids_available() -> bool:
    """True when cudf and dask_cudf import and a CUDA device is visible."""
    if importlib.util.find_spec("cudf") is None or importlib.util.find_spec("dask_cudf") is None:
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no driver, no device: the CPU path is the answer
        return False


GPU_EXTRAS = {12: "gpu-cu12", 13: "gpu-cu13"}  # pyproject's extras: RAPIDS ships one wheel set per CUDA major


def _major(version: str | None) -> int | None:
    """``"12.4"`` -> 12; None or unparsable -> None."""
    try:
        return int(str(version).strip().split(".")[0]) if version else None
    except ValueError:
        return None


def choose_gpu_extra(torch_cuda: str | None, driver_cuda: str | None) -> str | None:
    """The ``ctrflow[...]`` extra matching the CUDA in use, or None when it cannot be told.

    Args:
        torch_cuda: ``torch.version.cuda`` (None for a CPU build of torch). Wins when it is a major
            RAPIDS supports, so cupy / cudf share torch's CUDA runtime libraries.
        driver_cuda: the ``CUDA Version`` nvidia-smi reports (the newest the driver supports; a newer
            driver runs older majors' wheels, so 14 -> ``gpu-cu13``).

    Returns:
        ``"gpu-cu12"``, ``"gpu-cu13"`` or None.
    """
    torch_major = _major(torch_cuda)
    if torch_major in GPU_EXTRAS:
        return GPU_EXTRAS[torch_major]
    driver_major = _major(driver_cuda)
    if driver_major is None or driver_major < min(GPU_EXTRAS):
        return None
    return GPU_EXTRAS[min(driver_major, max(GPU_EXTRAS))]


def _torch_cuda() -> str | None:
    """``torch.version.cuda`` without importing torch for it when it is not installed."""
    if importlib.util.find_spec("torch") is None:
        return None
    try:
        import torch

        return torch.version.cuda
    except Exception:  # noqa: BLE001 - a broken torch install only loses the hint
        return None


def _driver_cuda() -> str | None:
    """The ``CUDA Version: X.Y`` in nvidia-smi's banner, or None (no nvidia-smi, no driver)."""
    import re
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"CUDA Version:\s*([0-9]+(?:\.[0-9]+)?)", out)
    return m.group(1) if m else None


def gpu_install_hint() -> str:
    """``pip install 'ctrflow[gpu-cuXX]'`` for the detected CUDA major, or both choices when unknown."""
    extra = choose_gpu_extra(_torch_cuda(), _driver_cuda())
    if extra:
        return f"pip install 'ctrflow[{extra}]'"
    return " or ".join(f"pip install 'ctrflow[{e}]' (CUDA {m})" for m, e in sorted(GPU_EXTRAS.items()))


@functools.lru_cache(maxsize=4)
def get_backend(engine: str = "auto") -> Backend:
    """Pick and log the backend.

    Args:
        engine: ``"auto"`` (GPU when RAPIDS and a device are present), ``"cpu"`` or ``"gpu"``.

    Returns:
        The chosen ``Backend``.

    Raises:
        ValueError: ``engine="gpu"`` without RAPIDS / a CUDA device, or an unknown engine.
    """
    if engine not in ("auto", "cpu", "gpu"):
        raise ValueError(f"engine must be auto, cpu or gpu, got {engine!r}")
    use_gpu = engine == "gpu" or (engine == "auto" and rapids_available())
    if use_gpu:
        if not rapids_available():
            if importlib.util.find_spec("cudf") is not None and importlib.util.find_spec("dask_cudf") is not None:
                raise ValueError("--engine gpu: cudf is installed but no CUDA device is visible "
                                 "(check nvidia-smi and CUDA_VISIBLE_DEVICES), or use --engine cpu")
            raise ValueError(f"--engine gpu needs RAPIDS (cudf, dask-cudf) and a CUDA device: "
                             f"{gpu_install_hint()} on a GPU machine, or use --engine cpu")
        import cudf
        import cupy

        backend = Backend("gpu", cudf, cupy)
    else:
        backend = Backend("cpu", pd, np)
    log.info("ETL backend: %s (%s + %s)", backend.name, backend.df.__name__, backend.xp.__name__)
    return backend


_POOL_CHOSEN = False


def use_etl_memory_pool() -> None:
    """Let arrow allocate from jemalloc (else the system allocator) instead of its default mimalloc.

    mimalloc asks for transparent huge pages; on Linux with THP ``defrag=madvise`` (the Ubuntu
    default) every fresh arena then stalls in direct compaction: on the 2M-row Criteo ETL that was
    ~1.5 s of kernel time (more than the parquet decode itself), against ~0.3 s with jemalloc. An
    explicit ``ARROW_DEFAULT_MEMORY_POOL`` is respected. Idempotent; called by the readers, so
    Dask workers in other processes switch too.
    """
    global _POOL_CHOSEN
    if _POOL_CHOSEN:
        return
    _POOL_CHOSEN = True
    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL") or pa.default_memory_pool().backend_name != "mimalloc":
        return
    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    except (NotImplementedError, pa.ArrowNotImplementedError):  # a build without jemalloc
        pa.set_memory_pool(pa.system_memory_pool())


def thread_map(fn: Any, items: list[Any]) -> list[Any]:
    """``[fn(x) for x in items]`` on up to one thread per core, for arrow kernels that release the GIL
    (e.g. unifying or sorting one column each) in serial parts of the ETL."""
    workers = min(len(items), os.cpu_count() or 1)
    if workers < 2:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def compute(*lazy: Any) -> tuple[Any, ...]:
    """``dask.compute`` that skips Dask's import of ``distributed`` when no client can exist.

    To look for a client, ``dask.compute`` imports ``distributed`` on first use (~0.35 s of one
    core, a sixth of a 2M-row ETL). When ``distributed`` was never imported there is no client,
    so with no scheduler configured the threaded scheduler (Dask's default then) is passed
    explicitly; otherwise this is plain ``dask.compute``.
    """
    import dask

    if "distributed" not in sys.modules and dask.config.get("scheduler", None) is None:
        import dask.threaded

        return dask.compute(*lazy, scheduler=dask.threaded.get)
    return dask.compute(*lazy)


def current_backend_name() -> str:
    """``"gpu"`` while Dask's ``dataframe.backend`` is cudf (set by the ETL for a GPU run)."""
    import dask

    return "gpu" if dask.config.get("dataframe.backend", "pandas") == "cudf" else "cpu"


def frame_from_arrow(table: pa.Table) -> Any:
    """A cudf DataFrame from an arrow table (dictionary columns become categoricals)."""
    import cudf

    return cudf.DataFrame.from_arrow(table)


def is_gpu_object(obj: Any) -> bool:
    """True for cudf / cupy objects (checked by module name, so cudf need not be imported)."""
    return type(obj).__module__.split(".")[0] in ("cudf", "cupy")


def to_numpy(values: Any) -> np.ndarray:
    """A host numpy array from a numpy / cupy array or a pandas / cudf Series."""
    if hasattr(values, "to_numpy") and not is_gpu_object(values):
        return values.to_numpy()
    if is_gpu_object(values):
        return values.get() if hasattr(values, "get") else values.to_numpy()
    return np.asarray(values)


def to_arrow(series: Any) -> pa.Array:
    """A pyarrow Array from a pandas or cudf Series (categoricals become dictionary arrays)."""
    if is_gpu_object(series):
        return series.to_arrow()
    if isinstance(series.dtype, pd.ArrowDtype):
        arr = series.array._pa_array  # zero-copy: the arrow data the partition was read into
    else:
        arr = pa.Array.from_pandas(series)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    return arr


def nan_to_null(arr: pa.Array) -> pa.Array:
    """Floating NaN as null, so parquet NaNs encode and hash like pandas' missing values."""
    if pa.types.is_floating(arr.type):
        nan = pc.is_nan(arr)
        if pc.any(nan).as_py():
            return pc.if_else(nan, pa.scalar(None, arr.type), arr)
    return arr


def series_like(like: Any, values: Any, name: str | None = None) -> Any:
    """A Series of the same library and index as ``like`` holding ``values``."""
    if is_gpu_object(like):
        import cudf

        return cudf.Series(values, index=like.index, name=name)
    return pd.Series(values, index=like.index, name=name, copy=False)


def factorize(series: Any) -> tuple[np.ndarray, pa.Array]:
    """Codes and unique values of a column, nulls coded -1.

    Uses the column's own dictionary when it is categorical (no hashing), otherwise pyarrow's
    ``dictionary_encode`` (faster than ``pandas.factorize`` on strings).

    Args:
        series: a pandas / cudf Series of any dtype.

    Returns:
        ``(codes [N] int32 or int64 with -1 for null, uniques: pyarrow Array)``.
    """
    if is_gpu_object(series):
        codes, uniques = series.factorize()
        return to_numpy(codes), uniques.to_arrow()
    if isinstance(series.dtype, pd.CategoricalDtype):
        cats = series.cat.categories
        return series.cat.codes.to_numpy(), pa.Array.from_pandas(cats)
    return factorize_arrow(to_arrow(series))


def factorize_arrow(arr: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """``factorize`` of an arrow array (e.g. a list column's flat values): codes [N] (-1 null), uniques."""
    arr = nan_to_null(arr)
    if pa.types.is_dictionary(arr.type):
        enc = arr
    else:
        enc = arr.dictionary_encode()
    idx = enc.indices
    codes = (idx.fill_null(-1) if idx.null_count else idx).to_numpy(zero_copy_only=False)
    return codes, enc.dictionary


def to_float(series: Any) -> Any:
    """A float64 array (numpy or cupy) of a numeric Series, NaN for nulls."""
    dtype = series.dtype
    if not is_gpu_object(series) and not isinstance(dtype, pd.ArrowDtype) and not (
        pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)
    ):
        raise TypeError(f"column {series.name!r} holds {dtype}: a numeric op needs numbers")
    if isinstance(dtype, pd.CategoricalDtype) or str(dtype) == "category" or (
        isinstance(dtype, pd.ArrowDtype) and not (pa.types.is_integer(dtype.pyarrow_dtype)
                                                  or pa.types.is_floating(dtype.pyarrow_dtype))
    ):
        raise TypeError(f"column {series.name!r} holds {dtype}: a numeric op needs numbers")
    if is_gpu_object(series):
        return series.astype("float64").fillna(np.nan).values
    if isinstance(dtype, pd.ArrowDtype):
        arr = to_arrow(series)
        if arr.null_count:  # one pass to float64 with NaN (integers too), not cast + fill_null
            return arr.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
        if pa.types.is_floating(arr.type) and arr.type != pa.float64():
            arr = arr.cast(pa.float64())
        return arr.to_numpy().astype(np.float64, copy=False)
    return series.to_numpy(dtype=np.float64, na_value=np.nan)


def float_work(series: Any) -> Any:
    """Like :func:`to_float`, but always an array the caller owns and may change in place.

    Elementwise ops (FillMissing, Clip, LogOp, Normalize) chain on it with ``out=`` writes, so a
    chain of four costs one conversion and no intermediate arrays or Series. Arrow's zero-copy
    views are read-only, so a writable result of an arrow-backed column is always fresh.
    """
    x = to_float(series)
    if is_gpu_object(x):
        return x.copy()  # cudf's .values may view the column
    if isinstance(series.dtype, pd.ArrowDtype):
        return x if x.flags.writeable else x.copy()
    # numpy-backed (or masked) float64 storage may come back as a view; any other dtype was converted
    if getattr(series.dtype, "numpy_dtype", series.dtype) == np.float64 or not x.flags.writeable:
        x = x.copy()
    return x


def float_work_filled(series: Any, fill: float | None) -> tuple[Any, bool]:
    """:func:`float_work` with nulls set to ``fill`` on the way, when that is exact and cheap.

    For an arrow integer column and an integral ``fill``, nulls are filled in the integers before
    the one conversion to float64 (no NaN written, no NaN scan after: a third of the cost).

    Returns:
        ``(array, True)`` when every missing value is already ``fill``, else ``(float_work(series),
        False)``.
    """
    if (fill is not None and not is_gpu_object(series) and isinstance(series.dtype, pd.ArrowDtype)
            and pa.types.is_integer(series.dtype.pyarrow_dtype) and float(fill).is_integer()
            and (fill != 0 or math.copysign(1.0, fill) > 0)):  # -0.0 would become +0.0
        arr = to_arrow(series)
        try:
            if arr.null_count:
                arr = arr.fill_null(pa.scalar(int(fill), arr.type))
        except (pa.ArrowInvalid, OverflowError):  # fill outside the integer type
            return float_work(series), False
        return arr.to_numpy().astype(np.float64), True
    return float_work(series), False


def xp_of(array: Any) -> ModuleType:
    """numpy or cupy, whichever owns ``array``."""
    if is_gpu_object(array):
        import cupy

        return cupy
    return np


def frame_from_columns(like: Any, columns: dict[str, Any]) -> Any:
    """A DataFrame of ``like``'s library and index from ``{name: Series}`` without copying.

    ``copy=False`` matters: pandas otherwise stacks same-dtype columns into 2-D blocks, a full
    copy that cost more than the ops themselves on Criteo-shaped partitions.
    """
    if is_gpu_object(like):
        return type(like)(columns, index=like.index)
    return pd.DataFrame(columns, index=like.index, copy=False)
