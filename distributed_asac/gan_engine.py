"""The GAN comparator's engine: latent-space de-biasing (Ramaswamy, Kim & Russakovsky 2021, the paper's ref. [45]).
Its command line is `python -m distributed_asac.gan train` (gan.py).

1. A DCGAN generator G is trained on the train split, once per dataset and seed: it is cached in
   `<output_dir>/gan_cache/<key>/`, the key a hash of the config fields that its training reads (`gan_fields`),
   beside a grid of its samples. `gan.checkpoint` names a generator file to use instead (e.g. one trained
   elsewhere on real faces); it is read with safetensors, never unpickled.
2. Latents z ~ N(0, I) are labelled by the base model's target head M and protected head C on G(z), and a
   logistic regression per attribute gives a hyperplane in latent space: unit normal w, offset b, signed
   distance d(z) = w·z + b (positive on the side of label 1).
3. The complementary latent z' = z − (2·d_p(z) / sin θ)·u, with cos θ = w_p·w_t and u the unit component of w_p
   orthogonal to w_t, keeps the target distance and negates the protected one (`complementary_latents`).
4. Stage 3 (`finetune.mode=gan_augment`) trains M on each minibatch of real images plus as many generated
   images, pairs (G(z), G(z')) that both carry M's label of G(z). How good the pairs are (C's label flipped, M's
   label kept) is measured on the fitting latents and logged with the run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .errors import UserError
from .models import TwoHeadModel

if TYPE_CHECKING:  # config imports the row registry, which imports this module
    from .config import Config, GanConfig

CACHE_DIR = "gan_cache"  # under output_dir: one folder per generator key
GENERATOR = "generator.safetensors"
SAMPLES = "samples.png"  # 8 × 8 samples of the cached generator
PAIRS = "gan_pairs.png"  # logged with each gan_augment run: G(z) above G(z') for the first fitting latents
ENTRY = "gan.json"  # written last and atomically: a cache folder without it is unfinished and is rebuilt
FORMAT = "distributed_asac.gan.Generator/1"  # the metadata that marks a generator file of this project
# Data keys that do not change the train images: how they are loaded, and which labels a classifier reads.
_NOT_IMAGES = ("data.num_workers", "data.cache_dir", "data.target", "data.protected")
_FIX = "point gan.checkpoint at a file written by `python -m distributed_asac.gan train`, or unset it to train one"


class Generator(nn.Module):
    """DCGAN's generator: z [n, latent_dim] → images [n, 3, size, size] in [0, 1].

    A linear layer makes an [8·width, s, s] map, s = ceil(size / 16); four stride-2 transposed convolutions double
    its side to 16·s (channels 8w → 4w → 2w → w → 3); the output is resized to `size` where 16·s differs."""

    def __init__(self, latent_dim: int, width: int, size: int):
        super().__init__()
        self.latent_dim, self.width, self.size = latent_dim, width, size
        side = -(-size // 16)
        self.project = nn.Sequential(nn.Linear(latent_dim, 8 * width * side * side, bias=False),
                                     nn.Unflatten(1, (8 * width, side, side)), nn.BatchNorm2d(8 * width), nn.ReLU())
        layers: list[nn.Module] = []
        for channels in (8 * width, 4 * width, 2 * width):
            layers += [nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(channels // 2),
                       nn.ReLU()]
        self.upsample = nn.Sequential(*layers, nn.ConvTranspose2d(width, 3, 4, 2, 1), nn.Sigmoid())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        images = self.upsample(self.project(z))  # [n, 3, 16·s, 16·s]
        if images.shape[-1] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", antialias=True)
        return images


class Critic(nn.Module):
    """DCGAN's discriminator: images [n, 3, size, size] in [0, 1] → real-vs-generated logits [n]. Four stride-2
    convolutions (channels 3 → w → 2w → 4w → 8w, batch norm after all but the first), then a linear layer."""

    def __init__(self, width: int, size: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        for channels in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(channels, 2 * channels, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * channels),
                       nn.LeakyReLU(0.2)]
        side = size >> 4  # each stride-2 convolution (kernel 4, padding 1) halves the side, rounding down
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * width * side * side, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2 - 1).squeeze(1)


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialisation (Radford et al. 2016): convolution and linear weights from N(0, 0.02), batch-norm scales
    from N(1, 0.02), biases 0. With PyTorch's default initialisation the generator made noise for many more steps."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def save_generator(generator: Generator, path: Path) -> None:
    """The weights, with the architecture in the safetensors metadata; written atomically."""
    meta = {"format": FORMAT, "latent_dim": str(generator.latent_dim), "width": str(generator.width),
            "size": str(generator.size)}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_generator(path: str | Path) -> Generator:
    """The generator in `path` (its architecture from the file's metadata), in eval mode on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"gan.checkpoint {str(path)!r} not found; {_FIX}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # noqa: BLE001 - any failure of the parse is a damaged file, not our bug
        raise UserError(f"gan.checkpoint {str(path)!r} cannot be read ({err}): not a safetensors file; {_FIX}") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"gan.checkpoint {str(path)!r} holds no generator of this project (its metadata lacks "
                        f"format={FORMAT}); {_FIX}")
    try:
        generator = Generator(int(meta["latent_dim"]), int(meta["width"]), int(meta["size"]))
        generator.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"gan.checkpoint {str(path)!r} does not match the generator its metadata declares "
                        f"({reason}); {_FIX}") from None
    return generator.eval()


def gan_fields(cfg: Config) -> dict:
    """The config fields that define a trained generator: the train images (data.*, less how they are loaded and
    which labels are read), the GAN's settings (gan.*, less gan.checkpoint) and the seed."""
    return {key: value for key, value in cfg.flat().items()
            if (key.startswith("data.") and key not in _NOT_IMAGES) or (key.startswith("gan.") and key != "gan.checkpoint")
            or key == "seed"}


def gan_key(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(gan_fields(cfg), sort_keys=True).encode()).hexdigest()[:16]


def train_generator(train_set: Dataset, gan: GanConfig, seed: int, num_workers: int, device: torch.device,
                    tracker=None) -> tuple[Generator, list[dict]]:
    """DCGAN training (non-saturating loss, Adam with β = (0.5, 0.999)) on the images of `train_set`; returns the
    generator in eval mode and each epoch's mean losses. Its random numbers come from `seed` alone and the global
    random state is restored afterwards, so a run that trains the generator draws the same numbers after it as one
    that reads it from the cache."""
    size = int(train_set[0][0].shape[-1])
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        generator, critic = Generator(gan.latent_dim, gan.width, size).to(device), Critic(gan.width, size).to(device)
        dcgan_init(generator)
        dcgan_init(critic)
        opt_g = torch.optim.Adam(generator.parameters(), gan.lr, betas=(0.5, 0.999))
        opt_c = torch.optim.Adam(critic.parameters(), gan.lr, betas=(0.5, 0.999))
        loader = DataLoader(train_set, batch_size=gan.batch_size, shuffle=True, drop_last=True, num_workers=num_workers,
                            generator=torch.Generator().manual_seed(seed))
        if len(loader) == 0:
            raise UserError(f"config key 'gan.batch_size': {gan.batch_size} is larger than the train split "
                            f"({len(train_set)} images), which would give no GAN training step; set gan.batch_size <= "
                            f"{len(train_set)}")
        history = []
        bar = tqdm(total=gan.epochs * len(loader), desc="GAN training", unit="step", leave=False, disable=None)
        for epoch in range(gan.epochs):
            sums = torch.zeros(2, device=device)  # critic loss, generator loss
            for x, *_ in loader:
                x = x.to(device)
                fake = generator(torch.randn(len(x), gan.latent_dim, device=device))  # [b, 3, S, S]
                real_logits, fake_logits = critic(x), critic(fake.detach())
                c_loss = (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                          + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
                opt_c.zero_grad()
                c_loss.backward()
                opt_c.step()
                fooled = critic(fake)
                g_loss = F.binary_cross_entropy_with_logits(fooled, torch.ones_like(fooled))
                opt_g.zero_grad()
                g_loss.backward()
                opt_g.step()
                sums += torch.stack([c_loss.detach(), g_loss.detach()])
                bar.update()
            c_mean, g_mean = (sums / len(loader)).tolist()
            history.append({"epoch": epoch + 1, "critic_loss": c_mean, "generator_loss": g_mean})
            bar.set_postfix(critic=f"{c_mean:.3f}", generator=f"{g_mean:.3f}")
            tqdm.write(f"GAN epoch {epoch + 1}/{gan.epochs}: critic loss {c_mean:.3f}, generator loss {g_mean:.3f}")
            if tracker is not None:
                tracker.log_metrics({"gan/critic_loss": c_mean, "gan/generator_loss": g_mean}, step=epoch)
        bar.close()
    return generator.eval(), history


def save_grid(images: torch.Tensor, path: Path, rows: int) -> None:
    """images [n, 3, H, W] in [0, 1] as one PNG of `rows` rows."""
    from torchvision.utils import save_image

    save_image(images, str(path), nrow=-(-len(images) // rows), padding=1)


def generator_file(cfg: Config, train_set: Dataset, device: torch.device, tracker=None) -> Path:
    """`gan.checkpoint`, or the cached generator of this dataset and seed, trained first when the cache has none.
    A file lock per entry makes concurrent runs train it once; the cached sample grid is logged to `tracker`."""
    if cfg.gan.checkpoint:
        return Path(cfg.gan.checkpoint)
    folder = Path(cfg.output_dir) / CACHE_DIR / gan_key(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".lock")):
        if not (folder / ENTRY).is_file():
            start = time.perf_counter()
            generator, history = train_generator(train_set, cfg.gan, cfg.seed, cfg.data.num_workers, device, tracker)
            save_generator(generator, folder / GENERATOR)
            with torch.no_grad():
                save_grid(generator(torch.randn(64, cfg.gan.latent_dim, device=device,
                                                generator=torch.Generator(device).manual_seed(0))).cpu(),
                          folder / SAMPLES, rows=8)
            entry = {"key": gan_key(cfg), "fields": gan_fields(cfg), "history": history,
                     "seconds": time.perf_counter() - start}
            tmp = folder / f".{ENTRY}.tmp"
            tmp.write_text(json.dumps(entry, indent=2))
            os.replace(tmp, folder / ENTRY)
            tqdm.write(f"GAN: trained in {entry['seconds']:.0f} s, cached in {folder}")
    if tracker is not None:
        tracker.log_artifact(folder / SAMPLES)
    return folder / GENERATOR


@dataclass(frozen=True)
class Hyperplane:
    """{z : w·z + b = 0} with a unit normal w [L]: `distance` is the signed Euclidean distance, > 0 on label 1's side."""

    w: torch.Tensor
    b: float

    def distance(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.w + self.b  # [n]

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> "Hyperplane":
        return Hyperplane(self.w.to(device, dtype), self.b)


def fit_hyperplane(z: torch.Tensor, labels: torch.Tensor, l2: float = 1e-3) -> Hyperplane:
    """Logistic regression of labels [n] ∈ {0, 1} on latents z [n, L]: minimise mean log-loss + l2/2·|v|² over the
    logit z·v + c (L-BFGS, float64), then divide v and c by |v|: the same boundary, with Euclidean distances."""
    z, y = z.double(), labels.double()
    v = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    c = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([v, c], max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ v + c, y) + l2 / 2 * v.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    norm = v.detach().norm()
    return Hyperplane(v.detach() / norm, float(c.detach() / norm))


def complementary_latents(z: torch.Tensor, target: Hyperplane, protected: Hyperplane) -> torch.Tensor:
    """z' = z − (2·d_p(z) / sin θ)·u for z [n, L]: cos θ = w_p·w_t, u = (w_p − cos θ·w_t) / sin θ, the unit
    component of w_p orthogonal to w_t. Since w_t·u = 0 and w_p·u = sin θ, d_t(z') = d_t(z) and d_p(z') = −d_p(z)."""
    cos = protected.w @ target.w
    sin = (1 - cos.square()).clamp(min=0).sqrt()
    if sin < 1e-6:
        raise UserError(f"the target and protected hyperplanes in the generator's latent space are parallel "
                        f"(cos θ = {float(cos):.6f}), so no latent step flips the protected attribute alone; train "
                        "the generator longer (gan.epochs) or label more latents (gan.latents)")
    u = (protected.w - cos * target.w) / sin  # [L]
    return z - (2 * protected.distance(z) / sin).unsqueeze(1) * u


@torch.no_grad()
def render(generator: nn.Module, z: torch.Tensor, size: int) -> torch.Tensor:
    """Images [n, 3, size, size] of latents z [n, L]: the generator's output, resized where its side differs."""
    images = generator(z)
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
    return images


@dataclass
class Pairs:
    images: torch.Tensor  # [n, 3, S, S] G(z)
    twins: torch.Tensor  # [n, 3, S, S] G(z')
    labels: torch.Tensor  # [n] M's target label of G(z), given to both


@dataclass
class LatentPairs:
    """Counterfactual pairs from the generator and the two latent hyperplanes, labelled by the frozen base M."""

    generator: nn.Module  # a Generator in eval mode: an image depends on its latent alone, not on the batch
    target: Hyperplane
    protected: Hyperplane
    base: TwoHeadModel  # the model as stage 3 started, frozen
    image_size: int  # the training images' side

    @torch.no_grad()
    def sample(self, n: int, device: torch.device) -> Pairs:
        """n fresh pairs from the global random state (seeded per rank, so ranks draw different latents)."""
        z = torch.randn(n, self.generator.latent_dim, device=device)
        z_prime = complementary_latents(z, self.target, self.protected)
        images = render(self.generator, torch.cat([z, z_prime]), self.image_size)  # [2n, 3, S, S]
        return Pairs(images[:n], images[n:], self.base.target_logits(images[:n]).argmax(1))


@torch.no_grad()
def _labels(generator: nn.Module, base: TwoHeadModel, z: torch.Tensor, size: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """M's and C's labels [n] (on the CPU) of the images of latents z [n, L], in batches of 256."""
    labels = [tuple(head.argmax(1).cpu() for head in base(render(generator, chunk.to(device), size)))
              for chunk in z.split(256)]
    return torch.cat([t for t, _ in labels]), torch.cat([p for _, p in labels])


def fit_pairs(generator: nn.Module, base: TwoHeadModel, z: torch.Tensor, size: int,
              device: torch.device) -> tuple[LatentPairs, dict[str, float]]:
    """Fit the two hyperplanes to latents z [N, L] (CPU) labelled by the frozen `base` on their images, and say how
    good they are: each hyperplane's accuracy (%) on those latents, cos θ, and on the same latents the share of
    pairs whose protected label by C flipped, whose target label by M was kept, and both (`gan_pair_quality`)."""
    t, p = _labels(generator, base, z, size, device)  # [N] each
    for role, labels in (("target", t), ("protected", p)):
        if labels.min() == labels.max():
            raise UserError(f"the base gives all {len(labels)} generated faces the same {role} label "
                            f"({int(labels[0])}), so no hyperplane separates it in latent space; train the generator "
                            f"longer (gan.epochs) or look at its samples ({SAMPLES} in its cache folder)")
    target, protected = fit_hyperplane(z, t), fit_hyperplane(z, p)
    t_prime, p_prime = _labels(generator, base, complementary_latents(z.double(), target, protected).float(), size,
                               device)
    flipped, kept = p_prime != p, t_prime == t

    def share(hits: torch.Tensor) -> float:
        return float(hits.double().mean())

    summary = {"gan_target_hyperplane_ACC": 100 * share((target.distance(z.double()) > 0).long() == t),
               "gan_protected_hyperplane_ACC": 100 * share((protected.distance(z.double()) > 0).long() == p),
               "gan_cos_theta": float(protected.w @ target.w), "gan_pair_protected_flipped": share(flipped),
               "gan_pair_target_kept": share(kept), "gan_pair_quality": share(flipped & kept)}
    return LatentPairs(generator, target.to(device), protected.to(device), base, size), summary


def latent_pairs(cfg: Config, model: TwoHeadModel, train_set: Dataset, accelerator, tracker=None) -> tuple[LatentPairs, dict]:
    """The pairs of the gan_augment row: the generator (`generator_file`) and the hyperplanes fitted to
    `gan.latents` latents labelled by a frozen copy of `model` (the base as stage 3 starts), with `fit_pairs`'s
    numbers; the first pairs are logged as an image. The latents come from `cfg.seed` alone: every rank fits the
    same hyperplanes."""
    device, size = accelerator.device, int(train_set[0][0].shape[-1])
    with accelerator.main_process_first():  # the main process trains (or reads) the cached generator first
        path = generator_file(cfg, train_set, device, tracker)
    generator = load_generator(path).to(device)
    base = copy.deepcopy(model).requires_grad_(False).eval()
    z = torch.randn(cfg.gan.latents, generator.latent_dim, generator=torch.Generator().manual_seed(cfg.seed))
    pairs, summary = fit_pairs(generator, base, z, size, device)
    if accelerator.is_main_process and tracker is not None:
        tqdm.write(f"GAN pairs: C's label flipped on {summary['gan_pair_protected_flipped']:.0%}, M's kept on "
                   f"{summary['gan_pair_target_kept']:.0%}, both on {summary['gan_pair_quality']:.0%} "
                   f"(cos θ = {summary['gan_cos_theta']:.2f})")
        shown = z[:8].to(device)
        with tempfile.TemporaryDirectory() as folder:  # top row G(z), bottom row G(z')
            images = render(generator, torch.cat([shown, complementary_latents(shown, pairs.target, pairs.protected)]),
                            size)
            save_grid(images.cpu(), Path(folder) / PAIRS, rows=2)
            tracker.log_artifact(Path(folder) / PAIRS)
    return pairs, summary
