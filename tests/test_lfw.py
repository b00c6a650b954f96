"""LFW loader: the attribute file's quirks, the join, the person-disjoint split file, bad images."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from distributed_asac.data.images import BadImageError
from distributed_asac.data.lfw import LFW, person_disjoint_split
from distributed_asac.errors import UserError

SPLITS = ("train", "valid", "test")
JPEG_TOLERANCE = 8 / 255


@pytest.fixture()
def lfw(tmp_path, write_lfw_fixture):
    return write_lfw_fixture(tmp_path / "lfw_root")


def load_all(fixture, split_file, **kwargs):
    return {split: LFW(fixture.root, split, "Smiling", "Male", split_file=split_file, **kwargs) for split in SPLITS}


def test_labels_follow_the_header_not_shifted_by_the_hash(lfw, tmp_path):
    datasets = load_all(lfw, tmp_path / "split.json")
    for ds in datasets.values():
        assert ds.attribute_names == list(lfw.attribute_names)
        # The fixture negates each attribute's right neighbour: a one-column shift flips these labels.
        assert ds.targets.tolist() == [lfw.label(i, "Smiling") for i in ds.image_ids]
        assert ds.protected_labels.tolist() == [lfw.label(i, "Male") for i in ds.image_ids]


def test_names_with_spaces_map_to_underscored_files(lfw, tmp_path, lfw_image_id):
    datasets = load_all(lfw, tmp_path / "split.json")
    named = lfw_image_id("Ben Arlo Cruz", 3)
    assert named == "Ben_Arlo_Cruz/Ben_Arlo_Cruz_0003.jpg"
    ds = next(ds for ds in datasets.values() if named in ds.image_ids)
    k = ds.image_ids.index(named)
    image, y, a, index = ds[k]
    assert (y, a, index) == (lfw.label(named, "Smiling"), lfw.label(named, "Male"), k)
    assert image.shape == (3, 64, 64)
    colour = torch.tensor(lfw.colours[named], dtype=torch.float32).view(3, 1, 1) / 255
    assert (image - colour).abs().max() <= JPEG_TOLERANCE
    assert ds.person(k) == "Ben_Arlo_Cruz"


def test_join_drops_and_counts_rows_without_images_and_orphans(lfw, tmp_path):
    datasets = load_all(lfw, tmp_path / "split.json")
    counts = datasets["train"].join_counts
    assert counts == {
        "attribute_rows": len(lfw.rows),
        "images_on_disk": len(lfw.rows),  # one row's image missing, one orphan image added
        "matched": len(lfw.rows) - 1,
        "rows_without_image": 1,
        "images_without_row": 1,
    }
    served = [i for ds in datasets.values() for i in ds.image_ids]
    assert sorted(served) == sorted(lfw.image_ids())
    assert lfw.missing_image not in served and lfw.orphan_image not in served


def test_split_is_person_disjoint_balanced_and_stable(lfw, tmp_path):
    split_file = tmp_path / "runs" / "split.json"
    first = load_all(lfw, split_file)
    persons = {split: {ds.person(k) for k in range(len(ds))} for split, ds in first.items()}
    assert not persons["train"] & persons["valid"] and not persons["train"] & persons["test"]
    assert not persons["valid"] & persons["test"]
    total = sum(len(ds) for ds in first.values())
    largest = max(count for _, count in lfw.people)  # a split's share is off by at most one person
    for split, fraction in zip(SPLITS, (0.7, 0.1, 0.2)):
        assert abs(len(first[split]) - fraction * total) <= largest
    stored = json.loads(split_file.read_text())
    assert stored["seed"] == 0 and sorted(stored["persons"]) == sorted(SPLITS)
    # Reused as written, and redrawn identically from the same seed.
    again = load_all(lfw, split_file)
    assert {s: ds.image_ids for s, ds in again.items()} == {s: ds.image_ids for s, ds in first.items()}
    redrawn = tmp_path / "redrawn.json"
    load_all(lfw, redrawn)
    assert json.loads(redrawn.read_text()) == stored


def test_an_edited_split_file_is_followed(lfw, tmp_path):
    split_file = tmp_path / "split.json"
    load_all(lfw, split_file)
    stored = json.loads(split_file.read_text())
    moved = stored["persons"]["test"].pop()
    stored["persons"]["train"].append(moved)
    split_file.write_text(json.dumps(stored))
    train = LFW(lfw.root, "train", "Smiling", "Male", split_file=split_file)
    assert moved.replace(" ", "_") in {train.person(k) for k in range(len(train))}


def test_split_file_errors(lfw, tmp_path):
    split_file = tmp_path / "split.json"
    load_all(lfw, split_file)
    with pytest.raises(UserError, match="drawn with seed 0, not 3"):
        LFW(lfw.root, "train", "Smiling", "Male", split_file=split_file, split_seed=3)
    stored = json.loads(split_file.read_text())
    dropped = stored["persons"]["valid"].pop()
    split_file.write_text(json.dumps(stored))
    with pytest.raises(UserError, match=f"assigns no split to 1 persons .*{dropped}"):
        LFW(lfw.root, "train", "Smiling", "Male", split_file=split_file)
    stored["persons"]["test"].append(stored["persons"]["train"][0])
    split_file.write_text(json.dumps(stored))
    with pytest.raises(UserError, match="in both train and test"):
        LFW(lfw.root, "train", "Smiling", "Male", split_file=split_file)


def test_person_disjoint_split_depends_on_seed_not_order():
    counts = {f"person {k}": 1 + k % 4 for k in range(40)}
    reordered = dict(reversed(list(counts.items())))
    assert person_disjoint_split(counts, seed=5) == person_disjoint_split(reordered, seed=5)
    assert person_disjoint_split(counts, seed=5) != person_disjoint_split(counts, seed=6)


@pytest.mark.parametrize(("target", "name"), [("Wavy Hair", "Wavy Hair"), ("Wavy_Hair", "Wavy Hair"), ("Bags_Under_Eyes", "Bags Under Eyes")])
def test_either_spelling_of_attribute_names(lfw, tmp_path, target, name):
    ds = LFW(lfw.root, "train", target, "Male", split_file=tmp_path / "split.json")
    assert ds.target_name == name
    assert ds.targets.tolist() == [lfw.label(i, name) for i in ds.image_ids]


def test_unknown_attribute_lists_nearest(lfw, tmp_path):
    with pytest.raises(UserError, match=r"nearest: Smiling.*available: Male, Asian"):
        LFW(lfw.root, "train", "Smilling", "Male", split_file=tmp_path / "split.json")


@pytest.mark.parametrize("folder", ["lfw", "lfw_funneled", "lfw-deepfunneled"])
def test_each_image_folder_name(tmp_path, folder, write_lfw_fixture):
    write_lfw_fixture(tmp_path, folder=folder)
    ds = LFW(tmp_path, "test", "Smiling", "Male", split_file=tmp_path / "split.json")
    assert ds.image_folder == folder and len(ds) > 0


def test_image_folder_choice(tmp_path, write_lfw_fixture):
    write_lfw_fixture(tmp_path, folder="lfw")
    write_lfw_fixture(tmp_path, folder="lfw-deepfunneled")
    assert LFW(tmp_path, "train", "Smiling", "Male", split_file=tmp_path / "s.json").image_folder == "lfw-deepfunneled"
    assert LFW(tmp_path, "train", "Smiling", "Male", split_file=tmp_path / "s.json", image_folder="lfw").image_folder == "lfw"
    with pytest.raises(UserError, match="has no lfw_funneled/ folder"):
        LFW(tmp_path, "train", "Smiling", "Male", split_file=tmp_path / "s.json", image_folder="lfw_funneled")


def test_missing_files(tmp_path, write_lfw_fixture):
    with pytest.raises(UserError, match="does not exist"):
        LFW(tmp_path / "absent", "train", "Smiling", "Male", split_file=tmp_path / "s.json")
    fixture = write_lfw_fixture(tmp_path)
    (tmp_path / "lfw_attributes.txt").rename(tmp_path / "attributes.txt")
    with pytest.raises(UserError, match="has no lfw_attributes.txt"):
        LFW(tmp_path, "train", "Smiling", "Male", split_file=tmp_path / "s.json")
    (tmp_path / "attributes.txt").rename(tmp_path / "lfw_attributes.txt")
    fixture.image_dir.rename(tmp_path / "pictures")
    with pytest.raises(UserError, match="has no image folder"):
        LFW(tmp_path, "train", "Smiling", "Male", split_file=tmp_path / "s.json")


@pytest.mark.parametrize(
    ("line", "edit", "message"),
    [
        (2, lambda text: text.replace("#\tperson", "person"), "none of its leading '#' lines is the header"),
        (5, lambda text: text.rsplit("\t", 1)[0], "line 5: expected a person, an image number and 73 scores"),
        (7, lambda text: "\t".join(text.split("\t")[:5] + ["0.3x"] + text.split("\t")[6:]), "line 7: score '0.3x'"),
    ],
)
def test_malformed_attribute_file_names_the_line(lfw, tmp_path, line, edit, message):
    path = lfw.root / "lfw_attributes.txt"
    lines = path.read_text().splitlines()
    lines[line - 1] = edit(lines[line - 1])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=re.escape(message)):
        LFW(lfw.root, "train", "Smiling", "Male", split_file=tmp_path / "split.json")


def test_an_attribute_file_that_is_not_utf8_is_one_line(lfw, tmp_path):
    path = lfw.root / "lfw_attributes.txt"
    lines = path.read_bytes().split(b"\n")
    lines[4] = b"Jos\xe9" + lines[4]  # a Latin-1 é in a person's name, line 5
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(UserError, match=rf"{re.escape(str(path))} is not UTF-8 text: byte 0xe9 at line 5 "):
        LFW(lfw.root, "train", "Smiling", "Male", split_file=tmp_path / "split.json")


def test_any_garbage_in_the_attribute_file_is_one_line(lfw, tmp_path):
    """Seeded garbage after the header (the file's own characters, a superscript digit among them): always a
    UserError; 24 fixed seeds."""
    path = lfw.root / "lfw_attributes.txt"
    header = path.read_text().splitlines()[:2]
    alphabet = np.array(list("0123456789 -.\t\t\t\nAbe²"))
    for seed in range(24):
        path.write_text("\n".join([*header, "".join(np.random.default_rng(seed).choice(alphabet, 600))]))
        with pytest.raises(UserError):
            LFW(lfw.root, "train", "Smiling", "Male", split_file=tmp_path / "split.json")


def test_comment_header_without_tab_after_hash_is_accepted(lfw, tmp_path):
    path = lfw.root / "lfw_attributes.txt"
    path.write_text(path.read_text().replace("#\tperson", "#person", 1))
    ds = LFW(lfw.root, "train", "Smiling", "Male", split_file=tmp_path / "split.json")
    assert ds.targets.tolist() == [lfw.label(i, "Smiling") for i in ds.image_ids]


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_corrupt_jpeg_is_named_or_skipped(lfw, tmp_path, how, corrupt_jpeg):
    split_file = tmp_path / "split.json"
    train = LFW(lfw.root, "train", "Smiling", "Male", split_file=split_file)
    victim = train.image_ids[2]
    corrupt_jpeg(lfw.image_dir / victim, how)
    with pytest.raises(BadImageError, match=re.escape(victim)):
        train[2]
    skipping = LFW(lfw.root, "train", "Smiling", "Male", split_file=split_file, on_bad_image="skip")
    assert skipping.skipped_images == [victim] and skipping.num_skipped == 1
    assert skipping.image_ids == [i for i in train.image_ids if i != victim]
    assert torch.equal(skipping.targets, torch.tensor([lfw.label(i, "Smiling") for i in skipping.image_ids]))
    assert all(skipping[k][0].shape == (3, 64, 64) for k in range(len(skipping)))


def test_landmarks_are_not_available(lfw, tmp_path):
    ds = LFW(lfw.root, "train", "Smiling", "Male", split_file=tmp_path / "split.json")
    with pytest.raises(UserError, match="LFW has no landmark file"):
        ds.landmarks(0)
