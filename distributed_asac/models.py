"""One backbone θ with two linear heads: ρ (target, M = M(θ, ρ)) and φ (protected, C = C(θ, φ)).

C is a linear probe on M's backbone (the paper's words, the default). `model.protected_classifier: independent`
gives C a backbone of its own instead (a second copy of the architecture, trained with φ in stage 2): the variant
in which C's input gradient owes nothing to M's features.

Inputs are pixel-space images in [0, 1]; normalisation is the model's first layer, so attacks and ε live in
pixel space (docs/method.md, Models). Backbones sit in a registry: adding one is one decorated function that
returns (feature extractor, feature dimension, normalisation mean, normalisation std).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torchvision
from torch import nn

from .errors import UserError
from .registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BackboneFactory = Callable[[Optional[str]], tuple[nn.Module, int, tuple, tuple]]
BACKBONES: Registry[BackboneFactory] = Registry("backbone")


class TwoHeadModel(nn.Module):
    """x [B, 3, H, W] in [0, 1] → (target logits [B, 2], protected logits [B, 2])."""

    def __init__(self, backbone: nn.Module, feature_dim: int, mean: tuple, std: tuple):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.backbone = backbone
        self.target_head = nn.Linear(feature_dim, 2)  # ρ
        self.protected_head = nn.Linear(feature_dim, 2)  # φ
        self.protected_backbone: Optional[nn.Module] = None  # None: C reads θ's features; else C's own backbone

    def forward(self, x: torch.Tensor, protected: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`protected=False` may skip C where that saves work (its own backbone): training M never reads it."""
        pixels = (x - self.mean) / self.std
        features = self.backbone(pixels)  # [B, feature_dim]
        if self.protected_backbone is None:  # the probe costs one small matmul: always computed
            return self.target_head(features), self.protected_head(features)
        return self.target_head(features), self.protected_head(self.protected_backbone(pixels)) if protected else None

    def target_logits(self, x: torch.Tensor) -> torch.Tensor:
        """M(θ, ρ)(x)."""
        return self(x, protected=False)[0]

    def protected_logits(self, x: torch.Tensor) -> torch.Tensor:
        """C(θ, φ)(x)."""
        return self(x)[1]


PROTECTED_CLASSIFIERS = ("probe", "independent")


def create_model(backbone: str, weights: Optional[str] = None, protected_classifier: str = "probe") -> TwoHeadModel:
    """A `backbone` two-head model; `protected_classifier: independent` gives C its own copy of the backbone
    (with the same starting weights)."""
    features, dim, mean, std = BACKBONES.get(backbone)(weights)
    model = TwoHeadModel(features, dim, mean, std)
    if protected_classifier == "independent":
        # Drawn off the seeded stream: M's initialisation and every later draw (data order, stage 1) stay those of
        # the default model, so the variant's base M is the default's base M and rows pair with it exactly.
        with torch.random.fork_rng(devices=[]):
            model.protected_backbone = BACKBONES.get(backbone)(weights)[0]
    return model


def protected_classifier(model: TwoHeadModel) -> str:
    """The `model.protected_classifier` that built `model`."""
    return "probe" if model.protected_backbone is None else "independent"


def set_trainable(model: nn.Module, stage: str) -> None:
    """Which parameters a stage trains: `base` and `finetune` train θ and ρ; `probe` trains φ only (and C's own
    backbone, when it has one).

    Frozen parameters get requires_grad=False, so DDP and DeepSpeed skip them instead of waiting for
    gradients that never come. Every gradient is cleared: the last step of the stage before leaves its parameters'
    gradients in place, which the gradient clipping of this stage would count (a stage of a resumed run, or one
    started from a checkpoint, never saw them).
    """
    if stage not in ("base", "probe", "finetune"):
        raise ValueError(f"unknown stage {stage!r}")
    train_probe_head = stage == "probe"
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(("protected_head.", "protected_backbone.")) == train_probe_head
        param.grad = None


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Attacks and scoring run in eval mode (batch-norm statistics untouched), then the mode is restored."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _imagenet_file(name: str) -> Path:
    """torchvision's ImageNet weights of `name` in the local torch cache; never downloaded at run time."""
    url = torchvision.models.get_model_weights(name).IMAGENET1K_V1.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if not path.is_file():
        raise UserError(
            f"model.weights=imagenet needs {path.name} in {path.parent} (nothing is downloaded at run time): "
            f"fetch {url} on a connected machine and copy it there, or set model.weights to a local file"
        )
    return path


def _load_local_weights(model: nn.Module, weights: Optional[str], name: str) -> None:
    """Load a torchvision state dict from a local file into `model` before its classifier is replaced."""
    if weights is None:
        return
    path = _imagenet_file(name) if weights == "imagenet" else Path(weights)
    if not path.is_file():
        raise UserError(f"model.weights file {weights!r} not found (give a local torchvision state dict for {name})")
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged file fails in any of the parser's many ways (KeyError,
        state = err  # IndexError, UnpicklingError, ...); only the parse is inside, so our own bugs still raise
    if not isinstance(state, dict):  # damaged, not a torch or safetensors file, or a tensor / model object
        reason = (str(state).strip().splitlines() or [type(state).__name__])[0][:200]
        raise UserError(f"model.weights {weights!r} cannot be read as a state dict ({reason}); give a torchvision "
                        f"{name} state dict (.pth or .safetensors)")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # missing, unexpected or wrongly shaped keys
        raise UserError(
            f"model.weights {weights!r} does not match {name} ({str(err).splitlines()[0]}); "
            f"give a torchvision {name} state dict"
        ) from None


# The safetensors metadata key that records who wrote a weights file, its value JSON: {"row", "stage"} of a model
# checkpoint (checkpoint.py), and {"row": "pretrain", "stage": 0, "backbone"} of the backbone file stage 0 writes.
WRITTEN_BY = "distributed_asac.written_by"


def pretrained_backbone(weights: Optional[str], name: str) -> Optional[dict[str, torch.Tensor]]:
    """θ's state dict from `weights` if it is a file stage 0 wrote (pretrain.py) for the backbone `name`; None for
    anything else (no weights, "imagenet", a torchvision file), which the caller reads as before. A stage-0 file of
    another backbone is a UserError naming both."""
    if weights is None or Path(weights).suffix != ".safetensors" or not Path(weights).is_file():
        return None  # "imagenet" too
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(weights, "pt") as opened:
            written_by = json.loads((opened.metadata() or {}).get(WRITTEN_BY, "{}"))
    except Exception:  # noqa: BLE001 - not a readable safetensors file: the torchvision path names the problem
        return None
    if not isinstance(written_by, dict) or written_by.get("stage") != 0:
        return None
    if written_by.get("backbone") != name:
        theirs = written_by.get("backbone")
        raise UserError(f"model.weights {weights!r} holds a {theirs} backbone (written by stage 0 of a run with "
                        f"model.backbone={theirs}), not a {name}; set model.backbone={theirs}, or pretrain a {name} "
                        "(pretrain.epochs > 0)")
    return load_file(weights)


def _load_backbone(net: nn.Module, state: dict[str, torch.Tensor], weights: str, name: str) -> None:
    """Load θ's state dict from a stage-0 file into `net`, the backbone without its classifier."""
    try:
        net.load_state_dict(state)
    except RuntimeError as err:  # a file edited by hand, or written by another release's architecture
        raise UserError(f"model.weights {weights!r} does not fit {name}'s backbone ({str(err).splitlines()[0]}); "
                        "pretrain it again (pretrain.epochs > 0)") from None


def _torchvision(name: str, classifier_attr: str) -> BackboneFactory:
    def factory(weights: Optional[str]) -> tuple[nn.Module, int, tuple, tuple]:
        net = getattr(torchvision.models, name)(weights=None)
        pretrained = pretrained_backbone(weights, name)
        if pretrained is None:
            _load_local_weights(net, weights, name)
        dim = getattr(net, classifier_attr).in_features
        setattr(net, classifier_attr, nn.Identity())  # the two heads replace the final layer
        if pretrained is not None:  # stage 0 saved θ without the classifier
            _load_backbone(net, pretrained, weights, name)
        return net, dim, IMAGENET_MEAN, IMAGENET_STD

    return factory


for _name, _attr in (("resnet18", "fc"), ("resnet50", "fc"), ("densenet121", "classifier"), ("densenet169", "classifier")):
    BACKBONES.register(_name)(_torchvision(_name, _attr))


@BACKBONES.register("small_cnn")
def small_cnn(weights: Optional[str]) -> tuple[nn.Module, int, tuple, tuple]:
    """A strided stem and three conv-BN-ReLU-pool blocks (≈0.07M parameters) for tests and the CPU demo.

    The stride-2 stem quarters the work of every later layer, so the CPU demo trains in minutes; batch norm is there on
    purpose, so that the tests of "attacks leave BN statistics alone" test something.
    """
    pretrained = pretrained_backbone(weights, "small_cnn")
    if weights is not None and pretrained is None:
        raise UserError(f"model.weights {weights!r} is not a small_cnn backbone written by stage 0 (small_cnn has no "
                        "torchvision weights); give the backbone.safetensors of a run with pretrain.epochs > 0, or "
                        "leave model.weights unset")
    widths = (16, 32, 64, 64)
    layers: list[nn.Module] = []
    in_ch = 3
    for i, width in enumerate(widths):
        layers += [
            nn.Conv2d(in_ch, width, 3, stride=2 if i == 0 else 1, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        if i > 0:
            layers.append(nn.MaxPool2d(2))
        in_ch = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    net = nn.Sequential(*layers)
    if pretrained is not None:
        _load_backbone(net, pretrained, weights, "small_cnn")
    return net, widths[-1], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
