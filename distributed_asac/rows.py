"""The rows of the comparison table: stage-3 training modes, each a registered function that turns a minibatch
into the chunks of its optimizer steps (docs/method.md, Comparators).

A mode makes one row per entry of its `rows` (row name → the finetune settings that make it besides
`finetune.mode`): the ASAC mode one row per attack (`asac_fgsm`, `asac_pgd`), the others one row named after
themselves. Registration order is the table's row order (the paper's Table 1: base, comparators, ASAC rows).
A new comparator is one decorated function here: its name becomes a valid `finetune.mode`, a `--rows` choice
of the demo and a row of every table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from .attacks import ATTACKS, Attack, pgd
from .curriculum import curriculum_chunks, difficulty_scores
from .data.batches import host_to_device
from .data.twins import WithTwins, collate_with_twins, train_twins
from .diagnostics import Diagnostics, phase
from .gan_engine import latent_pairs, load_generator
from .models import TwoHeadModel, eval_mode
from .registry import Registry

# What a row's prepare hook may need of stage 1 (jtt's identification model: the stage-1 initialisation, an ERM
# trainer, a random state left as found), filled by stages.py when it is imported (stage3.py imports it): the rows
# are imported by config, which stages and runtime import, so a row cannot import them itself.
STAGE_ONE: dict[str, Callable] = {}

if TYPE_CHECKING:
    from torch.utils.data import Dataset, Sampler

    from .config import Config, FinetuneConfig
    from .data.datasets import Splits


@dataclass
class ForwardLayout:
    """Where the entries of a chunk with a clean term find their logits in the chunk's one forward pass, whose
    batch is cat([x[unique], images[perturbed]]) [u + m, 3, H, W] (`stage3.forward_layouts` computes it), or
    with fixed-shape chunks cat([x, images]) [k + n, 3, H, W] (`stage3.fixed_layout`)."""

    unique: Optional[torch.Tensor]  # [u] the distinct clean images of the chunk (minibatch indices), ascending; None: all k
    perturbed: Optional[torch.Tensor]  # [m] the entries that differ from their clean image, ascending; None: all n
    clean_rows: torch.Tensor  # [n] each entry's clean image's row of the batch
    asac_rows: torch.Tensor  # [n] each entry's own row: its clean image's for an ε = 0 entry


@dataclass
class Chunk:
    """The entries of one optimizer step."""

    images: torch.Tensor  # [n, 3, H, W] ASACs (or clean images, for the comparators)
    labels: torch.Tensor  # [n] target labels y
    clean: Optional[torch.Tensor] = None  # [n] minibatch index of each entry's clean image; None: no clean term
    is_clean: Optional[torch.Tensor] = None  # [n] bool: the entry IS its clean image (ε = 0); None: none known
    loss: Optional[Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]] = None
    # (logits [n, 2], labels [n]) → the step's loss terms, for a chunk without a clean term; None: plain CE
    layout: Optional[ForwardLayout] = None  # of a chunk with a clean term, once the step has computed it


@dataclass
class StepContext:
    """What a mode needs besides the minibatch (built by `stage3.build_stage3`)."""

    cfg: FinetuneConfig
    magnitudes: list[float]  # E, ascending, 0 first
    attack: Attack  # finetune.attack with its own settings bound (attacks.create_attack)
    attacked: TwoHeadModel  # the model whose protected head C the attacks fool (frozen snapshot or live)
    scorer: TwoHeadModel  # the current model (unwrapped), for difficulty scores
    generator: torch.Generator  # curriculum shuffles; the same on every rank
    diagnostics: Diagnostics
    # what the mode's `prepare` made at stage-3 start (gan_augment: its latent pairs); one that training changes
    # (GroupDRO's q) has `carried() -> dict[str, Tensor]` and `restore(dict)`, saved with every epoch's state
    prepared: Any = None


ChunkMaker = Callable[[StepContext, torch.Tensor, torch.Tensor, torch.Tensor], list[Chunk]]


@dataclass(frozen=True)
class Mode:
    make_chunks: Optional[ChunkMaker]  # (ctx, x [k, 3, H, W], y [k], a [k]) → chunks; None: no fine-tuning (base)
    rows: dict[str, dict[str, Any]]  # row name → the finetune settings besides `mode` that make it
    check: Optional[Callable[[Config], None]] = None  # before any training: a UserError for what it cannot run on
    prepare: Optional[Callable[..., tuple[Any, dict[str, float]]]] = None
    # (cfg, base model, train split, accelerator, tracker) → (ctx.prepared, numbers for the fine-tune's summary),
    # once as stage 3 starts, before any step
    train_data: Optional[Callable[[Config, Dataset], tuple[Dataset, Callable]]] = None
    # the dataset and collate function of stage 3's loader in place of the train split's
    reports_attack: bool = False  # its steps train on ASACs of ctx.attack: stage 3 reports that attack's success
    sampler: Optional[Callable[[Config, Dataset, Any], Sampler]] = None
    # (cfg, stage 3's dataset, ctx.prepared) → the sampler of its loader in place of a shuffle (same length)
    check_splits: Optional[Callable[[Config, Splits], None]] = None  # before any training, on the splits
    fit: Optional[Callable[..., tuple[TwoHeadModel, dict[str, float]]]] = None
    # (model, train split, valid split, cfg, accelerator, tracker) → (model, summary): stage 3 for a mode that
    # sets its weights without minibatch steps (dfr), in place of the epoch loop


MODES: Registry[Mode] = Registry("training mode")


def mode(name: str, rows: Optional[dict[str, dict[str, Any]]] = None, **hooks: Any) -> Callable[[ChunkMaker], ChunkMaker]:
    """Register `make_chunks` as the training mode `name`, making `rows` (default: one row called `name`), with
    the optional `Mode` hooks `check`, `prepare` and `train_data`."""

    def add(make_chunks: ChunkMaker) -> ChunkMaker:
        MODES.register(name)(Mode(make_chunks, rows or {name: {}}, **hooks))
        return make_chunks

    return add


MODES.register("base")(Mode(None, {"base": {}}))  # stages 1–2 only: the model every other row starts from


@mode("plain")
def plain(ctx: StepContext, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> list[Chunk]:
    """Stage 3's number of steps (|E| per minibatch) on the clean images only: controls for more training."""
    return [Chunk(x, y)] * len(ctx.magnitudes)


@mode("adv_augment")
def adv_augment(ctx: StepContext, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> list[Chunk]:
    """Zhang & Sang (2020) as docs/method.md reads it: PGD examples against C at one ε (finetune.adv_eps) added to
    the data, plain cross-entropy, no curriculum, no α. The 2k images are shuffled into |E| steps."""
    with eval_mode(ctx.attacked):
        adversarial = pgd(ctx.attacked.protected_logits, x, a, [ctx.cfg.adv_eps], steps=ctx.cfg.pgd_steps)[0]
    return shuffled_chunks(ctx, torch.cat([x, adversarial]), torch.cat([y, y]))  # [2k, 3, H, W], [2k]


def _check_generator(cfg: Config) -> None:
    if cfg.gan.checkpoint:
        load_generator(cfg.gan.checkpoint)


@mode("gan_augment", check=_check_generator, prepare=latent_pairs)
def gan_augment(ctx: StepContext, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> list[Chunk]:
    """Ramaswamy et al. (2021) as docs/method.md reads it: k real images plus k generated ones, k/2 latent pairs
    (G(z), G(z')) that flip the protected attribute and keep the target, both labelled by the base's M on G(z)
    (gan.py, made once by `prepare`); plain cross-entropy, shuffled into |E| steps."""
    pairs = ctx.prepared.sample(max(1, len(x) // 2), x.device)
    return shuffled_chunks(ctx, torch.cat([x, pairs.images, pairs.twins]), torch.cat([y, pairs.labels, pairs.labels]))


@mode("asac", rows={f"asac_{attack}": {"attack": attack} for attack in ATTACKS.names()}, reports_attack=True)
def asac(ctx: StepContext, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> list[Chunk]:
    """The method: the ASACs of the k images at every ε of E, scored by the current M, ordered by the curriculum
    and cut into |E| chunks of k entries (docs/method.md, Difficulty and curriculum)."""
    n_eps, k = len(ctx.magnitudes), x.shape[0]
    with phase("asac.attack"), eval_mode(ctx.attacked):
        asacs = ctx.attack(ctx.attacked.protected_logits, x, a, ctx.magnitudes)  # [|E|, k, 3, H, W]
    entries = asacs.flatten(0, 1)  # [|E|·k, 3, H, W]; entry j·k + i is image i at E[j]
    labels = y.repeat(n_eps)
    with phase("asac.score"), torch.no_grad(), eval_mode(ctx.scorer):
        target_logits = ctx.scorer.target_logits(entries)  # [|E|·k, 2]
    with phase("asac.order"):
        scores = difficulty_scores(target_logits, labels)  # [|E|·k]
        ctx.diagnostics.record_asacs(scores, target_logits, k)
        steps = curriculum_chunks(scores, ctx.cfg.order, n_eps, ctx.generator)  # [|E|, k] entry indices, on the device
        # Entries j·k + i with j = 0 are ε = E[0] = 0: the clean image itself, bit for bit.
        clean, is_clean = steps % k, steps < k  # [|E|, k] each
        return [Chunk(entries[steps[s]], labels[steps[s]], clean=clean[s], is_clean=is_clean[s]) for s in range(n_eps)]


def _with_twins(cfg: Config, train_set: Dataset) -> tuple[Dataset, Callable]:
    return WithTwins(train_set, train_twins(cfg.data)), collate_with_twins


@mode("oracle_counterfactual", check=lambda cfg: train_twins(cfg.data), train_data=_with_twins)
def oracle_counterfactual(ctx: StepContext, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> list[Chunk]:
    """The bound of counterfactual augmentation (generated dataset only): each of the k images with its true twin,
    the same face with only the protected attribute flipped (data.synthetic_train_twins), under the same label;
    plain cross-entropy, the 2k images shuffled into |E| steps."""
    return shuffled_chunks(ctx, x, y)  # x [2k, 3, H, W]: the loader's collate put the twins beside the images


def shuffled_chunks(ctx: StepContext, pool: torch.Tensor, labels: torch.Tensor) -> list[Chunk]:
    """An augmented minibatch (pool [n, 3, H, W], labels [n]) shuffled into |E| steps of plain cross-entropy:
    the comparators take as many optimizer steps per minibatch as ASAC does."""
    order = host_to_device(torch.randperm(len(pool), generator=ctx.generator), pool.device)  # [n]
    return [Chunk(pool[rows], labels[rows]) for rows in order.tensor_split(len(ctx.magnitudes))]


def table_rows() -> dict[str, dict[str, Any]]:
    """Every row, in table order: row name → the finetune settings that make it (`mode` included)."""
    return {row: {"mode": name, **settings} for name, m in MODES.items() for row, settings in m.rows.items()}


def fine_tuned_rows() -> dict[str, dict[str, Any]]:
    """The rows stage 3 trains (all but the base, which every run has): what the demo's --rows chooses from."""
    return {row: settings for row, settings in table_rows().items()
            if MODES.get(settings["mode"]).make_chunks or MODES.get(settings["mode"]).fit}


def row_name(settings: FinetuneConfig) -> str:
    """The row a stage-3 config makes: 'asac_fgsm', 'plain', 'adv_augment', 'base', ..."""
    rows = MODES.get(settings.mode).rows
    return next(row for row, wanted in rows.items() if all(getattr(settings, k) == v for k, v in wanted.items()))


def in_table_order(names: set[str] | list[str]) -> list[str]:
    """`names` with the registered rows first in table order, then any others sorted."""
    order = list(table_rows())
    return [n for n in order if n in names] + sorted(set(names) - set(order))
