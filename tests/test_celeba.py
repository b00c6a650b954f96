"""CelebA loader: labels, images, layouts, twins and every bad-input error, on fixtures in CelebA's formats."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader

from distributed_asac.data.celeba import CelebA
from distributed_asac.data.images import BadImageError, mouth_box_from_landmarks
from distributed_asac.errors import UserError

SPLIT_VALUES = {"train": 0, "valid": 1, "test": 2}
JPEG_TOLERANCE = 8 / 255  # flat JPEG colours decode within a few levels (measured worst: 5)


@pytest.fixture(scope="module")
def flat(tmp_path_factory, write_celeba_fixture):
    return write_celeba_fixture(tmp_path_factory.mktemp("flat"), n=24)


def reference_image(path: Path, image_size: int) -> torch.Tensor:
    """The pipeline computed with torchvision's own functional ops, independently of the loader."""
    image = Image.open(path).convert("RGB")
    image = TF.center_crop(image, [min(image.size)] * 2)
    if image.size != (image_size, image_size):
        image = TF.resize(image, [image_size, image_size], TF.InterpolationMode.BILINEAR, antialias=True)
    return TF.to_tensor(image)


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_labels_and_ids_per_split(tmp_path, layout, write_celeba_fixture):
    fixture = write_celeba_fixture(tmp_path, n=18, layout=layout)
    for split, value in SPLIT_VALUES.items():
        ds = CelebA(tmp_path, split, target="Smiling", protected="Male")
        assert ds.image_ids == fixture.split_ids(value)
        assert ds.attribute_names == fixture.attribute_names  # all 40, as CelebA's header lists them
        assert ds.targets.dtype == ds.protected_labels.dtype == torch.int64
        expected_y = [fixture.label(i, "Smiling") for i in ds.image_ids]
        expected_a = [fixture.label(i, "Male") for i in ds.image_ids]
        assert ds.targets.tolist() == expected_y
        assert ds.protected_labels.tolist() == expected_a
        assert {0, 1} <= set(expected_y) and {0, 1} <= set(expected_a)


def test_named_images_have_their_labels_and_pixels(flat):
    # Partitions cycle 0,1,2: 000005.jpg is the 5th row, so it is in valid; 000009.jpg in test.
    for image_id, split in [("000005.jpg", "valid"), ("000009.jpg", "test"), ("000010.jpg", "train")]:
        ds = CelebA(flat.root, split, target="Big_Nose", protected="Young")
        k = ds.image_ids.index(image_id)
        image, y, a, index = ds[k]
        assert (y, a, index) == (flat.label(image_id, "Big_Nose"), flat.label(image_id, "Young"), k)
        colour = torch.tensor(flat.colour(image_id), dtype=torch.float32).view(3, 1, 1) / 255
        assert (image - colour).abs().max() <= JPEG_TOLERANCE


@pytest.mark.parametrize(
    ("size", "image_size"), [((178, 218), 64), ((218, 178), 32), ((40, 50), 64), ((64, 64), 64)]
)
def test_image_pipeline_matches_torchvision_and_crops_the_band(tmp_path, size, image_size, write_celeba_fixture):
    fixture = write_celeba_fixture(tmp_path, n=6, size=size)
    ds = CelebA(tmp_path, "train", "Smiling", "Male", image_size=image_size)
    for k, image_id in enumerate(ds.image_ids):
        image, *_ = ds[k]
        assert image.shape == (3, image_size, image_size) and image.dtype == torch.float32
        assert image.is_contiguous() and 0 <= image.min() and image.max() <= 1
        assert torch.equal(image, reference_image(fixture.image_path(image_id), image_size))
        # The magenta band (green 0) lies outside the centred square: no output pixel may show it.
        colour = torch.tensor(fixture.colour(image_id), dtype=torch.float32).view(3, 1, 1) / 255
        assert (image - colour).abs().max() <= JPEG_TOLERANCE


def test_already_square_at_size_is_not_resampled(tmp_path, write_celeba_fixture):
    fixture = write_celeba_fixture(tmp_path, n=3, size=(48, 48))
    ds = CelebA(tmp_path, "train", "Smiling", "Male", image_size=48)
    decoded = TF.to_tensor(Image.open(fixture.image_path(ds.image_ids[0])).convert("RGB"))
    assert torch.equal(ds[0][0], decoded)


def test_torchvision_celeba_reads_the_same_labels_and_images(tmp_path, monkeypatch, write_celeba_fixture):
    write_celeba_fixture(tmp_path, n=15, layout="torchvision")
    # The fixture's files cannot match torchvision's MD5 sums; only that check is bypassed.
    monkeypatch.setattr(torchvision.datasets.CelebA, "_check_integrity", lambda self: True)
    transform = torchvision.transforms.Compose(
        [torchvision.transforms.CenterCrop(178), torchvision.transforms.Resize(64), torchvision.transforms.ToTensor()]
    )
    for split in SPLIT_VALUES:
        theirs = torchvision.datasets.CelebA(str(tmp_path), split=split, target_type="attr", transform=transform)
        ours = CelebA(tmp_path, split, target="Wavy_Hair", protected="Male")
        assert ours.image_ids == theirs.filename
        assert torch.equal(ours.targets, theirs.attr[:, theirs.attr_names.index("Wavy_Hair")])
        assert torch.equal(ours.protected_labels, theirs.attr[:, theirs.attr_names.index("Male")])
        assert torch.equal(ours[1][0], theirs[1][0])


def test_subset_of_attribute_columns(tmp_path, write_celeba_fixture):
    fixture = write_celeba_fixture(tmp_path, n=9, attribute_names=("Male", "Smiling", "Young"))
    ds = CelebA(tmp_path, "test", target="Young", protected="Male")
    assert ds.attribute_names == ["Male", "Smiling", "Young"]
    assert ds.targets.tolist() == [fixture.label(i, "Young") for i in ds.image_ids]


def test_attribute_names_accept_spaces_for_underscores(flat):
    ds = CelebA(flat.root, "train", target="Wavy Hair", protected="Male")
    assert ds.target_name == "Wavy_Hair"
    assert ds.targets.tolist() == [flat.label(i, "Wavy_Hair") for i in ds.image_ids]


@pytest.mark.parametrize(("target", "protected", "nearest"), [("Smilling", "Male", "Smiling"), ("Smiling", "male", "Male")])
def test_unknown_attribute_lists_nearest_and_available(flat, target, protected, nearest):
    with pytest.raises(UserError, match="nearest: ") as err:
        CelebA(flat.root, "train", target=target, protected=protected)
    message = str(err.value)
    assert nearest in message.split("nearest: ")[1].split(";")[0]
    assert "available: 5_o_Clock_Shadow" in message and "\n" not in message


def test_missing_root_and_missing_files_name_file_and_layouts(tmp_path, write_celeba_fixture):
    with pytest.raises(UserError, match="does not exist"):
        CelebA(tmp_path / "absent", "train", "Smiling", "Male")
    for layout in ("flat", "torchvision"):
        root = tmp_path / layout
        fixture = write_celeba_fixture(root, n=6, layout=layout)
        (fixture.dataset_dir / "list_eval_partition.txt").unlink()
        with pytest.raises(UserError, match="missing list_eval_partition.txt") as err:
            CelebA(root, "train", "Smiling", "Male")
        assert "torchvision layout" in str(err.value) and "flat layout" in str(err.value)


def test_missing_images_are_counted_and_named(tmp_path, write_celeba_fixture):
    fixture = write_celeba_fixture(tmp_path, n=12)
    gone = fixture.split_ids(2)[:2]
    for image_id in gone:
        fixture.image_path(image_id).unlink()
    with pytest.raises(UserError, match=rf"2 of 4 test images .* missing .*{gone[0]}"):
        CelebA(tmp_path, "test", "Smiling", "Male")
    assert len(CelebA(tmp_path, "train", "Smiling", "Male")) == 4  # other splits are untouched


def replace_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("file", "line", "text", "message"),
    [
        ("list_attr_celeba.txt", 7, "000005.jpg" + " -1" * 39, "line 7: expected 40 attribute values, found 39"),
        ("list_attr_celeba.txt", 4, "000002.jpg" + " -1" * 39 + "  0", "line 4: attribute values must be 1 or -1"),
        ("list_attr_celeba.txt", 1, "many", "line 1: expected the image count"),
        ("list_attr_celeba.txt", 1, "7", "line 1 declares 7 images but 9 rows follow"),
        ("list_eval_partition.txt", 3, "000003.jpg 5", "line 3: expected '<image> <0|1|2>'"),
        ("list_eval_partition.txt", 2, "000001.jpg 1", "lists image 000001.jpg more than once"),
    ],
)
def test_malformed_files_name_the_line(tmp_path, file, line, text, message, write_celeba_fixture):
    write_celeba_fixture(tmp_path, n=9)
    replace_line(tmp_path / file, line, text)
    with pytest.raises(UserError, match=re.escape(message)) as err:
        CelebA(tmp_path, "train", "Smiling", "Male")
    assert file in str(err.value)


def test_a_byte_order_mark_is_not_part_of_the_first_image_name(tmp_path, write_celeba_fixture):
    """An editor's BOM glued to the first row's name made an image no other file lists, and the refusal blamed
    the attribute file, which holds that row."""
    write_celeba_fixture(tmp_path, n=9)
    expected = CelebA(tmp_path, "train", "Smiling", "Male").image_ids
    for name in ("list_eval_partition.txt", "list_attr_celeba.txt"):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert CelebA(tmp_path, "train", "Smiling", "Male").image_ids == expected


@pytest.mark.parametrize("file", ["list_attr_celeba.txt", "list_eval_partition.txt"])
def test_a_byte_that_is_not_utf8_is_one_line_naming_it(tmp_path, file, write_celeba_fixture):
    write_celeba_fixture(tmp_path, n=9)
    path = tmp_path / file
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b".jpg", b"\xe9.jpg", 1)  # a Latin-1 é in the third line
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(UserError, match=rf"{re.escape(str(path))} is not UTF-8 text: byte 0xe9 at line 3 "):
        CelebA(tmp_path, "train", "Smiling", "Male")


def test_any_garbage_in_a_list_file_is_one_line(tmp_path, write_celeba_fixture):
    """Seeded garbage (never the machine's entropy) in each list file, as raw bytes and as text of the files' own
    characters after their header: always a UserError, never another exception; 24 fixed seeds."""
    write_celeba_fixture(tmp_path, n=9)
    alphabet = np.array(list("0123456789 -\t\r\n1.jpgé²"))
    for name, header in (("list_attr_celeba.txt", 2), ("list_eval_partition.txt", 0),
                         ("list_landmarks_align_celeba.txt", 2)):
        path = tmp_path / name
        kept = path.read_text().splitlines()[:header]
        for seed in range(24):
            rng = np.random.default_rng(seed)
            for garbage in (rng.bytes(300), "\n".join([*kept, "".join(rng.choice(alphabet, 300))]).encode()):
                path.write_bytes(garbage)
                with pytest.raises(UserError):
                    dataset = CelebA(tmp_path, "train", "Smiling", "Male")
                    dataset.landmarks(0)
        path.write_text("\n".join(kept))


def test_partition_row_without_attributes(tmp_path, write_celeba_fixture):
    write_celeba_fixture(tmp_path, n=9)
    with open(tmp_path / "list_eval_partition.txt", "a") as handle:
        handle.write("000099.jpg 0\n")
    with pytest.raises(UserError, match="1 train images .* have no row .*000099.jpg"):
        CelebA(tmp_path, "train", "Smiling", "Male")


@pytest.mark.parametrize(("kwargs", "message"), [({"split": "val"}, "unknown CelebA split 'val'"), ({"image_size": 0}, "image_size")])
def test_bad_arguments(flat, kwargs, message):
    arguments = {"split": "train", "target": "Smiling", "protected": "Male"} | kwargs
    with pytest.raises(UserError, match=message):
        CelebA(flat.root, **arguments)


def test_landmarks(flat, tmp_path, write_celeba_fixture):
    ds = CelebA(flat.root, "valid", "Smiling", "Male")
    for k, image_id in enumerate(ds.image_ids):
        points = ds.landmarks(k)
        assert points.dtype == torch.int64 and points.shape == (5, 2)
        assert points.tolist() == flat.landmarks[flat.image_ids.index(image_id)].tolist()
    fixture = write_celeba_fixture(tmp_path, n=6)
    (fixture.dataset_dir / "list_landmarks_align_celeba.txt").unlink()
    ds = CelebA(tmp_path, "train", "Smiling", "Male")  # landmarks are optional until asked for
    with pytest.raises(UserError, match="list_landmarks_align_celeba.txt"):
        ds.landmarks(0)


def test_counterfactual_twins_flip_the_named_attribute(tmp_path, write_celeba_fixture, write_counterfactual_fixture):
    fixture = write_celeba_fixture(tmp_path, n=12)
    twin_colours = write_counterfactual_fixture(fixture, flipped_attribute="Male")
    original = CelebA(tmp_path, "test", target="Smiling", protected="Male")
    twins = CelebA(tmp_path, "test", target="Smiling", protected="Male", counterfactual=True)
    assert twins.image_ids == original.image_ids
    assert torch.equal(twins.targets, original.targets)
    assert torch.equal(twins.protected_labels, 1 - original.protected_labels)
    for k, image_id in enumerate(twins.image_ids):
        image, y, a, index = twins[k]
        assert (y, a, index) == (original.targets[k].item(), 1 - original.protected_labels[k].item(), k)
        colour = torch.tensor(twin_colours[image_id], dtype=torch.float32).view(3, 1, 1) / 255
        assert (image - colour).abs().max() <= JPEG_TOLERANCE
    # Flipping the protected attribute leaves a target of another name alone, and vice versa.
    swapped = CelebA(tmp_path, "test", target="Male", protected="Smiling", counterfactual=True)
    assert torch.equal(swapped.targets, 1 - original.protected_labels)
    assert torch.equal(swapped.protected_labels, original.targets)


def test_counterfactual_errors(tmp_path, write_celeba_fixture, write_counterfactual_fixture):
    fixture = write_celeba_fixture(tmp_path, n=12)
    with pytest.raises(UserError, match="no counterfactual twins"):
        CelebA(tmp_path, "test", "Smiling", "Male", counterfactual=True)
    test_ids = fixture.split_ids(2)
    write_counterfactual_fixture(fixture, image_ids=test_ids[:-1])
    with pytest.raises(UserError, match=rf"1 of {len(test_ids)} test images have no twin .*{test_ids[-1]}"):
        CelebA(tmp_path, "test", "Smiling", "Male", counterfactual=True)
    train_ids = fixture.split_ids(0)  # twins are listed for test images only
    with pytest.raises(UserError, match=rf"{len(train_ids)} of {len(train_ids)} train images have no twin .*{train_ids[0]}"):
        CelebA(tmp_path, "train", "Smiling", "Male", counterfactual=True)
    write_counterfactual_fixture(fixture)
    (fixture.dataset_dir / "counterfactual" / "img_align_celeba" / test_ids[0]).unlink()
    with pytest.raises(UserError, match=rf"1 of {len(test_ids)} twin images .* missing"):
        CelebA(tmp_path, "test", "Smiling", "Male", counterfactual=True)


def test_text_files_are_parsed_once(tmp_path, write_celeba_fixture):
    fixture = write_celeba_fixture(tmp_path, n=9)
    ds = CelebA(tmp_path, "test", "Smiling", "Male")
    before = [ds[k][1:] for k in range(len(ds))]
    for name in ("list_attr_celeba.txt", "list_eval_partition.txt"):
        (fixture.dataset_dir / name).unlink()
    assert [ds[k][1:] for k in range(len(ds))] == before


def test_dataloader_batches_and_pickles(flat):
    ds = CelebA(flat.root, "train", "Smiling", "Male", image_size=32)
    images, y, a, index = next(iter(DataLoader(ds, batch_size=4)))
    assert images.shape == (4, 3, 32, 32)
    assert torch.equal(y, ds.targets[:4]) and torch.equal(a, ds.protected_labels[:4])
    assert index.tolist() == [0, 1, 2, 3]
    clone = pickle.loads(pickle.dumps(ds))  # what DataLoader workers receive under spawn
    assert torch.equal(clone[2][0], ds[2][0]) and clone.image_ids == ds.image_ids
    assert ds[-1][3] == len(ds) - 1
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_mouth_box_maps_landmarks_through_crop_and_resize():
    # 200×240 image: the crop drops 20 rows at the top, then 200 → 100 halves every coordinate.
    points = np.array([[70, 110], [130, 110], [100, 130], [80, 150], [120, 150]])
    # Mouth width 40, widened by 0.25·40 on each side → x 70..130; half as tall → y 135..165.
    assert mouth_box_from_landmarks(points, (200, 240), 100) == (35, 57, 65, 73)
    assert mouth_box_from_landmarks(points, (200, 240), 100, margin=0.0) == (40, 60, 60, 70)
    assert mouth_box_from_landmarks(points + [0, 95], (200, 240), 100)[3] == 100  # clipped to the image


def test_mouth_box_holds_the_drawn_mouth(tmp_path, write_celeba_fixture):
    fixture = write_celeba_fixture(tmp_path, n=6, mark_mouth=True)
    ds = CelebA(tmp_path, "train", "Smiling", "Male", image_size=64)
    for k, image_id in enumerate(ds.image_ids):
        image = ds[k][0]
        face = torch.tensor(fixture.colour(image_id), dtype=torch.float32).view(3, 1, 1) / 255
        dark = ((face - image).min(dim=0).values > face.min() / 2).nonzero()  # the black line, in (y, x)
        x0, y0, x1, y1 = ds.mouth_box(k).tolist()
        assert len(dark) > 0
        assert x0 <= dark[:, 1].min() and dark[:, 1].max() < x1 and y0 <= dark[:, 0].min() and dark[:, 0].max() < y1
        assert (x1 - x0) * (y1 - y0) < 0.2 * 64 * 64


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_bad_image_is_named_or_skipped(tmp_path, how, corrupt_jpeg, write_celeba_fixture):
    fixture = write_celeba_fixture(tmp_path, n=12)
    victim = fixture.split_ids(1)[2]
    corrupt_jpeg(fixture.image_path(victim), how)
    strict = CelebA(tmp_path, "valid", "Smiling", "Male")
    with pytest.raises(BadImageError, match=rf"cannot decode image .*{victim}.*on_bad_image='skip'"):
        strict[strict.image_ids.index(victim)]
    lenient = CelebA(tmp_path, "valid", "Smiling", "Male", on_bad_image="skip")
    assert lenient.skipped_images == [victim] and lenient.num_skipped == 1
    assert lenient.image_ids == [i for i in fixture.split_ids(1) if i != victim]
    assert lenient.targets.tolist() == [fixture.label(i, "Smiling") for i in lenient.image_ids]
    for k, image_id in enumerate(lenient.image_ids):
        colour = torch.tensor(fixture.colour(image_id), dtype=torch.float32).view(3, 1, 1) / 255
        assert (lenient[k][0] - colour).abs().max() <= JPEG_TOLERANCE
    with pytest.raises(UserError, match="on_bad_image must be one of error, skip"):
        CelebA(tmp_path, "valid", "Smiling", "Male", on_bad_image="ignore")


def test_memory_holds_labels_not_pixels(tmp_path, write_celeba_fixture):
    # The pickled dataset (what it holds) grows with the image count, not with the image size.
    write_celeba_fixture(tmp_path / "small", n=30, size=(20, 24), torchvision_extras=False)
    write_celeba_fixture(tmp_path / "large", n=30, size=(178, 218), torchvision_extras=False)
    small = CelebA(tmp_path / "small", "train", "Smiling", "Male", image_size=16)
    large = CelebA(tmp_path / "large", "train", "Smiling", "Male", image_size=128)
    for ds in (small, large):
        for k in range(len(ds)):
            ds[k]
    sizes = [len(pickle.dumps(ds)) for ds in (small, large)]
    assert abs(sizes[0] - sizes[1]) < 64  # only the longer root path differs
    assert sizes[1] < 200 * len(large) + 4096  # ids and labels: a few dozen bytes per image


def test_the_format_module_reads_what_it_writes(tmp_path):
    """The generator's writers and the loader's readers are one module: a round trip returns every value, and the
    attribute file has CelebA's spacing (a trailing space after the names, values as " %2d")."""
    from distributed_asac.data import celeba_format as fmt

    ids = [fmt.image_name(i) for i in range(3)]
    names = ["Male", "Smiling"]
    present = np.array([[True, False], [False, False], [True, True]])
    points = np.arange(30).reshape(3, 10) * 7
    fmt.write_attribute_file(tmp_path / fmt.ATTRIBUTE_FILE, ids, names, present)
    fmt.write_partition_file(tmp_path / fmt.PARTITION_FILE, ids, [0, 2, 1])
    fmt.write_landmarks_file(tmp_path / fmt.LANDMARKS_FILE, ids, points)
    fmt.write_counterfactual_file(tmp_path / fmt.COUNTERFACTUAL_FILE, ids[1:], "Male")
    assert (tmp_path / fmt.ATTRIBUTE_FILE).read_text().splitlines()[:3] == ["3", "Male Smiling ", "000001.jpg  1 -1"]
    table = fmt.read_attribute_file(tmp_path / fmt.ATTRIBUTE_FILE)
    assert (table.image_ids, table.names) == (ids, names)
    assert np.array_equal(table.values, np.where(present, 1, -1))
    partition_ids, partitions = fmt.read_partition_file(tmp_path / fmt.PARTITION_FILE)
    assert (partition_ids, partitions.tolist()) == (ids, [0, 2, 1])
    landmark_ids, read_points = fmt.read_landmarks_file(tmp_path / fmt.LANDMARKS_FILE)
    assert landmark_ids == ids and np.array_equal(read_points, points.reshape(3, 5, 2))
    twin_ids, twin_files, flipped = fmt.read_counterfactual_file(tmp_path / fmt.COUNTERFACTUAL_FILE)
    assert (twin_ids, twin_files, flipped) == (ids[1:], [f"{fmt.IMAGE_DIR}/{i}" for i in ids[1:]], ["Male"] * 2)
