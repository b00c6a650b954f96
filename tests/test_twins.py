"""The oracle_counterfactual row: each train image paired with its own true twin, the loader's batches, the mode's
steps, and a dataset without train twins refused in one line."""

import pytest
import torch

from distributed_asac.config import load_config
from distributed_asac.data import synthetic as syn
from distributed_asac.data.celeba import CelebA
from distributed_asac.data.twins import WithTwins, collate_with_twins, train_twins
from distributed_asac.errors import UserError
from distributed_asac.diagnostics import Diagnostics
from distributed_asac.rows import MODES, StepContext


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Two generated datasets of the same faces: one with train twins, one without."""
    folder = tmp_path_factory.mktemp("twins")
    syn.generate(folder / "twins", 40, 0.9, 3, (32, 32), workers=1, train_twins=True)
    syn.generate(folder / "plain", 40, 0.9, 3, (32, 32), workers=1)
    return folder


def _data(root, *overrides):
    return load_config(None, [f"data.root={root}", "data.image_size=32", "data.synthetic_num_images=40",
                              "data.synthetic_seed=3", *overrides]).data


def test_each_entry_is_paired_with_its_own_twin(roots):
    train = CelebA(roots / "twins", "train", "Smiling", "Male", 32)
    paired = WithTwins(train, train_twins(_data(roots / "twins", "data.synthetic_train_twins=true")))
    assert len(paired) == len(train) == 28
    images = torch.stack([train[i][0] for i in range(len(train))])  # [n, 3, 32, 32]
    for i in range(len(paired)):
        (image, twin), y, (a, twin_a), index = paired[i]
        assert torch.equal(image, images[i]) and index == i
        assert y == int(train.targets[i]) and twin_a == 1 - a == 1 - int(train.protected_labels[i])
        assert paired.twins.image_path(paired.rows[i]).endswith(f"counterfactual/img_align_celeba/{train.image_ids[i]}")
        # The same face with only the beard changed: closer to its own image than to any other train image.
        assert int((images - twin).abs().mean((1, 2, 3)).argmin()) == i


def test_a_batch_holds_the_images_then_their_twins(roots):
    train = CelebA(roots / "twins", "train", "Smiling", "Male", 32)
    paired = WithTwins(train, train_twins(_data(roots / "twins", "data.synthetic_train_twins=true")))
    items = [paired[i] for i in (3, 0, 5)]
    x, y, a, index = collate_with_twins(items)
    assert x.shape == (6, 3, 32, 32) and index.tolist() == [3, 0, 5, 3, 0, 5]
    for j, ((image, twin), label, (protected, twin_protected), _) in enumerate(items):
        assert torch.equal(x[j], image) and torch.equal(x[j + 3], twin)
        assert y[j] == y[j + 3] == label and (a[j], a[j + 3]) == (protected, twin_protected)


def test_the_oracle_steps_cover_each_image_and_twin_once():
    mode = MODES.get("oracle_counterfactual")
    x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 4, 4)  # entry e is filled with e: k = 4 images, 4 twins
    y = torch.tensor([0, 1, 1, 0] * 2)
    ctx = StepContext(None, [0.0, 0.001, 0.01], None, None, None, torch.Generator().manual_seed(0),
                      Diagnostics(3, torch.device("cpu")))
    chunks = mode.make_chunks(ctx, x, y, torch.tensor([0, 1, 0, 1, 1, 0, 1, 0]))
    assert len(chunks) == 3  # |E| steps, as every mode takes
    entries = torch.cat([c.images[:, 0, 0, 0] for c in chunks]).long()
    assert sorted(entries.tolist()) == list(range(8))
    assert torch.equal(torch.cat([c.labels for c in chunks]), y[entries])  # each entry keeps its label
    assert all(c.clean is None for c in chunks)  # plain cross-entropy


def test_a_dataset_without_train_twins_is_one_clear_error(roots):
    with pytest.raises(UserError, match=r"oracle_counterfactual needs .*data\.synthetic_train_twins=true"):
        train_twins(_data(roots / "plain"))
    with pytest.raises(UserError, match=r"oracle_counterfactual needs .*LFW has none"):
        train_twins(_data(roots / "plain", "data.name=lfw"))
    # Read as CelebA-format files, the generated dataset made without them lists test twins only.
    with pytest.raises(UserError, match=r"^finetune\.mode=oracle_counterfactual: 28 of 28 train images have no twin"):
        train_twins(_data(roots / "plain", "data.name=celeba"))
    mode = MODES.get("oracle_counterfactual")
    with pytest.raises(UserError, match=r"data\.synthetic_train_twins=true"):
        mode.check(load_config(None, [f"data.root={roots / 'plain'}"]))
