"""Backbone wrapper, heads and the network: numerics against timm and independent formulas."""

import math

import numpy as np
import pytest
import torch

from models.backbone import ViTBackbone, resize_pos_embed
from models.heads import CTCHead, EMATeacher
from models.network import ToCoNet
from toco.errors import ConfigError, UserError

TINY = dict(depth=4)


def cubic_weight(t: float, a: float = -0.75) -> float:
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def naive_bicubic(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Separable bicubic (a=-0.75), half-pixel centres, clamped borders: PyTorch's convention."""

    def resize_axis(x, n_out, axis):
        n_in = x.shape[axis]
        scale = n_in / n_out
        rows = []
        for i in range(n_out):
            src = (i + 0.5) * scale - 0.5
            base = math.floor(src)
            acc = 0.0
            for k in range(-1, 3):
                idx = min(max(base + k, 0), n_in - 1)
                acc = acc + cubic_weight(src - (base + k)) * np.take(x, idx, axis=axis)
            rows.append(acc)
        return np.stack(rows, axis=axis)

    return resize_axis(resize_axis(img, out_h, 0), out_w, 1)


def test_resize_pos_embed_matches_naive_bicubic():
    torch.manual_seed(0)
    table = torch.randn(1, 3 * 4, 5, dtype=torch.float64)
    out = resize_pos_embed(table, (3, 4), (5, 2))
    grid = table[0].reshape(3, 4, 5).numpy()
    expected = naive_bicubic(grid, 5, 2).reshape(10, 5)
    np.testing.assert_allclose(out[0].numpy(), expected, rtol=1e-6, atol=1e-8)


def test_resize_pos_embed_same_grid_is_identity():
    table = torch.randn(1, 16, 3)
    assert resize_pos_embed(table, (4, 4), (4, 4)) is table


def test_backbone_matches_timm_at_native_size():
    torch.manual_seed(0)
    bb = ViTBackbone("vit_tiny_patch16_224", aux_layer=-2, **TINY).eval()
    x = torch.randn(2, 3, 224, 224)
    out = bb(x)
    with torch.no_grad():
        final = bb.vit.forward_features(x)
        _, inter = bb.vit.forward_intermediates(x, indices=[2], norm=False, output_fmt="NCHW")
    torch.testing.assert_close(out.cls, final[:, 0])
    torch.testing.assert_close(out.tokens.flatten(2).transpose(1, 2), final[:, 1:])
    torch.testing.assert_close(out.aux_tokens, inter[0])  # raw block-2 output, no final norm


def test_backbone_grid_floors_and_resizes_positions():
    bb = ViTBackbone("deit_tiny_patch16_224", **TINY)
    out = bb(torch.randn(1, 3, 100, 70))
    assert out.tokens.shape == (1, 192, 6, 4) and out.aux_tokens.shape == (1, 192, 6, 4)
    assert not bb.vit.pos_embed.requires_grad


def test_unknown_backbone_is_a_config_error_with_suggestion():
    with pytest.raises(ConfigError, match="unknown backbone 'deit_tiny_patch16_2244'"):
        ViTBackbone("deit_tiny_patch16_2244")


def test_missing_pretrained_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        ViTBackbone("deit_tiny_patch16_224", pretrained=str(tmp_path / "nope.pth"))


def test_local_pretrained_file_is_loaded_exactly(tmp_path):
    torch.manual_seed(1)
    src = ViTBackbone("deit_tiny_patch16_224", **TINY)
    path = tmp_path / "w.pth"
    torch.save(src.vit.state_dict(), path)
    dst = ViTBackbone("deit_tiny_patch16_224", pretrained=str(path), **TINY)
    for (k, a), (_, b) in zip(src.vit.state_dict().items(), dst.vit.state_dict().items()):
        assert torch.equal(a, b), k


def test_corrupt_pretrained_file_is_a_user_error(tmp_path):
    path = tmp_path / "bad.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not load backbone weights"):
        ViTBackbone("deit_tiny_patch16_224", pretrained=str(path), **TINY)


def test_ctc_head_outputs_cosines_with_unit_rows():
    head = CTCHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8)
    out = head(torch.randn(5, 16))
    weight = head.last_layer.weight
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(32))
    assert out.abs().max() <= 1 + 1e-6
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)


def test_ema_teacher_update_formula():
    student = torch.nn.Linear(3, 2)
    teacher = EMATeacher(student, momentum=0.9)
    before = teacher.module.weight.clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    teacher.update(student)
    torch.testing.assert_close(teacher.module.weight, 0.9 * before + 0.1 * student.weight)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_network_param_groups_cover_trainable_params_once():
    net = ToCoNet(ViTBackbone("deit_tiny_patch16_224", **TINY), num_classes=5, decoder_dim=32)
    groups = net.param_groups()
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids))
    trainable = {
        id(p)
        for n, p in net.named_parameters()
        if p.requires_grad and not n.startswith("proj_head_teacher")
    }
    assert set(ids) == trainable
    assert all(
        "norm" in n for n, p in net.backbone.named_parameters() if any(p is q for q in groups[1])
    )
    assert {id(p) for p in net.decoder.parameters()} == {id(p) for p in groups[3]}


def test_network_cams_use_classifier_weights():
    torch.manual_seed(0)
    net = ToCoNet(ViTBackbone("deit_tiny_patch16_224", **TINY), num_classes=4, decoder_dim=16)
    x = torch.rand(2, 3, 64, 48)
    feats = net.encode(x)
    cam, cam_aux = net.cams(x)
    expected = torch.einsum("kd,bdhw->bkhw", net.classifier.conv.weight[:, :, 0, 0], feats.tokens)
    torch.testing.assert_close(cam, expected, rtol=1e-4, atol=1e-5)
    logits, _ = net.classify(feats)
    # GMP before the 1x1 conv: logits = W · max_hw F
    pooled = feats.tokens.amax(dim=(2, 3))
    torch.testing.assert_close(
        logits, pooled @ net.classifier.conv.weight[:, :, 0, 0].T, rtol=1e-4, atol=1e-5
    )
    assert net.segment(feats).shape == (2, 4, 4, 3)


def test_network_normalises_inputs_with_its_mean_and_std():
    torch.manual_seed(0)
    bb = ViTBackbone("deit_tiny_patch16_224", **TINY).eval()
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    net = ToCoNet(bb, num_classes=3, decoder_dim=8, pixel_mean=mean, pixel_std=std).eval()
    x = torch.rand(1, 3, 32, 48)
    by_hand = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(net.encode(x).tokens, bb(by_hand).tokens)
    default = ToCoNet(bb, num_classes=3, decoder_dim=8)  # ToCo's ImageNet values
    assert default.pixel_mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert default.pixel_std.flatten().tolist() == pytest.approx([0.229, 0.224, 0.225])
