"""The config's schema: one dataclass per section, every field typed, its default set, its meaning in its trailing
comment (which --help prints), and the valid names of each key that takes one of a fixed set.

Method hyper-parameters default to docs/method.md (α = 0.5, E = {0, 0.001, 0.01}, FGSM, ascending order,
frozen attack model, Adam 1e-3, clipping at 1.0). Sizes (dataset, backbone, epochs, image size) default
to the CPU demo on the generated dataset, so that a run with no flags finishes in minutes; the CelebA and
LFW presets in `configs/` set the paper's sizes (ResNet-18, 50 base epochs, 10 fine-tuning epochs).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from .. import mitigations  # noqa: F401  registers the rows beside ASAC in rows.MODES (after rows.py's own)
from ..attacks import ATTACKS
from ..curriculum import ORDERS
from ..data.datasets import DATASETS
from ..data.faces import BAD_IMAGE_POLICIES
from ..data.synthetic_labels import ATTRIBUTES as PRETRAIN_ATTRIBUTES
from ..models import BACKBONES, PROTECTED_CLASSIFIERS
from ..rows import MODES


@dataclass
class DataConfig:
    name: str = "synthetic"  # which dataset (synthetic: generated on first use)
    root: str = "data/synthetic"  # dataset folder (generated here when name == synthetic)
    target: str = "Smiling"  # attribute M predicts
    protected: str = "Male"  # attribute C predicts and ASACs flip
    image_size: int = 48  # square side in pixels after center-crop and resize (the CPU demo's; presets: 128)
    num_workers: int = 0  # DataLoader workers per process
    cache_dir: Optional[str] = None  # a preprocessed uint8 cache (built once, memory-mapped); None: decode JPEGs
    on_bad_image: str = "error"  # error: name the corrupt file and stop; skip: leave it out, count it, log it
    split_file: Optional[str] = None  # LFW: person-disjoint split file; None: <output_dir>/<experiment>/lfw_split.json
    split_seed: int = 0  # LFW: seed of a newly drawn split
    synthetic_num_images: int = 6000  # generated dataset only
    synthetic_bias: float = 0.9  # P(target == protected) in train/valid of the generated dataset
    synthetic_seed: int = 0  # generated dataset only: its random seed (>= 0)
    synthetic_beard_strength: float = 1.0  # contrast of the protected cue (the beard) in (0, 1]; 1: full, dark
    synthetic_smile_floor: float = 0.0  # strength of the target cue: smile depths drawn from U(floor, 1) of the full depth, in [0, 1)
    synthetic_train_twins: bool = False  # also write each train image's Male-flipped twin (the oracle_counterfactual row)


@dataclass
class ModelConfig:
    backbone: str = "small_cnn"  # the backbone θ (models.BACKBONES)
    weights: Optional[str] = None  # None: random init; "imagenet": torchvision's file in the torch cache; or a path: a torchvision state dict, or the backbone.safetensors stage 0 writes (any backbone, its own name checked)
    protected_classifier: str = "probe"  # probe: C is a linear head on M's backbone (the paper); independent: C has its own backbone, trained in stage 2


@dataclass
class StageConfig:
    """Optimisation of one training stage (Adam, docs/method.md Defaults)."""

    epochs: int = 10  # passes over the train split
    batch_size: int = 64  # images per optimizer step over all processes (global; each of W ranks takes batch_size / W)
    lr: float = 1e-3  # Adam learning rate
    backbone_lr_scale: float = 1.0  # the learning rate of the backbone the stage trains, as a share of lr (its heads keep lr): stage 1's θ, stage 2's C's own backbone (model.protected_classifier=independent; a probe has none); 0: that backbone frozen, batch-norm statistics too; >= 0


@dataclass
class PretrainConfig:
    """Stage 0 (pretrain.py): θ trained on several attributes of its own generated face set, drawn balanced, so that
    stage 1 starts from generic face features, as a CelebA user's ImageNet-pretrained backbone does."""

    epochs: int = 0  # passes over its train split; 0: no stage 0 (stage 1 starts from model.weights)
    attributes: list[str] = field(default_factory=lambda: list(PRETRAIN_ATTRIBUTES))  # the generated attributes θ learns, one logistic output each (valid: Big_Nose, Eyeglasses, Male, Smiling, Wavy_Hair); include data.protected for a backbone that keeps it
    num_images: int = 6000  # images of its generated set (70/10/20 train/valid/test); every attribute a fair coin, independent of the others (P(Smiling == Male) = 0.5 in every split)
    seed: int = 1  # the seed of its generated set and of its training, not `seed`: every seed of a study starts from one pretrained θ, as from one ImageNet file; differs from data.synthetic_seed, so its faces are not the run's
    root: str = "data/pretrain"  # folder of its generated set (made on first use, at data.image_size, data.synthetic_smile_floor and data.synthetic_beard_strength)
    batch_size: int = 64  # images per optimizer step over all processes (global, as in stages 1–3)
    lr: float = 1e-3  # Adam learning rate


@dataclass
class FinetuneConfig:
    mode: str = "asac"  # stage-3 training (rows.MODES): ASAC, a comparator, or none (base)
    epochs: int = 2  # passes over the train split
    batch_size: int = 64  # images per minibatch over all processes (global; each of W ranks makes the ASACs of k = batch_size / W)
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 0.0  # Adam's ℓ2 penalty on θ and ρ (GroupDRO's "strong ℓ2" is a large one); >= 0
    alpha: float = 0.5  # weight of the clean term in α·CE(x) + (1 − α)·CE(x')
    eps: list[float] = field(default_factory=lambda: [0.001, 0.01])  # E = {0} ∪ eps (eps_mode fixed)
    eps_mode: str = "fixed"  # fixed: use eps; calibrated: one ε per attack_success_targets, chosen before stage 3
    attack_success_targets: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])  # shares of ASACs that fool C
    calibration_images: int = 512  # training images (a fixed sample) on which calibrated ε are chosen
    attack: str = "fgsm"  # how ASACs are made (fgsm: one gradient for all ε; pgd: finetune.pgd_steps)
    pgd_steps: int = 10  # PGD iterations (attack pgd and the adv_augment comparator)
    order: str = "ascending"  # curriculum order of the difficulty scores (random: no curriculum)
    attack_model: str = "frozen"  # frozen: snapshot of C at stage-3 start; live: current θ
    adv_eps: float = 0.01  # the single PGD ε of the adv_augment comparator
    channels_last: bool = True  # stage-3 images in NHWC layout: same math, faster on CPU (BENCHMARKS.md)
    batchnorm: str = "train"  # train: each chunk is a train-mode batch (the paper); frozen: keep the base's statistics
    select: str = "last"  # which epoch is kept (selection.py): last (the paper), avg_valid, worst_group_valid or balanced_valid
    steps: str = "per_chunk"  # per_chunk: one optimizer step per chunk of k entries, |E| per minibatch (the default); per_minibatch: one step on all of a minibatch's entries, every row alike
    fixed_chunks: bool = False  # true: each chunk's forward holds all k clean images and all its entries (fixed shape: no host read per minibatch, CUDA-graph-able), so batch-norm statistics differ from the default's exact chunk (BENCHMARKS.md, section 9)
    compile: bool = False  # torch.compile the model of the training steps (forward and backward; attacks and scoring stay eager): off until measured on a GPU (docs/performance.md)


@dataclass
class GanConfig:
    """The generator of the gan_augment comparator (gan.py): a DCGAN trained on the train split, cached."""

    checkpoint: Optional[str] = None  # a generator .safetensors written by `python -m distributed_asac.gan train`; None: train one (cached)
    latent_dim: int = 64  # size of the latent z ~ N(0, I)
    width: int = 16  # channels of the generator's last hidden layer (×2 per layer toward z) and the critic's first
    epochs: int = 10  # passes of GAN training over the train split
    batch_size: int = 16  # images per GAN training step (small: more steps per pass, which the GAN needed)
    lr: float = 2e-4  # Adam learning rate of both networks (β = 0.5, 0.999: DCGAN's)
    latents: int = 4096  # sampled latents, labelled by the base's two heads, that fit the latent hyperplanes


@dataclass
class GroupDroConfig:
    """The group_dro row (Sagawa et al. 2020, Algorithm 1): online weights q over the (target, protected) groups."""

    eta: float = 0.01  # η, step size of the group weights q_g ← q_g·exp(η·loss_g) (the paper's code: 0.01); > 0


@dataclass
class JttConfig:
    """The jtt row (Liu et al. 2021): the train mistakes of an ERM model stopped after T epochs are drawn λ times as often."""

    upweight: float = 50.0  # λ, how many times as often an image the identification model gets wrong is drawn (the paper's CelebA λ_up); >= 1
    identification_epochs: int = 1  # T, epochs of the identification model: stage 1's training from stage 1's initialisation, stopped after T (the paper's CelebA T); >= 1
    final: str = "retrain"  # where the final M starts: retrain (the paper): θ and ρ from stage 1's initialisation, trained finetune.epochs epochs on the draws; finetune: the base, fine-tuned on them


@dataclass
class DfrConfig:
    """The dfr row (Kirichenko et al. 2023): the target head refit, backbone frozen, on a group-balanced subset of valid."""

    c_grid: Optional[list[float]] = None  # inverse ℓ1 strengths C tried, the best by worst-group accuracy on half of valid; null: the DFR code's grid for the dataset (data.name celeba: its CelebA grid [3 … 0.003]; otherwise its WaterBirds grid [1 … 0.01])
    retrains: int = 20  # logistic regressions on fresh balanced draws of valid, their weights averaged (the DFR code's 20)


@dataclass
class AnalysisConfig:
    """Per-model analysis on the first test images (analysis.py); 0 images turns a part off."""

    robustness_eps: list[float] = field(default_factory=lambda: [0.005, 0.01, 0.02, 0.05])  # ε of the robustness curve; 0 is added
    robustness_images: int = 256  # test images of the robustness curve
    ig_images: int = 32  # test images explained with Integrated Gradients
    ig_steps: int = 32  # Integrated Gradients path steps


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    enabled: bool = True  # false: no MLflow logging at all
    lock_wait_s: float = 60.0  # how long a write waits for a store another process keeps locked, then the run stops


@dataclass
class RegistryConfig:
    """The MLflow Model Registry: each row's chosen model registered as a version (docs/mlflow.md)."""

    enabled: bool = True  # false: register nothing (each finished model is still an MLflow Model of its run)
    name: str = "{experiment}-{row}"  # the registered model of a row: {experiment} and {row} are filled in
    uri: Optional[str] = None  # the registry's store; None: $MLFLOW_REGISTRY_URI, else the tracking store


@dataclass
class Config:
    experiment: str = "demo"  # MLflow experiment and run-folder name
    seed: int = 0  # the seed of one run (stages 1–3): python, numpy and torch (rank r uses seed + r); >= 0
    seeds: Optional[list[int]] = None  # the comparison (python -m distributed_asac.demo) runs once per seed; None: [seed]
    output_dir: str = "runs"  # run folders go to <output_dir>/<experiment>/<timestamp>
    base_checkpoint: Optional[str] = None  # a folder written by stages 1–2; None: train them first
    stage1_checkpoint: Optional[str] = None  # a base/ folder written by stage 1: stages 0–1 are not run, its M is loaded and stage 2 trains C on it (how a sweep shares one M between probe kinds); None: train stage 1
    resume: Optional[str] = None  # "latest" (newest unfinished run of the experiment) or a run folder: continue it
    grad_clip: float = 1.0  # max gradient norm of every step (> 0)
    sync_batchnorm: bool = True  # batch norm in training over the global batch (all ranks), not each rank's share
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam β1, β2
    adam_eps: float = 1e-8  # Adam ε
    data: DataConfig = field(default_factory=DataConfig)  # the dataset and its loading
    model: ModelConfig = field(default_factory=ModelConfig)  # the shared backbone θ
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # stage 0 (optional): θ pretrained on generated attributes, drawn balanced
    base: StageConfig = field(default_factory=lambda: StageConfig(epochs=8))  # stage 1: M (θ, ρ) on the target
    probe: StageConfig = field(default_factory=lambda: StageConfig(epochs=3))  # stage 2: C (φ) on the protected attribute, θ frozen
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # stage 3: ASAC fine-tuning or a comparator
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)  # robustness curve and Integrated Gradients
    gan: GanConfig = field(default_factory=GanConfig)  # the generator of the gan_augment row
    group_dro: GroupDroConfig = field(default_factory=GroupDroConfig)  # the group_dro row's group weights
    jtt: JttConfig = field(default_factory=JttConfig)  # the jtt row's identification model and upweighting of its mistakes
    dfr: DfrConfig = field(default_factory=DfrConfig)  # the dfr row's last-layer retraining
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow
    registry: RegistryConfig = field(default_factory=RegistryConfig)  # the MLflow Model Registry

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """{'finetune.alpha': 0.5, ...}: what MLflow logs as params."""
        return flatten(self.to_dict())


ATTACK_MODELS = ("frozen", "live")
BATCHNORM_MODES = ("train", "frozen")
SELECTION_RULES = ("last", "avg_valid", "worst_group_valid", "balanced_valid")  # selection.py
STEP_RULES = ("per_chunk", "per_minibatch")
EPS_MODES = ("fixed", "calibrated")
# Keys whose value is a path: a leading `~` there is the home folder, as a shell would read it (`resume` and
# `model.weights` also take a word, "latest" and "imagenet", which no `~` starts).
PATH_KEYS = ("output_dir", "base_checkpoint", "stage1_checkpoint", "resume", "data.root", "data.cache_dir",
             "data.split_file", "model.weights", "gan.checkpoint", "pretrain.root")
JTT_FINALS = ("retrain", "finetune")  # where jtt's final model starts (mitigations/jtt.py)


def choices() -> dict[str, list[str]]:
    """The valid names of every key that takes one of a fixed set of names (validation and --help)."""
    return {"data.name": DATASETS.names(), "model.backbone": BACKBONES.names(), "finetune.attack": ATTACKS.names(),
            "finetune.order": ORDERS.names(), "finetune.mode": MODES.names(),
            "finetune.attack_model": list(ATTACK_MODELS), "data.on_bad_image": list(BAD_IMAGE_POLICIES),
            "finetune.batchnorm": list(BATCHNORM_MODES), "finetune.select": list(SELECTION_RULES),
            "finetune.eps_mode": list(EPS_MODES), "finetune.steps": list(STEP_RULES),
            "model.protected_classifier": list(PROTECTED_CLASSIFIERS), "jtt.final": list(JTT_FINALS)}


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'finetune': {'alpha': 0.5}} → {'finetune.alpha': 0.5}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def all_keys(obj: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config (sections left out): what an unknown key is matched against."""
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def get_key(cfg: Config, key: str) -> Any:
    """The value of a dotted key, e.g. get_key(cfg, 'finetune.alpha')."""
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj

