"""The dense energy (regularisation) loss against ToCo spec 3.5, written out independently."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.test_bilateral import natural_image, one_cpu_thread  # noqa: F401 (autouse)
from toco.method.cam import box_mask
from toco.method.energy import RegularizationLoss, dense_energy_loss
from toco.method.step import StepState

SIGMA_RGB, SIGMA_XY = 15.0, 20.0  # σxy at full resolution; 10 px at the half scale


def half(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Scale 0.5 of even-sized maps: nearest takes even rows / columns; bilinear with
    align_corners=False samples at 2i + 0.5, the mean of each 2x2 block."""
    if mode == "nearest":
        return x[..., ::2, ::2]
    return 0.25 * (x[..., ::2, ::2] + x[..., 1::2, ::2] + x[..., ::2, 1::2] + x[..., 1::2, 1::2])


def kernel_matrix(image_s: torch.Tensor, sigma_xy: float, sigma_rgb: float) -> torch.Tensor:
    """(B, N, N) dense Gaussian affinities over (x, y, r, g, b), self term included."""
    b, _, h, w = image_s.shape
    y, x = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    pos = torch.stack([x.flatten(), y.flatten()], 1)  # (N, 2)
    d_pos = (pos[:, None] - pos[None]).square().sum(-1) / sigma_xy**2
    col = image_s.double().flatten(2).transpose(1, 2)  # (B, N, 3)
    d_col = (col[:, :, None] - col[:, None]).square().sum(-1) / sigma_rgb**2
    return torch.exp(-0.5 * (d_pos + d_col))


def spec_energy(image, probs, roi, label, gate_fixed=None):
    """Spec 3.5 steps 4-9 with a dense kernel matrix; returns (E, gate)."""
    probs_s, roi_s = half(probs, "bilinear"), half(roi, "nearest")[:, None]
    label_s, image_s = half(label, "nearest")[:, None], half(image, "nearest")
    gate = roi_s - probs_s.max(1, keepdim=True).values
    gate = torch.where(label_s == 255, torch.ones_like(gate), gate).clamp(min=0).detach()
    if gate_fixed is not None:
        gate = gate_fixed
    seg = (probs_s * roi_s).flatten(2)  # (B, C, N)
    k = kernel_matrix(image_s, SIGMA_XY * 0.5, SIGMA_RGB)
    filtered = torch.einsum("bij,bcj->bci", k, seg)
    return -(seg * gate.flatten(2) * filtered).sum() / probs.shape[0], gate


def make_inputs(b=2, c=3, h=16, w=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.cat([natural_image(h, w, seed + i) for i in range(b)]).double()
    logits = torch.randn(b, c, h, w, generator=g, dtype=torch.float64) * 2
    label = torch.randint(0, c, (b, h, w), generator=g)
    label[torch.rand(b, h, w, generator=g) < 0.3] = 255
    box = torch.tensor([[0, h, 0, w], [2, h - 4, 0, w - 2]])[:b]
    return image, logits, label, box


def loss(image, logits, label, box, **kw):
    roi = box_mask(box, *image.shape[-2:])
    return dense_energy_loss(image, torch.softmax(logits, 1), roi, label, SIGMA_RGB, SIGMA_XY, **kw)


def test_value_follows_the_spec():
    image, logits, label, box = make_inputs()
    roi = box_mask(box, 16, 12).double()
    expect, gate = spec_energy(image, torch.softmax(logits, 1), roi, label)
    # all three gate regimes occur: outside the ROI (0), ignored (1), labelled (1 - max S)
    assert (gate == 0).any() and (gate == 1).any() and ((gate > 0) & (gate < 1)).any()
    torch.testing.assert_close(
        loss(image, logits, label, box, method="exact"), expect, rtol=1e-10, atol=0
    )


def test_lattice_value_is_the_reference_lattice_scale():
    """The lattice energy is ~0.55x the exact Gaussian one, like rloss's C++ filter."""
    image, logits, label, box = make_inputs(h=32, w=32)
    ratio = loss(image, logits, label, box) / loss(image, logits, label, box, method="exact")
    assert 0.4 < ratio.item() < 0.75


@pytest.mark.parametrize("method", ["exact", "lattice"])
def test_gradient_matches_finite_differences_where_the_gate_is_constant(method):
    """All pixels ignored: the gate is 1 everywhere, so the value is a smooth function of the
    logits and its gradient is checked by finite differences through softmax, bilinear
    downsampling, the ROI and the filter."""
    image, logits, label, box = make_inputs(b=2, c=2, h=8, w=6)
    label.fill_(255)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: loss(image, z, label, box, method=method),
        (logits,),
        atol=1e-8,
        rtol=1e-6,
        fast_mode=True,
    )


def test_gradient_holds_the_gate_fixed():
    """With labels, autograd of the loss equals autograd of the spec formula with the gate as a
    constant: −(1/B)(Gate⊙KS' + Kᵀ(Gate⊙S')), through the ROI, downsampling and softmax."""
    image, logits, label, box = make_inputs()
    roi = box_mask(box, 16, 12).double()
    z1 = logits.clone().requires_grad_(True)
    z2 = logits.clone().requires_grad_(True)
    loss(image, z1, label, box, method="exact").backward()
    spec_energy(image, torch.softmax(z2, 1), roi, label)[0].backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-9, atol=1e-12)


def test_reference_gradient_is_toco_formula():
    """reference_gradient: same value; dE/dS = −(2/B)·Gate·K(S·ROI)·ROI at scale 1."""
    image, logits, label, box = make_inputs()
    probs = torch.softmax(logits, 1).requires_grad_(True)
    roi = box_mask(box, 16, 12).double()
    kw = dict(sigma_rgb=SIGMA_RGB, sigma_xy=SIGMA_XY, scale_factor=1.0, method="exact")
    value = dense_energy_loss(image, probs, roi, label, reference_gradient=True, **kw)
    value.backward()
    exact_value = dense_energy_loss(image, probs.detach(), roi, label, **kw)
    torch.testing.assert_close(value, exact_value, rtol=1e-12, atol=0)
    gate = (roi - probs.detach().max(1).values).masked_fill(label == 255, 1).clamp(min=0)
    seg = probs.detach() * roi[:, None]
    k = kernel_matrix(image, SIGMA_XY, SIGMA_RGB)
    ks = torch.einsum("bij,bcj->bci", k, seg.flatten(2)).view_as(seg)
    expect = -2 / 2 * gate[:, None] * ks * roi[:, None]
    torch.testing.assert_close(probs.grad, expect, rtol=1e-9, atol=1e-12)


def test_exact_and_reference_gradients_agree_for_a_symmetric_kernel_and_constant_gate():
    image, logits, label, box = make_inputs()
    label.fill_(255)
    grads = []
    for ref in (False, True):
        z = logits.clone().requires_grad_(True)
        loss(image, z, label, box, method="exact", reference_gradient=ref).backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


def _state(images, seg_logits, label, box) -> StepState:
    return StepState(
        iteration=5,
        images=images,
        cls_label=None,
        img_box=box,
        feats=None,
        logits=None,
        aux_logits=None,
        seg_logits=seg_logits,
        cam=None,
        cam_aux=None,
        make_pseudo_label=lambda s: label,
        make_token_label=None,
        make_ctc=None,
    )


def test_regularization_loss_module():
    image, _, label, box = make_inputs(b=2, c=4, h=32, w=32, seed=3)
    images = (image / 255).float()
    seg_logits = torch.randn(2, 4, 8, 8, requires_grad=True)  # decoder stride 4
    module = RegularizationLoss(0.05, start_iter=3)
    assert module.names == ("reg",) and module.active(3) and not module.active(2)
    assert not RegularizationLoss(0.0, 0).active(10)
    out = module.compute(_state(images, seg_logits, label, box))
    assert set(out) == {"reg"} and out["reg"].shape == () and out["reg"].dtype == torch.float32
    up = F.interpolate(seg_logits.detach(), size=(32, 32), mode="bilinear", align_corners=False)
    expect = 1e-7 * dense_energy_loss(
        images * 255, torch.softmax(up, 1), box_mask(box, 32, 32), label
    )
    torch.testing.assert_close(out["reg"], expect)
    assert out["reg"] < 0
    out["reg"].backward()
    assert torch.isfinite(seg_logits.grad).all() and seg_logits.grad.abs().sum() > 0
