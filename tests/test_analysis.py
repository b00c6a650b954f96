"""Robustness curves and Integrated Gradients against direct computations."""

import torch
from torch import nn

from distributed_asac.analysis import box_share, ig_mouth_share, robustness_curve
from distributed_asac.models import create_model


def test_box_share_hand_computed():
    attributions = torch.zeros(2, 4, 4)
    attributions[0, 1, 1] = 3.0  # inside [1, 3) × [1, 3)
    attributions[0, 3, 3] = 1.0  # outside
    attributions[1] = 1.0  # uniform: 4 of 16 pixels inside
    boxes = torch.tensor([[1, 1, 3, 3], [1, 1, 3, 3]])
    torch.testing.assert_close(box_share(attributions, boxes), torch.tensor([0.75, 0.25]))


class _MouthOnly(nn.Module):
    """target logit = Σ of the pixels inside the box (all channels); everything else ignored."""

    def __init__(self, box):
        super().__init__()
        self.box = box

    def target_logits(self, x):
        x0, y0, x1, y1 = self.box
        s = x[:, :, y0:y1, x0:x1].sum((1, 2, 3))
        return torch.stack([-s, s], 1)


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, n, box):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 3, 16, 16, generator=g)
        self.box = box

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], 1, 0, i

    def mouth_box(self, i):
        return torch.tensor(self.box)


def test_ig_puts_everything_in_the_box_for_a_box_only_model():
    box = (4, 10, 12, 14)
    share = ig_mouth_share(_MouthOnly(box), _Dataset(5, box), n_images=5, steps=8, device=torch.device("cpu"))
    assert share["IG_mouth_share"] > 0.999
    assert abs(share["mouth_area_share"] - (8 * 4) / 256) < 1e-9


def test_robustness_curve_at_zero_is_clean_accuracy_and_c_falls():
    torch.manual_seed(0)
    model = create_model("small_cnn").eval()
    data = _Dataset(40, (0, 0, 1, 1))
    curve = robustness_curve(model, data, [0.0, 0.1], n_images=40, batch_size=16, device=torch.device("cpu"))
    with torch.no_grad():
        target, protected = model(data.x)
    assert curve[0]["target_ACC"] == 100 * float((target.argmax(1) == 1).float().mean())
    assert curve[0]["protected_ACC"] == 100 * float((protected.argmax(1) == 0).float().mean())
    assert curve[1]["protected_ACC"] <= curve[0]["protected_ACC"]  # FGSM against C does not help C


def test_ig_figure_has_a_panel_per_image_and_model(tmp_path):
    from distributed_asac.report import plot_ig_figure

    images = torch.rand(8, 3, 16, 16)
    boxes = torch.tensor([[4, 8, 12, 12]] * 8)
    maps = {name: torch.rand(8, 16, 16) for name in ("base", "plain", "asac_fgsm")}
    panels = plot_ig_figure(images, [(i // 4, i % 2) for i in range(8)], boxes, maps, tmp_path / "fig.png")
    assert panels == 8 * 4 and (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"


def test_figure_indices_take_the_first_images_of_each_group():
    class Labels:
        targets = torch.tensor([1, 0, 0, 1, 0, 1, 0, 1, 1])
        protected_labels = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0, 1])

    from distributed_asac.analysis import figure_indices

    # groups (y, a): 0:(1,1) 1:(0,0) 2:(0,1) 3:(1,0) 4:(0,0) 5:(1,1) 6:(0,1) 7:(1,0) 8:(1,1)
    assert figure_indices(Labels(), per_group=2) == [1, 4, 2, 6, 3, 7, 0, 5]
