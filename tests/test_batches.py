"""Batches cross the DataLoader's worker boundary as uint8 and arrive, after `to_pixels`, bit-equal to the
float32 batches the datasets' own items make."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from distributed_asac.data.batches import to_pixels, uint8_images
from distributed_asac.data.celeba import CelebA
from distributed_asac.data.images import image_to_tensor
from distributed_asac.data.lfw import LFW


def test_to_pixels_equals_image_to_tensor_for_every_byte_value():
    pixels = np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)  # every value, in every channel
    expected = image_to_tensor(pixels)  # float32 [3, 16, 16]
    assert torch.equal(to_pixels(torch.from_numpy(pixels.transpose(2, 0, 1).copy())[None])[0], expected)
    assert torch.equal(expected * 255, torch.from_numpy(pixels.transpose(2, 0, 1).astype(np.float32)))  # v / 255
    floats = torch.rand(2, 3, 4, 4)
    assert to_pixels(floats) is floats  # float batches pass through


def _batches(dataset, workers: int, seed: int = 0) -> list[list[torch.Tensor]]:
    loader = DataLoader(dataset, batch_size=4, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(seed))
    return list(loader)


@pytest.mark.parametrize("cached", [False, True])
def test_uint8_batches_from_workers_equal_float_batches(tmp_path, cached, write_celeba_fixture):
    fixture = write_celeba_fixture(tmp_path / "data", n=20)
    ds = CelebA(fixture.root, "train", "Smiling", "Male", image_size=24,
                cache_dir=tmp_path / "cache" if cached else None)
    expected = _batches(ds, workers=0)  # today's float batches, made in this process
    received = _batches(uint8_images(ds), workers=2)
    assert len(received) == len(expected) > 1
    for (x8, *labels8), (x, *labels) in zip(received, expected):
        assert x8.dtype == torch.uint8 and x8.shape == x.shape  # what crossed the worker boundary
        assert torch.equal(to_pixels(x8), x)
        assert all(torch.equal(p, q) for p, q in zip(labels8, labels))


def test_subsets_and_other_datasets(tmp_path, write_lfw_fixture):
    fixture = write_lfw_fixture(tmp_path / "lfw")
    ds = LFW(fixture.root, "train", "Smiling", "Male", image_size=16, split_file=tmp_path / "split.json")
    subset = Subset(ds, [3, 0, 2])
    (x8, y8, a8, i8), = DataLoader(uint8_images(subset), batch_size=3)
    (x, y, a, i), = DataLoader(subset, batch_size=3)
    assert x8.dtype == torch.uint8 and torch.equal(to_pixels(x8), x) and i8.tolist() == i.tolist() == [3, 0, 2]
    plain = TensorDataset(torch.rand(4, 3, 2, 2))
    assert uint8_images(plain) is plain  # no uint8 items to offer: the loader sends what it always sent
