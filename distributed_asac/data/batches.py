"""Image batches: uint8 across the DataLoader's worker boundary, float32 in [0, 1] once they arrive.

A worker that sends float32 images copies four bytes per pixel into shared memory, and at 128 px that copy,
not the cache read, limited the cached loader (BENCHMARKS.md). The training and evaluation loaders therefore
read `uint8_images(dataset)`, whose items carry the image as uint8 [3, S, S], and the loop calls
`to_pixels` on each batch it receives: the same float32 values, bit for bit, as the dataset's own items
(`image_to_tensor`, torchvision's `to_tensor`), converted on the consumer's side (on its device, after
Accelerate has moved the batch there: a quarter of the bytes to move as well).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Subset


class Uint8Images(Dataset):
    """The items of a face dataset (CelebA, LFW) with the image as uint8 [3, S, S]: (image, y, a, index)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int, int]:
        pixels, y, a, i = self.dataset.uint8_item(i)  # [S, S, 3]
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))), y, a, i


def uint8_images(dataset: Dataset) -> Dataset:
    """`dataset` with uint8 images for a DataLoader, where it can serve them (face datasets and Subsets of
    them); any other dataset is returned as it is, and `to_pixels` passes its float batches through."""
    if isinstance(dataset, Subset):
        return Subset(uint8_images(dataset.dataset), dataset.indices)
    return Uint8Images(dataset) if hasattr(dataset, "uint8_item") else dataset


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """A batch as models and attacks take it: uint8 [B, 3, S, S] → float32 [B, 3, S, S] in [0, 1] (v / 255,
    rounded once, as `image_to_tensor` computes it); a float batch is returned unchanged.

    On CPU numpy does it in one single-threaded pass, as `image_to_tensor` does and for its reason: torch's
    cast and division would each wake the intra-op thread pool, which waits for descheduled threads when the
    cores are shared. On an accelerator the batch is converted where it is.
    """
    if x.dtype != torch.uint8:
        return x
    if x.device.type != "cpu":
        return x.to(torch.float32).div_(255)
    out = np.empty(x.shape, dtype=np.float32)
    np.divide(x.numpy(), np.float32(255), out=out, dtype=np.float32)
    return torch.from_numpy(out)


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor made on the host (a permutation drawn from a CPU generator) on `device` without waiting: a plain
    copy from pageable memory makes the host wait for the device's queue; one from pinned memory is queued
    like a kernel (the pinned buffer is kept alive by PyTorch's caching host allocator until the copy ran)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
