"""A small pool of host buffers, reused only once nothing else references them.

Allocating a fresh multi-hundred-MB buffer per chunk costs page faults comparable to decoding the
chunk (first touch runs at a fraction of memcpy speed), so chunk buffers are recycled. Batches are
*views* of these buffers and may outlive the loader's interest in them (the user keeps a batch,
autograd saves the ids for the backward pass), so a buffer is reused only when its storage has no
other user; otherwise a new one is allocated and the busy one is left to the garbage collector.
"""

from __future__ import annotations

import math

import torch

_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _free(buf: torch.Tensor) -> bool:
    if _use_count is None:  # private API gone in some torch version: never reuse
        return False
    # References: the pool's tensor + the temporary storage object created here.
    return _use_count(buf.untyped_storage()._cdata) <= 2


class BufferPool:
    """Flat buffers handed out as shaped views; at most ``capacity`` kept.

    Args:
        capacity: buffers remembered per pool (busy ones included).
        pin: allocate page-locked memory (for host-to-GPU staging).
    """

    def __init__(self, capacity: int = 4, pin: bool = False) -> None:
        self.capacity = capacity
        self.pin = pin
        self._bufs: list[torch.Tensor] = []

    def get(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous tensor of ``shape`` (a view of a pooled buffer)."""
        n = math.prod(shape)
        best = None
        for b in self._bufs:
            if b.dtype == dtype and b.numel() >= n and (best is None or b.numel() < best.numel()) and _free(b):
                best = b
        if best is None:
            # A little headroom so that slightly larger chunks later still fit.
            best = torch.empty(max(n + n // 8, 1), dtype=dtype, pin_memory=self.pin)
            self._bufs.append(best)
            if len(self._bufs) > self.capacity:
                # Forget an idle buffer if there is one, else the oldest busy one (its users keep it).
                victim = next((i for i, b in enumerate(self._bufs) if b is not best and _free(b)), 0)
                del self._bufs[victim]
        return best[:n].view(shape)

    def clear(self) -> None:
        self._bufs.clear()
