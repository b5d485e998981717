"""RCA plug-in: FIFO memory, k-means, contrast, aggregation hook, checkpoints, DDP gather."""

from __future__ import annotations

import json
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.backbone import EncoderOutput
from toco.checkpoint import load_checkpoint, save_checkpoint
from toco.config import TrainConfig
from toco.plugins.rca import RCAAggregation, RCAMemory, RegionalContrast, contrast_per_query


def reference_fifo(queues, ptrs, counts, emb, ok, size):
    """Sequential reference: entries in order e, one class at a time, overwrite at ptr."""
    for e in range(emb.shape[0]):
        for k in range(emb.shape[1]):
            if ok[e, k]:
                queues[k][ptrs[k]] = emb[e, k].copy()
                ptrs[k] = (ptrs[k] + 1) % size
                counts[k] = min(counts[k] + 1, size)


def test_fifo_order_and_wrap_around_match_a_sequential_queue():
    rng = np.random.default_rng(0)
    k, size, d = 3, 4, 2
    mem = RCAMemory(k, size, d, num_centroids=2)
    queues = np.zeros((k, size, d), dtype=np.float32)
    ptrs, counts = [0] * k, [0] * k
    for step, n_entries in enumerate([3, 2, 7, 1, 5]):  # 7 entries of one class > L: wrap twice
        emb = rng.normal(size=(n_entries, k, d)).astype(np.float32)
        ok = rng.random((n_entries, k)) < 0.7
        if step == 2:
            ok[:, 0] = True
        mem.enqueue(torch.from_numpy(emb), torch.from_numpy(ok))
        reference_fifo(queues, ptrs, counts, emb, ok, size)
        np.testing.assert_array_equal(mem.mem.numpy(), queues)
        assert mem.ptr.tolist() == ptrs and mem.count.tolist() == counts
    filled = mem.filled()
    assert filled.tolist() == [[j < c for j in range(size)] for c in counts]


def test_ema_update_blends_filled_slots_and_copies_into_empty_ones():
    mem = RCAMemory(1, 2, 1, num_centroids=1)
    mem.enqueue(torch.tensor([[[2.0]], [[4.0]]]), torch.ones(2, 1, dtype=torch.bool), "ema", 0.9)
    assert mem.mem.flatten().tolist() == [2.0, 4.0]
    mem.enqueue(torch.tensor([[[10.0]]]), torch.ones(1, 1, dtype=torch.bool), "ema", 0.9)
    assert mem.mem.flatten().tolist() == pytest.approx([0.9 * 2 + 0.1 * 10, 4.0])


def test_noise_init_is_the_official_start():
    torch.manual_seed(0)
    mem = RCAMemory(2, 5, 3, num_centroids=2, noise_init=True)
    assert mem.count.tolist() == [5, 5] and mem.cent_ok.all() and mem.mem.abs().sum() > 0
    empty = RCAMemory(2, 5, 3, num_centroids=2)
    assert empty.count.tolist() == [0, 0] and not empty.cent_ok.any()


def test_kmeans_finds_separated_clusters_deterministically():
    rng = np.random.default_rng(1)
    centres = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    points = centres[rng.integers(0, 2, 40)] + rng.normal(scale=0.01, size=(40, 3))
    mem = RCAMemory(3, 40, 3, num_centroids=2)
    emb = torch.zeros(40, 3, 3)
    ok = torch.zeros(40, 3, dtype=torch.bool)
    emb[:, 0] = torch.from_numpy(points).float()
    ok[:, 0] = True
    emb[:1, 1] = torch.tensor([0.0, 0.0, 2.0])  # class 1: a single entry (< k)
    ok[:1, 1] = True
    mem.enqueue(emb, ok)
    mem.refresh_centroids(iters=10, seed=5)
    got = sorted(mem.cent[0].tolist())
    want = sorted((centres / np.linalg.norm(centres, axis=1, keepdims=True)).tolist())
    np.testing.assert_allclose(got, want, atol=0.02)
    np.testing.assert_allclose(mem.cent[1].numpy(), [[0, 0, 1], [0, 0, 1]], atol=1e-6)
    assert mem.cent_ok.tolist() == [True, True, False]
    first = mem.cent.clone()
    mem.refresh_centroids(iters=10, seed=5)
    assert torch.equal(first, mem.cent)


def test_contrast_matches_a_loop_over_positives():
    torch.manual_seed(2)
    k, size, d = 3, 4, 5
    mem = torch.randn(k, size, d)
    filled = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    q = F.normalize(torch.randn(2, d), dim=1)
    target = torch.tensor([0, 2])
    got, same = contrast_per_query(q, [target, target], mem, filled, tau=0.07)
    assert torch.equal(got, same)
    m = F.normalize(mem, dim=-1)
    for r in range(2):
        t = int(target[r])
        s = {
            (c, j): float(q[r] @ m[c, j]) / 0.07
            for c in range(k)
            for j in range(size)
            if filled[c, j]
        }
        neg = sum(math.exp(v) for (c, _), v in s.items() if c != t)
        pos = [v for (c, _), v in s.items() if c == t]
        expected = sum(-v + math.log(math.exp(v) + neg) for v in pos) / len(pos)
        assert float(got[r]) == pytest.approx(expected, rel=1e-4)


def test_cumulative_mask_reproduces_the_official_in_place_masking():
    torch.manual_seed(3)
    masks = (torch.rand(1, 3, 2, 3) > 0.4).float()
    z = torch.randn(1, 2, 3, 4)
    present = torch.tensor([[True, False, True]])
    n_tok = masks.sum(dim=(-2, -1))
    got = RegionalContrast._cumulative_pool(masks, z, present, n_tok)
    x = z[0].permute(2, 0, 1).clone()  # the official loop: x = x * mask, class by class
    for c in (0, 2):
        x = x * masks[0, c]
        expected = x.reshape(4, -1).sum(1) / masks[0, c].sum().clamp_min(1)
        np.testing.assert_allclose(got[0, c].numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


def make_memory_with_centroids(k=2, num_centroids=2, d=4):
    mem = RCAMemory(k, 6, d, num_centroids)
    emb = F.normalize(torch.randn(6, k, d), dim=-1)
    mem.enqueue(emb, torch.ones(6, k, dtype=torch.bool))
    mem.refresh_centroids(3, seed=0)
    return mem


def test_aggregation_starts_as_identity_and_attends_over_centroids():
    torch.manual_seed(4)
    mem = make_memory_with_centroids()
    hook = RCAAggregation(8, mem, fusion="gate")
    tokens = torch.randn(2, 8, 3, 3)
    out = hook(EncoderOutput(torch.zeros(2, 8), tokens, tokens))
    assert torch.equal(out.tokens, tokens) and out.raw_tokens is tokens
    with torch.no_grad():
        hook.gate.fill_(1.0)
    out = hook(EncoderOutput(torch.zeros(2, 8), tokens, tokens))
    x = tokens.flatten(2).transpose(1, 2)
    u = mem.cent.reshape(-1, 4)
    attn = ((hook.q(x) @ hook.k(u).t()) / 2.0).softmax(-1)  # sqrt(d) = 2
    expected = x + hook.out(attn @ hook.v(u))
    np.testing.assert_allclose(
        out.tokens.flatten(2).transpose(1, 2).detach().numpy(),
        expected.detach().numpy(),
        rtol=1e-5,
        atol=1e-5,
    )
    dot = RCAAggregation(8, mem, attention="dot", fusion="gate")
    dot.load_state_dict(hook.state_dict())
    got = dot.aggregate(tokens).flatten(2).transpose(1, 2)
    want = dot.out((2.0 * dot.q(x) @ dot.k(u).t()) @ dot.v(u))
    np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_aggregation_without_centroids_has_finite_gradients():
    hook = RCAAggregation(8, RCAMemory(2, 4, 4, 2), fusion="gate")
    with torch.no_grad():
        hook.gate.fill_(0.5)
    tokens = torch.randn(1, 8, 2, 2, requires_grad=True)
    hook(EncoderOutput(torch.zeros(1, 8), tokens, tokens)).tokens.sum().backward()
    assert torch.isfinite(tokens.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in hook.parameters() if p.grad is not None)


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(
        backbone="deit_tiny_patch16_224",
        pretrained="none",
        backbone_depth=1,
        aux_layer=0,
        crop_size=32,
        local_crop_size=16,
        decoder_dim=8,
        rca=True,
        rca_dim=8,
        rca_mem_size=5,
        rca_num_centroids=2,
    )
    return TrainConfig.from_dict({**base, **kw})


def test_hook_and_loss_module_share_one_memory_and_round_trip_a_checkpoint(tmp_path):
    from toco.build import build_model
    from toco.plugins import build_plugins

    torch.manual_seed(5)
    cfg = tiny_cfg(rca_fusion="gate")
    model = build_model(cfg, 4)
    coarse, plugin = build_plugins(cfg, model.backbone.embed_dim, 4, model=model)
    assert plugin.memory is model.feature_hooks[0].memory
    emb = F.normalize(torch.randn(7, 3, 8), dim=-1)
    plugin.memory.enqueue(emb, torch.rand(7, 3) > 0.3)
    plugin.memory.refresh_centroids(2, seed=1)
    with torch.no_grad():
        model.feature_hooks[0].gate.fill_(0.3)
    modules = torch.nn.ModuleList([coarse, plugin])
    save_checkpoint(
        {
            "model": model.state_dict(),
            "trainer": {"loss_modules": modules.state_dict()},
            "config": cfg.to_dict(),
        },
        tmp_path / "last.pt",
    )
    state = load_checkpoint(tmp_path / "last.pt")
    assert "feature_hooks.0.memory.mem" in state["model"]
    assert "1.memory.count" in state["trainer"]["loss_modules"]

    model2 = build_model(TrainConfig.from_dict(state["config"]), 4)
    model2.load_state_dict(state["model"])
    coarse2, plugin2 = build_plugins(cfg, 192, 4, model=model2)
    torch.nn.ModuleList([coarse2, plugin2]).load_state_dict(state["trainer"]["loss_modules"])
    for name in ("mem", "ptr", "count", "cent", "cent_ok"):
        assert torch.equal(getattr(plugin2.memory, name), getattr(plugin.memory, name))
    assert plugin2.memory is model2.feature_hooks[0].memory
    x = torch.rand(1, 3, 32, 32)
    model.eval(), model2.eval()
    with torch.no_grad():
        assert torch.equal(model.encode(x).tokens, model2.encode(x).tokens)


def test_contrast_only_needs_no_hook():
    from toco.build import build_model
    from toco.plugins import build_plugins

    cfg = tiny_cfg(rca_aggregation=False)
    model = build_model(cfg, 4)
    assert len(model.feature_hooks) == 0
    plugin = build_plugins(cfg, 192, 4, model=model)[-1]
    assert isinstance(plugin.memory, RCAMemory)


def _gather_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from toco.distributed import DistInfo, all_gather_cat

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(100 + rank)  # different data on every rank
    mem = RCAMemory(2, 3, 2, num_centroids=1)
    info = DistInfo(rank, world, rank)
    for _ in range(3):
        emb, ok = torch.randn(2, 2, 2), torch.rand(2, 2) > 0.3
        mem.enqueue(all_gather_cat(emb, info), all_gather_cat(ok, info))
    mem.refresh_centroids(2, seed=7)
    torch.save({k: v for k, v in mem.state_dict().items()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_memory_is_identical_on_every_rank(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children need no fresh interpreter (spawn would re-import torch, ~10 s each)
    mp.start_processes(_gather_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="fork")
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert a["count"].sum() > 0


def test_rca_trains_through_the_cli_and_evaluates_with_its_memory(tmp_path):
    import evaluate
    import train
    from tests.fixtures import make_standard_voc_tree
    from tests.test_cli import run, train_args

    root = make_standard_voc_tree(tmp_path / "VOC2012")
    work = tmp_path / "run"
    assert (
        run(
            train,
            train_args(
                root,
                work,
                "--max-iters",
                "4",
                "--rca",
                "--plugin-start-iter",
                "0",
                "--rca-enqueue-thr",
                "0",
                "--rca-min-fill",
                "0",
                "--rca-min-tokens",
                "1",
                "--rca-mask-source",
                "cam_mean",
                "--rca-kmeans-every",
                "2",
                "--rca-dim",
                "16",
                "--rca-mem-size",
                "8",
                "--rca-num-centroids",
                "2",
                "--eval-every",
                "4",
                "--log-every",
                "1",
                "--threads",
                "1",
            ),
        )
        == 0
    )
    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    rca = [r["rca"] for r in records if "rca" in r]
    assert len(rca) == 4 and all(math.isfinite(v) for v in rca) and rca[-1] > 0
    ckpt = load_checkpoint(work / "checkpoints" / "last.pt")
    assert int(ckpt["model"]["feature_hooks.0.memory.count"].sum()) > 0
    assert bool(ckpt["model"]["feature_hooks.0.memory.cent_ok"].any())
    out = tmp_path / "cam.json"
    assert (
        run(
            evaluate,
            [
                "--checkpoint",
                str(work / "checkpoints" / "last.pt"),
                "--mode",
                "cam",
                "--output-json",
                str(out),
            ],
        )
        == 0
    )
    assert 0 <= json.loads(out.read_text())["miou"] <= 100


def test_contrast_gradients_stay_finite_with_empty_classes():
    mem = torch.randn(3, 4, 5)
    filled = torch.zeros(3, 4, dtype=torch.bool)
    filled[1, :2] = True  # only class 1 has entries: no negatives for it, nothing for 0 and 2
    q = F.normalize(torch.randn(3, 5), dim=1).requires_grad_(True)
    own, other = contrast_per_query(
        q, [torch.tensor([0, 1, 2]), torch.tensor([1, 1, 1])], mem, filled, tau=0.07
    )
    assert own.tolist() == [0.0, 0.0, 0.0] and torch.allclose(other, torch.zeros(3), atol=1e-6)
    (own.sum() + other.sum()).backward()
    assert torch.isfinite(q.grad).all()


def test_projection_head_is_trained_from_the_first_memory_write():
    from tests.test_ablate import TINY, batch
    from toco.build import build_loss_modules, build_model
    from toco.plugins import build_plugins
    from toco.train.engine import Trainer

    cfg = TrainConfig.from_dict(
        {
            **TINY,
            "plugins": {
                "rca": {
                    "enable": True,
                    "start_iter": 2,
                    "mask_source": "cam_mean",
                    "enqueue_thr": 0.0,
                    "min_tokens": 1,
                    "dim": 8,
                    "mem_size": 6,
                    "num_centroids": 2,
                    "kmeans_every": 1,
                }
            },
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg, 4)
    plugins = build_plugins(cfg, model.backbone.embed_dim, 4, model=model)
    trainer = Trainer(cfg, model, build_loss_modules(cfg) + plugins, torch.device("cpu"))
    rca = plugins[-1]
    for it in range(2):  # before the start: no write, no centroid, the head untouched
        assert "rca" not in trainer.train_step(batch(it), it)
        assert int(rca.memory.count.sum()) == 0 and not rca.memory.cent_ok.any()
        grad = rca.proj.fc1.weight.grad  # None, or zeros where dormant terms take AdamW steps
        assert grad is None or not grad.any()
    logged = trainer.train_step(batch(2), 2)
    assert int(rca.memory.count.sum()) > 0  # the first write ...
    assert logged["rca"] > 0  # ... and, in the same step, a contrast against it
    assert rca.proj.fc1.weight.grad.abs().sum() > 0
    assert rca.proj.fc2.weight.grad.abs().sum() > 0


def test_contrast_is_taken_against_the_memory_after_the_write():
    class State:  # just what RegionalContrast.compute reads with cam_thr masks
        iteration = 0
        cls_label = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        logits = torch.full((2, 2), 5.0)
        cam = torch.zeros(2, 2, 4, 4)
        cam_aux = cam

    State.cam[0, 0, :2], State.cam[1, 1, 2:] = 1.0, 1.0
    torch.manual_seed(1)
    tokens = torch.randn(2, 6, 2, 2)
    State.feats = EncoderOutput(torch.zeros(2, 6), tokens, tokens)
    rca = RegionalContrast(
        6,
        3,
        RCAMemory(2, 4, 4, 1),
        dim=4,
        mask_source="cam_thr",
        high_thre=0.5,
        min_tokens=1,
        mixup_p=0.0,
        enqueue_score="logits",
    )
    loss = rca.compute(State)["rca"]
    g = rca.proj(tokens)  # (B, h, w, d); regions: row 0 of image 0, row 1 of image 1
    z = F.normalize(torch.stack([g[0, 0].mean(0), g[1, 1].mean(0)]), dim=-1)
    assert torch.allclose(rca.memory.mem[[0, 1], 0], z.detach(), atol=1e-6)
    # one entry per class: each region's only positive is itself, its negative the other
    s = (z @ z.t()).detach() / 0.07
    expected = torch.stack(
        [torch.logaddexp(s[0, 0], s[0, 1]) - s[0, 0], torch.logaddexp(s[1, 1], s[1, 0]) - s[1, 1]]
    ).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_aggregation_can_rewrite_only_the_decoder_input():
    from toco.build import build_model
    from toco.plugins import build_plugins
    from toco.plugins.rca import AggregatedDecoder

    torch.manual_seed(6)
    cfg = tiny_cfg(rca_aggregation_insert="decoder", rca_fusion="gate")
    model = build_model(cfg, 4)
    assert len(model.feature_hooks) == 0 and isinstance(model.decoder, AggregatedDecoder)
    plugin = build_plugins(cfg, 192, 4, model=model)[-1]
    assert plugin.memory is model.decoder.aggregation.memory
    plugin.memory.enqueue(F.normalize(torch.randn(5, 3, 8), dim=-1), torch.ones(5, 3).bool())
    plugin.memory.refresh_centroids(2, seed=0)
    with torch.no_grad():
        model.decoder.aggregation.gate.fill_(0.5)
    torch.manual_seed(6)
    plain = build_model(tiny_cfg(rca=False), 4)
    plain.load_state_dict(
        {
            k.replace("decoder.decoder.", "decoder."): v
            for k, v in model.state_dict().items()
            if not k.startswith("decoder.aggregation.")
        }
    )
    model.eval(), plain.eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        feats, plain_feats = model.encode(x), plain.encode(x)
        assert torch.equal(feats.tokens, plain_feats.tokens)  # CAMs and PTC see plain tokens
        agg = model.decoder.aggregation.rewrite(plain_feats.tokens)
        assert not torch.equal(agg, plain_feats.tokens)
        assert torch.allclose(model(x), plain.decoder(agg), atol=1e-6)


def test_concat_fusion_is_the_identity_until_the_first_centroids():
    torch.manual_seed(7)
    mem = RCAMemory(3, 6, 4, 2)
    hook = RCAAggregation(8, mem)  # default: the official concat + 1x1 fusion
    assert hook.fusion == "concat" and not hasattr(hook, "gate")
    with torch.no_grad():  # whatever the fusion weights, no centroid -> the input itself
        hook.fuse.weight.normal_()
    tokens = torch.randn(2, 8, 3, 3, requires_grad=True)
    out = hook(EncoderOutput(torch.zeros(2, 8), tokens, tokens)).tokens
    assert torch.equal(out, tokens)
    out.sum().backward()
    assert torch.equal(tokens.grad, torch.ones_like(tokens))
    # with centroids: X' = W_f [X; O] + b_f, O = Out(softmax(Q K^T / sqrt(d)) V)
    mem.enqueue(F.normalize(torch.randn(6, 3, 4), dim=-1), torch.ones(6, 3, dtype=torch.bool))
    mem.refresh_centroids(3, seed=0)
    x = tokens.detach().flatten(2).transpose(1, 2)
    u = mem.cent.reshape(-1, 4)
    o = hook.out(((hook.q(x) @ hook.k(u).t()) / 2.0).softmax(-1) @ hook.v(u))
    want = torch.cat([x, o], dim=-1) @ hook.fuse.weight.t() + hook.fuse.bias
    got = hook.rewrite(tokens.detach()).flatten(2).transpose(1, 2)
    np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), rtol=1e-4, atol=1e-5)
    # initialised to [I, 0]: the first centroids do not change the features
    fresh = RCAAggregation(8, mem)
    assert torch.allclose(fresh.rewrite(tokens.detach()), tokens.detach(), atol=1e-6)


def test_default_model_aggregation_equals_its_input_before_the_first_refresh():
    from toco.build import build_model

    torch.manual_seed(2)
    cfg = tiny_cfg()  # defaults: concat fusion, aggregation before the classifier
    assert cfg.plugins.rca.fusion == "concat"
    model = build_model(cfg, 4).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        feats = model.encode(x)
        assert torch.equal(feats.tokens, feats.raw_tokens)


def test_coarse_head_loss_masks_and_cam_gap_enqueue_by_hand():
    from toco.method.losses import multilabel_loss
    from toco.plugins.rca import COARSE_CAM, RCACoarseHead, region_masks

    torch.manual_seed(8)
    tokens = torch.randn(2, 6, 3, 3)
    head = RCACoarseHead(6, 4)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])

    class State:
        iteration = 0
        cls_label = y
        feats = EncoderOutput(torch.zeros(2, 6), tokens, tokens)
        extras: dict = {}

    loss = head.compute(State)["rca_coarse"]
    a0 = torch.einsum("kd,bdhw->bkhw", head.classifier.weight[:, :, 0, 0], tokens)
    assert torch.allclose(State.extras[COARSE_CAM], a0, atol=1e-6)
    assert float(loss) == pytest.approx(float(multilabel_loss(a0.mean(dim=(-2, -1)), y)), rel=1e-6)
    masks = region_masks("coarse_mean", State, (3, 3), 0.7)
    p = a0.softmax(dim=1)
    for b in range(2):
        for k in range(3):
            for i in range(3):
                for j in range(3):
                    assert bool(masks[b, k, i, j]) == bool(p[b, k, i, j] > p[b, k].mean())

    # enqueue score: sigmoid(GAP of the final CAM) > thr (official), not the max-pooled logits
    from models.heads import CAMClassifier

    class Net:
        classifier = CAMClassifier(6, 3)

    State.model = Net
    State.logits = torch.full((2, 3), 10.0)  # would enqueue everything
    rca = RegionalContrast(6, 4, RCAMemory(3, 4, 4, 1), dim=4, min_tokens=1, contrast=False)
    rca.compute(State)
    gap = Net.classifier.cam(tokens).mean(dim=(-2, -1))
    ok = (y > 0) & (masks.sum(dim=(-2, -1)) >= 1) & (torch.sigmoid(gap) > 0.7)
    assert rca.memory.count.tolist() == ok.sum(dim=0).tolist()


def _loop_infonce(q, target, mem, tau):
    """L(q, t) = mean_{j in M_t} [-s_j + log(exp(s_j) + sum_{n not in M_t} exp(s_n))]."""
    m = F.normalize(mem, dim=-1)
    pos = [float(q @ m[target, j]) / tau for j in range(m.shape[1])]
    neg = [
        float(q @ m[c, j]) / tau
        for c in range(m.shape[0])
        if c != target
        for j in range(m.shape[1])
    ]
    return sum(-s + math.log(math.exp(s) + sum(math.exp(n) for n in neg)) for s in pos) / len(pos)


def test_mixup_combination_against_a_loop():
    """Official mixup: partner image perm(b), a random usable class of it, lambda ~ Beta(8, 8)
    always; loss lambda L(q, c) + (1 - lambda) L(q, c') with q = normalise(lambda r + (1 -
    lambda) r'), mean over the usable regions."""
    torch.manual_seed(9)
    b, k, d = 3, 3, 4
    mem = RCAMemory(k, 5, d, 1)
    mem.enqueue(F.normalize(torch.randn(5, k, d), dim=-1), torch.ones(5, k, dtype=torch.bool))
    rca = RegionalContrast(6, k + 1, mem, dim=d, seed=3)
    assert (rca.mixup_p, rca.mixup_partner) == (1.0, "image")
    r = F.normalize(torch.randn(b, k, d), dim=-1)
    region_ok = torch.tensor([[True, False, True], [False, True, False], [True, True, True]])
    it = 4
    partner, lam = rca.mixup_plan(region_ok, it)
    got = rca._contrast(r, region_ok, it)
    # the plan: every region of image i mixes with a usable region of one image perm(i)
    flat_ok = region_ok.reshape(-1)
    for i in range(b):
        images = {int(partner[i * k + c]) // k for c in range(k)}
        assert len(images) == 1
    assert flat_ok[partner].all() and ((lam > 0) & (lam < 1)).all()
    flat = r.reshape(b * k, d)
    expected = []
    for i in range(b * k):
        if not flat_ok[i]:
            continue
        j, l_ = int(partner[i]), float(lam[i])
        q = F.normalize(l_ * flat[i] + (1 - l_) * flat[j], dim=0)
        expected.append(
            l_ * _loop_infonce(q, i % k, mem.mem, 0.07)
            + (1 - l_) * _loop_infonce(q, j % k, mem.mem, 0.07)
        )
    assert float(got) == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    # the permutation varies with the step; the same step draws the same plan
    assert torch.equal(rca.mixup_plan(region_ok, it)[0], partner)


def test_a_stored_config_from_before_the_official_pieces_builds_the_earlier_rca():
    """A checkpoint config without the settings added since keeps the behaviour it was trained
    with: gated fusion, no coarse head, enqueue on ToCo's logits, region mixup partners."""
    from toco.build import build_model
    from toco.plugins import build_plugins

    stored = tiny_cfg(rca_mask_source="pseudo_label", rca_mixup_p=0.5).to_dict()
    for key in (
        "fusion",
        "coarse_head",
        "w_coarse",
        "coarse_pool",
        "enqueue_score",
        "mixup_partner",
    ):
        del stored["plugins"]["rca"][key]
    cfg = TrainConfig.from_saved(stored)
    s = cfg.plugins.rca
    assert (s.fusion, s.coarse_head, s.enqueue_score, s.mixup_partner) == (
        "gate",
        False,
        "logits",
        "region",
    )
    model = build_model(cfg, 4)
    assert hasattr(model.feature_hooks[0], "gate")
    (rca,) = build_plugins(cfg, 192, 4, model=model)
    assert (rca.mask_source, rca.mixup_p, rca.enqueue_score) == ("pseudo_label", 0.5, "logits")
