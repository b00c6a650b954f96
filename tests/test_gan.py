"""The GAN comparator (gan.py): the latent flip formula, hyperplanes and pairs on a toy latent space whose answers are
known, the generator's train / sample / cache path on a tiny generated dataset, and bad generator files."""

import json
import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file
from torch import nn

from distributed_asac import gan_engine as gan
from distributed_asac.gan import main as gan_main
from distributed_asac.config import load_config
from distributed_asac.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def test_complementary_latent_keeps_the_target_distance_and_negates_the_protected_one():
    g = torch.Generator().manual_seed(0)
    target = gan.Hyperplane(_unit(torch.randn(6, generator=g, dtype=torch.float64)), 0.3)
    protected = gan.Hyperplane(_unit(torch.randn(6, generator=g, dtype=torch.float64)), -0.7)
    z = torch.randn(200, 6, generator=g, dtype=torch.float64)
    z_prime = gan.complementary_latents(z, target, protected)
    assert torch.allclose(target.distance(z_prime), target.distance(z), atol=1e-12)
    assert torch.allclose(protected.distance(z_prime), -protected.distance(z), atol=1e-12)
    # The step is along the unit component u of w_p orthogonal to w_t, of length 2·|d_p| / sin θ.
    cos = float(protected.w @ target.w)
    step = z_prime - z
    assert torch.allclose(step @ target.w, torch.zeros(200, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(step.norm(dim=1), 2 * protected.distance(z).abs() / math.sqrt(1 - cos**2), atol=1e-12)


def test_a_hyperplane_at_right_angles_moves_along_the_protected_normal_alone():
    target = gan.Hyperplane(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), 0.0)
    protected = gan.Hyperplane(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), -0.5)
    z_prime = gan.complementary_latents(torch.tensor([[2.0, 1.5, 4.0]], dtype=torch.float64), target, protected)
    assert z_prime.tolist() == [[2.0, -0.5, 4.0]]  # d_p = 1.0 → −1.0: y goes from 1.5 to −0.5


def test_parallel_hyperplanes_are_one_clear_error():
    plane = gan.Hyperplane(torch.tensor([1.0, 0.0], dtype=torch.float64), 0.0)
    with pytest.raises(UserError, match=r"hyperplanes in the generator's latent space are parallel"):
        gan.complementary_latents(torch.zeros(1, 2, dtype=torch.float64), plane, plane)


def test_logistic_regression_finds_a_known_boundary():
    g = torch.Generator().manual_seed(1)
    truth = gan.Hyperplane(_unit(torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)), 0.4)
    z = torch.randn(2000, 4, generator=g, dtype=torch.float64)
    fitted = gan.fit_hyperplane(z, (truth.distance(z) > 0).long())
    assert float(fitted.w.norm()) == pytest.approx(1.0)
    assert float(fitted.w @ truth.w) > 0.995  # the same normal direction
    assert float(((fitted.distance(z) > 0) == (truth.distance(z) > 0)).double().mean()) > 0.99


class LinearGenerator(nn.Module):
    """A toy generator with a known latent geometry: image = z·A, [n, 3, 8, 8]."""

    latent_dim = 5

    def __init__(self, seed: int):
        super().__init__()
        self.a = torch.randn(5, 3 * 8 * 8, generator=torch.Generator().manual_seed(seed))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (z @ self.a).view(-1, 3, 8, 8)


class LinearBase(nn.Module):
    """Heads whose label-1 logit is linear in the pixels (the other is 0): with a linear generator, M's and C's
    decision boundaries are hyperplanes in latent space with normals A·v_t and A·v_p."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.v = torch.randn(2, 3 * 8 * 8, generator=g)  # target, protected
        self.c = torch.tensor([0.5, -1.0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = x.flatten(1) @ self.v.T + self.c  # [n, 2]
        zeros = torch.zeros_like(scores[:, 0])
        return torch.stack([zeros, scores[:, 0]], 1), torch.stack([zeros, scores[:, 1]], 1)

    def target_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)[0]


def test_pairs_flip_c_and_keep_m_where_the_latent_geometry_is_known():
    generator, base = LinearGenerator(0), LinearBase(1)
    z = torch.randn(3000, 5, generator=torch.Generator().manual_seed(2))
    pairs, summary = gan.fit_pairs(generator, base, z, 8, torch.device("cpu"))
    # The true boundaries: score_t(z) = z·(A v_t) + c_t, score_p likewise.
    normals = generator.a @ base.v.T  # [5, 2]
    cos_true = float(torch.nn.functional.cosine_similarity(normals[:, 0], normals[:, 1], dim=0))
    assert summary["gan_cos_theta"] == pytest.approx(cos_true, abs=0.02)
    assert summary["gan_target_hyperplane_ACC"] > 99 and summary["gan_protected_hyperplane_ACC"] > 99
    # Pair quality, counted by hand from the true scores of z and z'.
    z_prime = gan.complementary_latents(z.double(), *(gan.Hyperplane(p.w.double(), p.b)
                                                      for p in (pairs.target, pairs.protected))).float()
    before, after = z @ normals + base.c, z_prime @ normals + base.c  # [N, 2] true scores
    flipped = (before[:, 1] > 0) != (after[:, 1] > 0)
    kept = (before[:, 0] > 0) == (after[:, 0] > 0)
    assert summary["gan_pair_protected_flipped"] == pytest.approx(float(flipped.double().mean()), abs=1e-3)
    assert summary["gan_pair_target_kept"] == pytest.approx(float(kept.double().mean()), abs=1e-3)
    assert summary["gan_pair_quality"] == pytest.approx(float((flipped & kept).double().mean()), abs=1e-3)
    assert summary["gan_pair_quality"] > 0.97  # an exact geometry leaves only latents at the boundaries
    # Sampled pairs: G(z) and G(z') with M's label of G(z) for both.
    torch.manual_seed(0)
    sampled = pairs.sample(64, torch.device("cpu"))
    assert sampled.images.shape == sampled.twins.shape == (64, 3, 8, 8)
    assert torch.equal(sampled.labels, base.target_logits(sampled.images).argmax(1))
    assert float((base(sampled.twins)[1].argmax(1) != base(sampled.images)[1].argmax(1)).double().mean()) > 0.9


def test_a_base_that_labels_every_face_alike_is_one_clear_error():
    base = LinearBase(1)
    base.c = torch.tensor([1e6, 0.0])  # M says 1 for every image
    with pytest.raises(UserError, match=r"the same target label \(1\).*gan\.epochs"):
        gan.fit_pairs(LinearGenerator(0), base, torch.randn(100, 5), 8, torch.device("cpu"))


def _tiny(tmp_path, *overrides):
    return [f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'runs'}", "data.image_size=32",
            "data.synthetic_num_images=120", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "experiment=gan",
            "gan.epochs=2", "gan.batch_size=16", "gan.width=4", "gan.latent_dim=8", *overrides]


def test_gan_trains_once_per_dataset_and_seed_samples_and_logs(tmp_path, capsys):
    gan_main(["train", *_tiny(tmp_path)])
    path = capsys.readouterr().out.strip().splitlines()[-1]
    cfg = load_config(None, _tiny(tmp_path))
    folder = tmp_path / "runs" / gan.CACHE_DIR / gan.gan_key(cfg)
    assert path == str(folder / gan.GENERATOR)
    entry = json.loads((folder / gan.ENTRY).read_text())
    assert entry["key"] == gan.gan_key(cfg) and [h["epoch"] for h in entry["history"]] == [1, 2]
    assert all(math.isfinite(h["critic_loss"]) and math.isfinite(h["generator_loss"]) for h in entry["history"])
    from PIL import Image

    with Image.open(folder / gan.SAMPLES) as grid:  # 8 × 8 samples of 32 px, 1 px apart
        assert grid.size == (8 * 33 + 1, 8 * 33 + 1)
    generator = gan.load_generator(path)
    assert (generator.latent_dim, generator.width, generator.size) == (8, 4, 32)
    images = gan.render(generator, torch.randn(5, 8), 48)
    assert images.shape == (5, 3, 48, 48) and 0 <= float(images.min()) and float(images.max()) <= 1
    # The sample grid and the losses are in MLflow.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("gan").experiment_id])
    assert run.data.tags["stage"] == "gan" and "gan/critic_loss" in run.data.metrics
    assert gan.SAMPLES in {a.path for a in client.list_artifacts(run.info.run_id)}
    # A second call reuses the entry: nothing is trained or rewritten.
    stamp = (folder / gan.GENERATOR).stat().st_mtime_ns
    (tmp_path / "tiny.yaml").write_text("experiment: gan\n")
    gan_main(["train", "--config", str(tmp_path / "tiny.yaml"), *_tiny(tmp_path)])  # as the README writes it
    assert capsys.readouterr().out.strip().splitlines()[-1] == path
    assert (folder / gan.GENERATOR).stat().st_mtime_ns == stamp


def test_the_cache_key_follows_what_training_reads():
    def key(*overrides):
        return gan.gan_key(load_config(None, list(overrides)))

    assert key() == key("data.num_workers=2") == key("data.target=Big_Nose") == key("finetune.lr=0.1")
    assert key() == key("gan.checkpoint=/some/file.safetensors")  # a given file is not the cache's
    assert len({key(), key("seed=1"), key("data.synthetic_bias=0.5"), key("gan.epochs=3"), key("data.image_size=64")}) == 5


def test_bad_generator_files_are_one_clear_line(tmp_path, capsys):
    with pytest.raises(UserError, match=r"gan\.checkpoint '.*missing\.safetensors' not found"):
        gan.load_generator(tmp_path / "missing.safetensors")
    (tmp_path / "text.safetensors").write_text("not a tensor file\n")
    with pytest.raises(UserError, match=r"cannot be read .*not a safetensors file"):
        gan.load_generator(tmp_path / "text.safetensors")
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "classifier.safetensors"))  # no generator metadata
    with pytest.raises(UserError, match=r"holds no generator of this project"):
        gan.load_generator(tmp_path / "classifier.safetensors")
    generator = gan.Generator(8, 4, 32)
    meta = {"format": gan.FORMAT, "latent_dim": "16", "width": "4", "size": "32"}  # declares another latent size
    save_file({k: v.contiguous() for k, v in generator.state_dict().items()}, str(tmp_path / "other.safetensors"),
              metadata=meta)
    with pytest.raises(UserError, match=r"does not match the generator its metadata declares"):
        gan.load_generator(tmp_path / "other.safetensors")
    with pytest.raises(SystemExit) as stopped:
        gan_main(["train", f"gan.checkpoint={tmp_path / 'other.safetensors'}"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.startswith("error: gan.checkpoint is set")


def test_gan_augment_trains_on_the_real_images_plus_labelled_pairs():
    from distributed_asac.diagnostics import Diagnostics
    from distributed_asac.rows import MODES, StepContext

    generator, base = LinearGenerator(0), LinearBase(1)
    made = gan.fit_pairs(generator, base, torch.randn(500, 5, generator=torch.Generator().manual_seed(3)), 8,
                         torch.device("cpu"))
    mode = MODES.get("gan_augment")
    assert mode.prepare is gan.latent_pairs  # stage 3 puts its pairs in ctx.prepared, its numbers in the summary
    x, y = torch.full((6, 3, 8, 8), 1e3), torch.zeros(6, dtype=torch.long)  # k = 6 real images, marked by value
    ctx = StepContext(None, [0.0, 0.001, 0.01], None, None, None, torch.Generator().manual_seed(0),
                      Diagnostics(3, torch.device("cpu")), prepared=made[0])
    torch.manual_seed(0)
    chunks = mode.make_chunks(ctx, x, y, torch.zeros(6, dtype=torch.long))
    images, labels = torch.cat([c.images for c in chunks]), torch.cat([c.labels for c in chunks])
    assert len(chunks) == 3 and len(images) == 6 + 2 * 3  # k real images and k/2 pairs
    real = images.flatten(1).eq(1e3).all(1)
    assert int(real.sum()) == 6 and not labels[real].any()
    fake = images[~real]
    assert torch.equal(labels[~real], base.target_logits(fake).argmax(1))  # M's label, kept across each pair
    assert int(base(fake)[1].argmax(1).sum()) == 3  # each pair holds one face of either protected label


def test_a_missing_generator_checkpoint_stops_the_row_before_training(tmp_path):
    from distributed_asac.rows import MODES

    cfg = load_config(None, [f"gan.checkpoint={tmp_path / 'nowhere.safetensors'}"])
    with pytest.raises(UserError, match=r"gan\.checkpoint '.*nowhere\.safetensors' not found"):
        MODES.get("gan_augment").check(cfg)


class MixingGenerator(nn.Module):
    """Latents → sharpened convex mixtures of four real faces, one per (target, protected) cell: most latents draw
    one face nearly whole, so the base's labels of the images vary however briefly the base was trained. It stands
    in for a trained GAN, which on the smoke data would take minutes to learn faces."""

    latent_dim = 8

    def __init__(self, faces: torch.Tensor):
        super().__init__()
        self.faces = faces  # [4, 3, S, S]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nk,kchw->nchw", torch.softmax(4 * z[:, :4], 1), self.faces.to(z.device))


@pytest.mark.slow
def test_the_gan_and_oracle_rows_run_end_to_end(tmp_path, monkeypatch):
    from distributed_asac import pipeline
    from distributed_asac.data.datasets import generate_synthetic
    from distributed_asac.data.celeba import CelebA
    from distributed_asac.demo import row_variants

    cfg = load_config(REPO / "configs" / "smoke.yaml", [
        f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "data.synthetic_train_twins=true",
        f"gan.checkpoint={tmp_path / 'generator.safetensors'}"])
    generate_synthetic(cfg.data)
    train = CelebA(cfg.data.root, "train", "Smiling", "Male", cfg.data.image_size)
    cells = (train.targets * 2 + train.protected_labels).tolist()
    faces = torch.stack([train[cells.index(c)][0] for c in range(4)])
    monkeypatch.setattr(gan, "load_generator", lambda path: MixingGenerator(faces))  # stage-3 start
    monkeypatch.setattr("distributed_asac.rows.load_generator", lambda path: None)  # the check before training
    out = pipeline.run(cfg, variants=row_variants("oracle_counterfactual,gan_augment,plain"))
    rows = [line.split(" | ")[1] for line in (out.run_dir / "table.md").read_text().splitlines()[2:]]
    assert rows == ["base", "plain", "gan_augment", "oracle_counterfactual"]  # the paper's order, the bound last
    report = out.results["gan_augment"]
    flipped, kept, quality = (report[f"gan_pair_{k}"] for k in ("protected_flipped", "target_kept", "quality"))
    assert 0 <= quality <= min(flipped, kept) <= 1
    assert json.loads((out.run_dir / "gan_augment" / "results.json").read_text())["gan_augment"]["gan_pair_quality"] == quality
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("smoke").experiment_id],
                                "attributes.run_name = 'gan_augment'")
    assert gan.PAIRS in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert run.data.metrics["finetune/gan_pair_quality"] == pytest.approx(quality)
