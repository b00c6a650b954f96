"""finetune.compile: the training steps' model under torch.compile gives the eager step's numbers (to float
tolerance: inductor fuses kernels and may reorder reductions)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch


@pytest.mark.slow  # inductor compiles small_cnn's forward and backward twice (a chunk shape, then dynamic): minutes
def test_a_compiled_asac_step_gives_the_eager_loss_and_weights():
    from accelerate import Accelerator

    from distributed_asac.config import Config
    from distributed_asac.models import create_model
    from distributed_asac.stage3 import build_stage3

    torch.manual_seed(0)
    base = create_model("small_cnn")
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(8, 3, 16, 16, generator=g), torch.randint(0, 2, (8,), generator=g),
                torch.randint(0, 2, (8,), generator=g)) for _ in range(2)]
    losses, weights = {}, {}
    for compiled in (False, True):
        cfg = Config()
        cfg.finetune = replace(cfg.finetune, compile=compiled)
        stage = build_stage3(copy.deepcopy(base), cfg, Accelerator(cpu=True), torch.Generator().manual_seed(0))
        assert isinstance(stage.wrapped, torch._dynamo.eval_frame.OptimizedModule) == compiled
        losses[compiled] = torch.stack([stage.train_minibatch(x, y, a)["loss"].detach() for x, y, a in batches])
        weights[compiled] = torch.cat([p.detach().flatten() for p in stage.model.parameters()])
    assert not torch.equal(weights[False], torch.cat([p.detach().flatten() for p in base.parameters()]))  # it trained
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weights[True], weights[False], rtol=1e-4, atol=1e-5)
