"""Tests of the controlled-bias synthetic face generator: CelebA formats, bias, twins, regions, errors."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distributed_asac.data import celeba_format as fmt
from distributed_asac.data import synthetic as syn
from distributed_asac.data import synthetic_labels as plan
from distributed_asac.data import synthetic_render as render
from distributed_asac.data.splits import SPLITS
from distributed_asac.errors import UserError

N, BIAS, SEED = 200, 0.9, 5
N_TRAIN, N_VALID, N_TEST = 140, 20, 40


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small dataset, generated in-process, shared by the read-only tests."""
    out = tmp_path_factory.mktemp("synthetic") / "data"
    syn.generate(out, N, BIAS, SEED, workers=1)
    return out


def _lines(path: Path) -> list[str]:
    text = path.read_text(encoding="ascii")
    assert text.endswith("\n") and "\r" not in text
    return text[:-1].split("\n")


def _load_csv(path: Path, header: int | None) -> tuple[list[str], list[str], np.ndarray]:
    """The parsing that torchvision's CelebA loader applies (space-delimited, initial spaces skipped)."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle, delimiter=" ", skipinitialspace=True))
    names: list[str] = []
    if header is not None:
        names, rows = rows[header], rows[header + 1:]
    return names, [row[0] for row in rows], np.array([[int(v) for v in row[1:]] for row in rows])


def _table(path: Path) -> dict[str, list[int]]:
    """filename -> integers of a CelebA-style file with a count line and a header line."""
    return {line.split()[0]: [int(v) for v in line.split()[1:]] for line in _lines(path)[2:]}


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------


def test_attribute_file_is_celeba_format(dataset: Path) -> None:
    lines = _lines(dataset / fmt.ATTRIBUTE_FILE)
    assert lines[0] == str(N)
    assert lines[1] == "Big_Nose Eyeglasses Male Smiling Wavy_Hair "  # CelebA's trailing space
    names = [f"{i:06d}.jpg" for i in range(1, N + 1)]
    row = re.compile(r"^\d{6}\.jpg( -1|  1){5}$")
    for name, line in zip(names, lines[2:], strict=True):
        assert row.match(line) and line.startswith(name + " "), line
    header, index, values = _load_csv(dataset / fmt.ATTRIBUTE_FILE, header=1)
    assert header[:-1] == list(plan.ATTRIBUTES) and header[-1] == ""
    assert index == names and values.shape == (N, 5) and set(np.unique(values)) == {-1, 1}


def test_images_are_celeba_jpegs(dataset: Path) -> None:
    files = sorted(p.name for p in (dataset / fmt.IMAGE_DIR).iterdir())
    assert files == [f"{i:06d}.jpg" for i in range(1, N + 1)]
    for name in files[:: N // 10]:
        with Image.open(dataset / fmt.IMAGE_DIR / name) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 64))


def test_partition_file(dataset: Path) -> None:
    lines = _lines(dataset / fmt.PARTITION_FILE)
    assert all(re.fullmatch(r"\d{6}\.jpg [012]", line) for line in lines)
    _, index, values = _load_csv(dataset / fmt.PARTITION_FILE, header=None)
    assert index == [f"{i:06d}.jpg" for i in range(1, N + 1)]
    assert np.bincount(values[:, 0]).tolist() == [N_TRAIN, N_VALID, N_TEST]


def test_landmarks_follow_celeba_layout_and_the_drawn_face(dataset: Path) -> None:
    lines = _lines(dataset / fmt.LANDMARKS_FILE)
    assert lines[0] == str(N) and lines[1] == " ".join(fmt.LANDMARK_COLUMNS)
    for line in lines[2:]:
        name, *values = line.split()
        first, *rest = map(int, values)
        assert line == f"{name} {first:2d}" + "".join(f"{v:5d}" for v in rest)
    _, _, marks = _load_csv(dataset / fmt.LANDMARKS_FILE, header=1)
    assert ((marks >= 0) & (marks < 64)).all()
    lex, ley, rex, rey, nx, ny, lmx, lmy, rmx, rmy = marks.T
    assert (lex < rex).all() and (lex < nx).all() and (nx < rex).all() and (lmx < rmx).all()
    assert (ny > ley).all() and (lmy > ny).all() and (rmy > ny).all()
    # The landmarks sit on the drawn features: between the mouth corners lies the lip line (lip colour).
    attrs = _table(dataset / fmt.ATTRIBUTE_FILE)
    for name, mark in zip(attrs, marks):
        with Image.open(dataset / fmt.IMAGE_DIR / name) as image:
            x = (mark[6] + mark[8]) // 2
            redness = max(image.getpixel((x, y))[0] - image.getpixel((x, y))[1] for y in (mark[7] - 1, mark[7], mark[7] + 1))
        assert redness > 40, (name, redness)


def test_region_file_boxes_lie_inside_the_image(dataset: Path) -> None:
    lines = _lines(dataset / fmt.REGIONS_FILE)
    assert lines[0] == str(N)
    assert lines[1].split() == [f"{a}_{c}" for a in syn.REGION_ATTRIBUTES for c in ("x1", "y1", "x2", "y2")]
    _, _, boxes = _load_csv(dataset / fmt.REGIONS_FILE, header=1)
    boxes = boxes.reshape(N, len(syn.REGION_ATTRIBUTES), 4)
    x1, y1, x2, y2 = np.moveaxis(boxes, 2, 0)
    assert ((0 <= x1) & (x1 < x2) & (x2 <= 64) & (0 <= y1) & (y1 < y2) & (y2 <= 64)).all()
    # The mouth corners and nose tip fall inside the Smiling and Big_Nose boxes.
    _, _, marks = _load_csv(dataset / fmt.LANDMARKS_FILE, header=1)
    for attribute, points in (("Smiling", [(6, 7), (8, 9)]), ("Big_Nose", [(4, 5)])):
        box = boxes[:, syn.REGION_ATTRIBUTES.index(attribute)]
        for px, py in points:
            assert ((box[:, 0] <= marks[:, px]) & (marks[:, px] < box[:, 2])).all()
            assert ((box[:, 1] <= marks[:, py]) & (marks[:, py] < box[:, 3])).all()


# ---------------------------------------------------------------------------------------------
# Bias and splits
# ---------------------------------------------------------------------------------------------


def test_written_labels_have_the_requested_bias_per_split(dataset: Path) -> None:
    _, _, values = _load_csv(dataset / fmt.ATTRIBUTE_FILE, header=1)
    _, _, splits = _load_csv(dataset / fmt.PARTITION_FILE, header=None)
    smiling = values[:, plan.ATTRIBUTES.index("Smiling")] == 1
    male = values[:, plan.ATTRIBUTES.index("Male")] == 1
    info = json.loads((dataset / syn.INFO_FILE).read_text())
    for split, name in enumerate(SPLITS):
        s, m = smiling[splits[:, 0] == split], male[splits[:, 0] == split]
        agree = np.mean(s == m)
        assert agree == pytest.approx(BIAS if name != "test" else 0.5, abs=1 / len(s))
        assert np.mean(m) == pytest.approx(0.5, abs=1 / len(s))
        assert np.mean(s) == pytest.approx(0.5, abs=1 / len(s))
        assert info["splits"][name]["count"] == len(s)
        assert info["splits"][name]["p_smiling_eq_male"] == pytest.approx(agree)
    test = splits[:, 0] == 2
    cells = [int(np.sum((smiling[test] == a) & (male[test] == b))) for a in (0, 1) for b in (0, 1)]
    assert cells == [N_TEST // 4] * 4


@pytest.mark.parametrize("bias", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_label_plan_bias_and_independence_at_scale(bias: float) -> None:
    n = 20_000
    splits, labels = plan.plan_labels(n, bias, seed=11)
    stats = plan.split_statistics(splits, labels)
    assert [stats[s]["count"] for s in SPLITS] == [14_000, 2_000, 4_000]
    for name in ("train", "valid"):
        assert stats[name]["p_smiling_eq_male"] == pytest.approx(bias, abs=1 / stats[name]["count"])
    assert list(stats["test"]["cells"].values()) == [1_000] * 4
    # The other attributes are fair coins, independent of Male.
    male = labels[:, plan.ATTRIBUTES.index("Male")]
    for attribute in ("Big_Nose", "Eyeglasses", "Wavy_Hair"):
        column = labels[:, plan.ATTRIBUTES.index(attribute)]
        assert abs(column.mean() - 0.5) < 0.02
        assert abs(column[male].mean() - column[~male].mean()) < 0.04


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


def test_output_is_byte_identical_across_runs_and_worker_counts(dataset: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    syn.generate(again, N, BIAS, SEED, workers=2)
    expected, actual = _tree(dataset), _tree(again)
    assert sorted(actual) == sorted(expected)
    assert [name for name in expected if actual[name] != expected[name]] == []


def test_another_seed_gives_other_images(dataset: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    syn.generate(other, syn.MIN_IMAGES, BIAS, SEED + 1, workers=1)
    name = f"{fmt.IMAGE_DIR}/000001.jpg"
    assert (other / name).read_bytes() != (dataset / name).read_bytes()


def test_same_arguments_reuse_the_dataset(dataset: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in dataset.glob("*.txt")}
    info = syn.generate(dataset, N, BIAS, SEED, workers=1)
    assert info == json.loads((dataset / syn.INFO_FILE).read_text())
    assert {p: p.stat().st_mtime_ns for p in dataset.glob("*.txt")} == before


def test_a_second_process_waits_for_the_first_and_reuses_its_dataset(tmp_path: Path, waits_on_lock) -> None:
    """Two runs generating one new data.root at once raced (one crashed removing the other's in-progress file, or
    was told the folder was not empty): the generator holds the folder's lock while it writes, so the second
    waits (here this test holds it, as the first would) and then finds the finished dataset or makes it."""
    out = tmp_path / "data"
    waited, info = waits_on_lock(syn.lock_path(out), lambda: syn.generate(out, syn.MIN_IMAGES, BIAS, SEED, workers=1))
    assert waited and info == json.loads((out / syn.INFO_FILE).read_text())
    assert not (out / syn.IN_PROGRESS_FILE).exists()
    assert syn.generate(out, syn.MIN_IMAGES, BIAS, SEED, workers=1) == info  # reused as it is


def test_interrupted_run_is_regenerated(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    out.mkdir()
    stamp = {"format_version": syn.FORMAT_VERSION,
             "args": {"num_images": N, "bias": BIAS, "seed": SEED, "size": [64, 64]}}
    (out / syn.IN_PROGRESS_FILE).write_text(json.dumps(stamp))
    (out / fmt.IMAGE_DIR).mkdir()
    (out / fmt.IMAGE_DIR / "000001.jpg").write_bytes(b"truncated")
    syn.generate(out, N, BIAS, SEED, workers=1)
    assert _tree(out) == _tree(dataset)


# ---------------------------------------------------------------------------------------------
# Counterfactual twins and region boxes
# ---------------------------------------------------------------------------------------------


def test_twins_exist_for_exactly_the_test_images(dataset: Path) -> None:
    _, index, splits = _load_csv(dataset / fmt.PARTITION_FILE, header=None)
    test_names = [name for name, split in zip(index, splits[:, 0]) if split == 2]
    lines = _lines(dataset / fmt.COUNTERFACTUAL_DIR / fmt.COUNTERFACTUAL_FILE)
    assert lines[0] == str(len(test_names)) and lines[1] == "image_id twin_file flipped_attribute"
    assert lines[2:] == [f"{name} img_align_celeba/{name} Male" for name in test_names]
    twins = sorted(p.name for p in (dataset / fmt.COUNTERFACTUAL_DIR / fmt.IMAGE_DIR).iterdir())
    assert twins == test_names


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=syn.JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


def test_images_and_twins_render_the_written_labels(dataset: Path) -> None:
    """Each image is its face drawn with its written labels; its twin the same face with Male negated."""
    labels = _table(dataset / fmt.ATTRIBUTE_FILE)
    for index in (0, 1, N_TRAIN, N - 2, N - 1):
        name = fmt.image_name(index)
        attributes = {a: v == 1 for a, v in zip(plan.ATTRIBUTES, labels[name])}
        face = render.sample_face(render.image_rng(SEED, index), (64, 64))
        assert (dataset / fmt.IMAGE_DIR / name).read_bytes() == _jpeg(render.render(face, attributes))
        if index >= N - N_TEST:
            twin = {**attributes, "Male": not attributes["Male"]}
            twin_file = dataset / fmt.COUNTERFACTUAL_DIR / fmt.IMAGE_DIR / name
            assert twin_file.read_bytes() == _jpeg(render.render(face, twin))


def test_twins_differ_only_in_the_male_region(dataset: Path) -> None:
    boxes = _table(dataset / fmt.REGIONS_FILE)
    male = syn.REGION_ATTRIBUTES.index("Male")
    index = _lines(dataset / fmt.COUNTERFACTUAL_DIR / fmt.COUNTERFACTUAL_FILE)[2:]
    names = [line.split()[0] for line in index]
    for name in names:
        with Image.open(dataset / fmt.IMAGE_DIR / name) as a, \
                Image.open(dataset / fmt.COUNTERFACTUAL_DIR / fmt.IMAGE_DIR / name) as b:
            diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max(axis=2)
        x1, y1, x2, y2 = boxes[name][4 * male: 4 * male + 4]
        inside = np.zeros(diff.shape, dtype=bool)
        inside[y1:y2, x1:x2] = True
        # JPEG codes 8x8 blocks on their own: blocks clear of the box decode to identical pixels.
        near = np.zeros(diff.shape, dtype=bool)
        near[max(0, y1 - 8): y2 + 8, max(0, x1 - 8): x2 + 8] = True
        assert diff[inside].mean() > 10, name  # the beard appears or disappears
        assert diff[~inside].mean() < 1.0, name
        assert diff[~near].max(initial=0) == 0, name


@pytest.mark.parametrize("size", [(64, 64), (178, 218)])
def test_flipping_an_attribute_changes_pixels_only_inside_its_box(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    for index in range(6):
        face = render.sample_face(render.image_rng(SEED, index), size)
        attributes = {a: bool(v) for a, v in zip(plan.ATTRIBUTES, rng.random(len(plan.ATTRIBUTES)) < 0.5)}
        image = render.render(face, attributes).astype(int)
        boxes = render.region_boxes(face)
        for attribute in plan.ATTRIBUTES:
            x1, y1, x2, y2 = boxes[attribute]
            assert 0 <= x1 < x2 <= size[0] and 0 <= y1 < y2 <= size[1]
            flipped = render.render(face, {**attributes, attribute: not attributes[attribute]}).astype(int)
            changed = np.abs(flipped - image).max(axis=2) > 0
            if attribute != "Smiling" or face.smile_depth > 0.25:  # the shallowest smiles change few pixels
                assert changed[y1:y2, x1:x2].sum() >= 4, (index, attribute)
            changed[y1:y2, x1:x2] = False
            assert not changed.any(), (index, attribute)


def test_faces_vary_in_the_nuisance_draws() -> None:
    faces = [render.sample_face(render.image_rng(SEED, i), (64, 64)) for i in range(20)]
    for field in ("cx", "cy", "rx", "skin", "hair", "background"):
        assert len({getattr(f, field) for f in faces}) > 10, field


def test_supersampling_keeps_an_integer_factor() -> None:
    for size in [(32, 32), (64, 64), (178, 218), (1024, 512)]:
        factor = render.supersampling_factor(size)
        assert factor >= 2 and min(size) * factor >= render.SUPERSAMPLED_MIN_SIDE


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bias": -0.1}, "--bias"),
        ({"bias": 1.5}, "--bias"),
        ({"bias": math.nan}, "--bias"),
        ({"num_images": syn.MIN_IMAGES - 1}, "--num-images"),
        ({"seed": -1}, "--seed"),
        ({"size": (16, 16)}, "--size"),
        ({"workers": 0}, "--workers"),
    ],
)
def test_bad_arguments_raise_user_error(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"out_dir": tmp_path / "out", "num_images": 100, "bias": 0.5, "seed": 0, **kwargs}
    with pytest.raises(UserError, match=message):
        syn.generate(**args)
    assert not (tmp_path / "out").exists()


def test_foreign_or_mismatched_output_folder_is_refused(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="holds a synthetic dataset made with"):
        syn.generate(dataset, N, 0.5, SEED, workers=1)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        syn.generate(foreign, N, BIAS, SEED, workers=1)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    "argv",
    [
        "--num-images 100 --bias 0.5 --seed 0",
        "--out {out} --num-images 100 --bias 2 --seed 0",
        "--out {out} --num-images lots --bias 0.5 --seed 0",
        "--out {out} --num-images 100 --bias 0.5 --seed 0 --size 64x",
        "--out {out} --num-images 100 --bias 0.5 --seed 0 --size big",
        "--out {out} --num-images 100 --bias 0.5 --seed 0 --size 8",
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        syn.main(argv.format(out=tmp_path / "out").split())
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_cli_generates_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    syn.main(["--out", str(out), "--num-images", "40", "--bias", "1", "--seed", "2", "--size", "40x48",
              "--workers", "1"])
    assert "P(Smiling == Male): train 1.000" in capsys.readouterr().out
    with Image.open(out / fmt.IMAGE_DIR / "000040.jpg") as image:
        assert image.size == (40, 48)
    info = json.loads((out / syn.INFO_FILE).read_text())
    assert info["args"] == {"num_images": 40, "bias": 1.0, "seed": 2, "size": [40, 48]}
    assert not (out / syn.IN_PROGRESS_FILE).exists()


# ---------------------------------------------------------------------------------------------
# The protected cue's strength
# ---------------------------------------------------------------------------------------------

# sha256 over (relative path, bytes) of every file of generate(out, 40, 0.9, 3, (32, 32), workers=1), taken
# before the beard-strength knob existed: the default must keep existing datasets byte-identical.
DEFAULT_DIGEST = "42a7f2ff8397d5c308b429123f860842f762cf0d6182945a02f669bbf90829c8"


def _digest(root: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, data in _tree(root).items():
        digest.update(name.encode())
        digest.update(data)
    return digest.hexdigest()


def test_default_cue_strengths_keep_datasets_byte_identical(tmp_path: Path) -> None:
    syn.generate(tmp_path / "default", 40, 0.9, 3, (32, 32), workers=1)
    syn.generate(tmp_path / "explicit", 40, 0.9, 3, (32, 32), workers=1, beard_strength=1.0, smile_floor=0.0)
    assert _digest(tmp_path / "default") == _digest(tmp_path / "explicit") == DEFAULT_DIGEST


def test_a_smile_floor_deepens_only_the_shallow_smiles_and_is_part_of_the_identity(tmp_path: Path) -> None:
    syn.generate(tmp_path / "floor", 40, 0.9, 3, (32, 32), workers=1, smile_floor=0.5)
    default, floored = _tree_of(tmp_path, "default"), _tree(tmp_path / "floor")
    info = json.loads((tmp_path / "floor" / "dataset_info.json").read_text())
    assert info["args"]["smile_floor"] == 0.5
    smiling = {line.split()[0] for line in (tmp_path / "floor" / "list_attr_celeba.txt").read_text().splitlines()[2:]
               if line.split()[1 + plan.ATTRIBUTES.index("Smiling")] == "1"}
    changed = {Path(name).name for name in floored if name.startswith("img_align_celeba/")
               and floored[name] != default[name]}
    assert changed and changed <= smiling  # only smiling faces are redrawn: U(0.5, 1) depths instead of U(0, 1)
    with pytest.raises(UserError, match=r"smile_floor=0.5 format_version=1, not .* smile_floor=0.0 format"):
        syn.generate(tmp_path / "floor", 40, 0.9, 3, (32, 32), workers=1)
    with pytest.raises(UserError, match=r"--smile-floor 1.0 is out of range"):
        syn.generate(tmp_path / "bad", 40, 0.9, 3, (32, 32), workers=1, smile_floor=1.0)


def _tree_of(tmp_path: Path, name: str) -> dict[str, bytes]:
    syn.generate(tmp_path / name, 40, 0.9, 3, (32, 32), workers=1)
    return _tree(tmp_path / name)


def test_a_fainter_beard_changes_only_men_and_only_inside_the_beard_box() -> None:
    face = render.sample_face(render.image_rng(0, 7), (64, 64))
    attributes = {**dict.fromkeys(plan.ATTRIBUTES, False), "Male": True}
    full, faint = render.render(face, attributes), render.render(face, attributes, beard_strength=0.2)
    woman = {**attributes, "Male": False}
    assert np.array_equal(render.render(face, woman), render.render(face, woman, beard_strength=0.2))
    x1, y1, x2, y2 = render.region_boxes(face)["Male"]
    changed = np.abs(full.astype(int) - faint.astype(int)).sum(2) > 0
    assert changed.any() and not changed[:y1].any() and not changed[y2:].any()
    # fainter means closer to the bare face: the beard's contrast against the woman's face shrinks
    bare = render.render(face, woman).astype(int)
    assert np.abs(faint.astype(int) - bare).sum() < 0.5 * np.abs(full.astype(int) - bare).sum()


def test_beard_strength_is_part_of_the_dataset_identity(tmp_path: Path) -> None:
    syn.generate(tmp_path / "d", 40, 0.9, 3, (32, 32), workers=1, beard_strength=0.5)
    assert json.loads((tmp_path / "d" / "dataset_info.json").read_text())["args"]["beard_strength"] == 0.5
    with pytest.raises(UserError, match=r"beard_strength=0.5 smile_floor=0.0 format_version=1, not .* beard_strength=1.0 "):
        syn.generate(tmp_path / "d", 40, 0.9, 3, (32, 32), workers=1)
    with pytest.raises(UserError, match=r"--beard-strength 0 is out of range"):
        syn.generate(tmp_path / "e", 40, 0.9, 3, (32, 32), workers=1, beard_strength=0)


# ---------------------------------------------------------------------------------------------
# Twins of the train split, on request (the oracle_counterfactual row)
# ---------------------------------------------------------------------------------------------


def test_train_twins_are_added_on_request_and_change_nothing_else(tmp_path: Path) -> None:
    syn.generate(tmp_path / "default", 40, 0.9, 3, (32, 32), workers=1)
    syn.main(["--out", str(tmp_path / "twins"), "--num-images", "40", "--bias", "0.9", "--seed", "3", "--size", "32",
              "--workers", "1", "--train-twins"])
    default, twins = _tree(tmp_path / "default"), _tree(tmp_path / "twins")
    assert {k for k in default if default[k] != twins[k]} == {"counterfactual/list_counterfactual.txt",
                                                              "dataset_info.json"}
    _, names, splits = _load_csv(tmp_path / "twins" / fmt.PARTITION_FILE, header=None)
    train = [name for name, split in zip(names, splits[:, 0]) if split == 0]
    assert set(twins) - set(default) == {f"counterfactual/img_align_celeba/{name}" for name in train}
    listed = [line.split()[0] for line in _lines(tmp_path / "twins" / fmt.COUNTERFACTUAL_DIR / fmt.COUNTERFACTUAL_FILE)[2:]]
    assert listed == [name for name, split in zip(names, splits[:, 0]) if split in (0, 2)]  # file order
    labels = _table(tmp_path / "twins" / fmt.ATTRIBUTE_FILE)
    for name in train[:3]:  # each train twin is its own face with Male negated
        index = names.index(name)
        attributes = {a: v == 1 for a, v in zip(plan.ATTRIBUTES, labels[name])}
        face = render.sample_face(render.image_rng(3, index), (32, 32))
        assert twins[f"counterfactual/img_align_celeba/{name}"] == _jpeg(
            render.render(face, {**attributes, "Male": not attributes["Male"]}))
    info = json.loads(twins["dataset_info.json"])
    assert info["args"]["train_twins"] is True and info["counterfactual"]["count"] == len(listed)
    with pytest.raises(UserError, match=r"train_twins=True .*, not .*train_twins=False"):
        syn.generate(tmp_path / "twins", 40, 0.9, 3, (32, 32), workers=1)
