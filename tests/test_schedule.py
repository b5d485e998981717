"""Poly-with-warm-up LR (S1.5) against the LRs read from the reference logs."""

import pytest
import torch

from toco.train.schedule import build_poly_warmup_scheduler, poly_warmup_factor

BASE = 6e-5
# t -> (VOC max 20k, COCO max 80k), spec 1.5 table; the last row is t = max - 1.
TABLE = {
    0: (6e-11, 6e-11),
    199: (7.960e-06, 7.960e-06),
    1499: (5.996e-05, 5.996e-05),
    1500: (5.593e-05, 5.899e-05),
    1999: (5.457e-05, 5.865e-05),
    9999: (3.216e-05, 5.321e-05),
    "final": (8.077e-09, 2.319e-09),
}


@pytest.mark.parametrize("col,max_iters", [(0, 20000), (1, 80000)])
def test_factor_matches_spec_table(col, max_iters):
    for t, row in TABLE.items():
        step = max_iters - 1 if t == "final" else t
        lr = BASE * poly_warmup_factor(step, 1500, max_iters)
        assert lr == pytest.approx(row[col], rel=6e-4), t


def test_factor_edges_by_hand():
    assert poly_warmup_factor(0, 10, 100, warmup_ratio=0.1) == pytest.approx(0.1)
    assert poly_warmup_factor(5, 10, 100, warmup_ratio=0.1) == pytest.approx(1 - 0.5 * 0.9)
    assert poly_warmup_factor(10, 10, 100, power=1.0) == pytest.approx(0.9)  # not shifted
    assert poly_warmup_factor(100, 10, 100) == 0.0
    assert poly_warmup_factor(150, 10, 100) == 0.0
    assert poly_warmup_factor(0, 0, 100) == 1.0


@pytest.mark.parametrize("col,max_iters", [(0, 20000), (1, 80000)])
def test_adamw_scheduler_lr_used_by_step_t(col, max_iters):
    p1 = torch.nn.Parameter(torch.zeros(2))
    p2 = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW(
        [{"params": [p1], "lr": BASE}, {"params": [p2], "lr": 10 * BASE}],
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.01,
    )
    sched = build_poly_warmup_scheduler(opt, 1500, max_iters)
    wanted = {max_iters - 1 if t == "final" else t: row[col] for t, row in TABLE.items()}
    wanted_steps = sorted(wanted)
    seen = {}
    for t in range(wanted_steps[-1] + 1):
        if t in wanted:  # the LR this optimizer step will use
            seen[t] = (opt.param_groups[0]["lr"], opt.param_groups[1]["lr"])
        if t in wanted or t + 1 in wanted:  # a real step only where it is checked (keeps it fast)
            p1.grad = torch.ones(2)
            p2.grad = torch.ones(2)
            opt.step()
        sched.step()
    for t in wanted_steps:
        assert seen[t][0] == pytest.approx(wanted[t], rel=6e-4), t
        assert seen[t][1] == pytest.approx(10 * wanted[t], rel=6e-4), t
