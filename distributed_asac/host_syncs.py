"""Where a piece of code makes the host wait for the device, counted two ways (tests/test_host_syncs.py,
benchmarks/sync_counts.py).

- On any device, `host_reads`: the calls that would make a GPU's host wait, seen as they happen: the aten ops whose
  result the host must read (a scalar, or a shape that depends on the data) and the tensor methods that copy to
  the host. On CPU nothing waits, so this is the only count there; a host-to-device copy is invisible to it.
- On a GPU, `cuda_syncs`: the synchronisations CUDA itself reports under `torch.cuda.set_sync_debug_mode("warn")`,
  host-to-device copies from pageable memory included.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# aten ops whose output the host must read: a scalar (item, bool, int, float) or a data-dependent shape.
HOST_READ_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten._unique2.default,
                 aten.unique_dim.default, aten.unique_consecutive.default, aten.masked_select.default,
                 aten.repeat_interleave.Tensor, aten.bincount.default}
HOST_COPY_METHODS = ("tolist", "cpu", "numpy")  # no aten op on a CPU tensor, so they are caught as methods


class HostReads(TorchDispatchMode):
    """Records each host read of a tensor; `exempt` holds the data pointers of tensors that live on the host on
    every device (Adam's step counters), whose reads cost no wait."""

    def __init__(self, exempt: frozenset[int]) -> None:
        super().__init__()
        self.exempt, self.reads = exempt, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READ_OPS and args[0].data_ptr() not in self.exempt:
            self.reads.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@contextmanager
def _copy_methods_recorded(reads: list[str]) -> Iterator[None]:
    """Tensor.tolist/cpu/numpy append their name to `reads` inside the block, and are restored after it."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_COPY_METHODS}

    def recorded(name: str, method: Callable) -> Callable:
        def call(self, *args, **kwargs):
            reads.append(name)
            return method(self, *args, **kwargs)
        return call

    try:
        for name, method in originals.items():
            setattr(torch.Tensor, name, recorded(name, method))
        yield
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def host_reads(run: Callable[[], Any], exempt: frozenset[int] = frozenset()) -> list[str]:
    """The host reads of `run()` in call order (op or method names), but for those of the tensors whose data pointers
    are in `exempt`."""
    mode = HostReads(exempt)
    with _copy_methods_recorded(mode.reads), mode:
        run()
    return mode.reads


def cuda_syncs(run: Callable[[], Any]) -> list[str]:
    """The messages of the synchronisations CUDA's sync debug mode reports during `run()` (needs a GPU); the device's
    queue is drained first, so that only `run`'s own waits count."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return [str(w.message) for w in caught if "synchronizing" in str(w.message)]


def optimizer_step_counters(optimizer: torch.optim.Optimizer) -> frozenset[int]:
    """The data pointers of Adam's step counters, which live on the host on every device (not capturable): reading
    them is no wait, so `host_reads` takes them as `exempt`."""
    return frozenset(state["step"].data_ptr() for state in optimizer.state.values())
