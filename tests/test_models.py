"""Every registered backbone builds, normalises inside the model and returns two heads."""

import pytest
import torch
import torch.nn.functional as F

from distributed_asac.errors import UserError
from distributed_asac.models import BACKBONES, create_model, set_trainable


@pytest.mark.parametrize("name", BACKBONES.names())
def test_backbone_builds_and_runs(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        target, protected = model(x)
    assert target.shape == (2, 2) and protected.shape == (2, 2)
    assert torch.isfinite(target).all()
    torch.testing.assert_close(model.target_logits(x), target)
    assert "mean" not in model.state_dict()  # normalisation constants are not checkpoint state


def test_set_trainable_partitions_parameters():
    model = create_model("small_cnn")
    set_trainable(model, "probe")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"protected_head.weight", "protected_head.bias"}
    set_trainable(model, "finetune")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "protected_head.weight" not in trainable and "target_head.weight" in trainable
    assert any(n.startswith("backbone.") for n in trainable)


def test_a_stage_starts_with_no_gradient_of_the_stage_before():
    # Stage 1's last step leaves θ's gradients in place; stage 2's clipping (over every parameter) would count them.
    torch.manual_seed(0)
    model = create_model("small_cnn")
    set_trainable(model, "base")
    F.cross_entropy(model.target_logits(torch.rand(4, 3, 32, 32)), torch.tensor([0, 1, 0, 1])).backward()
    assert model.backbone[0].weight.grad is not None
    set_trainable(model, "probe")
    assert all(p.grad is None for p in model.parameters())


def test_an_independent_c_has_its_own_backbone_trained_in_stage_2_only():
    torch.manual_seed(0)
    model = create_model("small_cnn", protected_classifier="independent").eval()
    x = torch.rand(4, 3, 48, 48)
    target, protected = model(x)
    pixels = (x - model.mean) / model.std
    torch.testing.assert_close(protected, model.protected_head(model.protected_backbone(pixels)))
    torch.testing.assert_close(target, model.target_logits(x))
    assert model(x, protected=False)[1] is None  # training M skips C's backbone
    set_trainable(model, "probe")
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"protected_head", "protected_backbone"}
    set_trainable(model, "finetune")
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"backbone", "target_head"}
    # C's gradient no longer flows through M's backbone: changing θ leaves C's logits as they were
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)
    torch.testing.assert_close(model.protected_logits(x), protected)


def test_an_independent_c_leaves_m_and_the_seeded_stream_as_the_default_model_has_them():
    torch.manual_seed(3)
    default, after_default = create_model("small_cnn"), torch.rand(3)
    torch.manual_seed(3)
    independent, after_independent = create_model("small_cnn", protected_classifier="independent"), torch.rand(3)
    for name, tensor in default.state_dict().items():
        assert torch.equal(tensor, independent.state_dict()[name]), name
    assert torch.equal(after_default, after_independent)


def test_local_weights_file(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    net = torchvision.models.resnet18(weights=None)
    save_file(net.state_dict(), str(tmp_path / "r18.safetensors"))
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    for path in ("r18.safetensors", "r18.pth"):
        model = create_model("resnet18", str(tmp_path / path))
        torch.testing.assert_close(model.backbone.conv1.weight, net.conv1.weight)
    with pytest.raises(UserError, match="not found"):
        create_model("resnet18", str(tmp_path / "nope.pth"))
    with pytest.raises(UserError, match="does not match resnet50"):
        create_model("resnet50", str(tmp_path / "r18.pth"))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_damaged_weights_file_is_one_user_error_for_many_seeded_garbages(tmp_path, suffix):
    """A damaged file fails inside torch's unpickler in many ways (UnpicklingError, EOFError, and on some bytes
    KeyError or IndexError: seeds 17 and 21 below): every one is the same UserError, never a traceback."""
    import numpy as np

    path = tmp_path / f"garbage{suffix}"
    for seed in range(24):
        path.write_bytes(np.random.default_rng(seed).bytes(4096))
        with pytest.raises(UserError, match=r"cannot be read as a state dict \(.+\); give a torchvision resnet18"):
            create_model("resnet18", str(path))


def test_imagenet_weights_come_from_the_torch_cache_only(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: nothing may be downloaded
    with pytest.raises(UserError, match=r"resnet18-f37072fd\.pth in .*checkpoints"):
        create_model("resnet18", "imagenet")
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    net = torchvision.models.resnet18(weights=None)
    torch.save(net.state_dict(), cache / "resnet18-f37072fd.pth")
    model = create_model("resnet18", "imagenet")
    torch.testing.assert_close(model.backbone.layer1[0].conv1.weight, net.layer1[0].conv1.weight)
