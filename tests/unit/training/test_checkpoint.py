import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from rlhf_kit.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from rlhf_kit.training.optim import build_optimizer, cosine_schedule

TOTAL = 12


def make_objects(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 1))
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    sched = cosine_schedule(opt, warmup_steps=3, total_steps=TOTAL, min_lr=1e-3)
    return model, opt, sched


def train(model, opt, sched, steps, losses):
    for _ in range(steps):
        # Data drawn from every RNG, so a resume is only exact if all of them are restored.
        x = torch.randn(8, 6) + float(np.random.rand()) + random.random()
        y = x.sum(-1, keepdim=True).sin()
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())


def seed_all(s):
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def test_resume_is_bitwise_identical(tmp_path):
    n = TOTAL // 2
    model, opt, sched = make_objects()
    seed_all(1)
    ref_losses: list[float] = []
    train(model, opt, sched, 2 * n, ref_losses)

    m1, o1, s1 = make_objects()
    seed_all(1)
    losses: list[float] = []
    train(m1, o1, s1, n, losses)
    save_checkpoint(
        tmp_path,
        n,
        models={"policy": m1},
        optimizers={"policy": o1},
        schedulers={"policy": s1},
        extra={"data_position": n, "kl": {"coef": torch.tensor(0.05)}},
    )
    torch.rand(100)  # disturb every RNG between save and load
    np.random.rand(3)
    random.random()

    m2, o2, s2 = make_objects(seed=123)  # fresh objects with different weights
    step, extra = load_checkpoint(
        tmp_path, models={"policy": m2}, optimizers={"policy": o2}, schedulers={"policy": s2}
    )
    assert step == n and extra["data_position"] == n and torch.equal(extra["kl"]["coef"], torch.tensor(0.05))
    train(m2, o2, s2, n, losses)
    assert losses == ref_losses
    for a, b in zip(model.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert s2.get_last_lr() == sched.get_last_lr()


def test_layout_latest_pointer_and_keep_last(tmp_path):
    model, opt, sched = make_objects()
    for step in (2, 4, 6):
        path = save_checkpoint(
            tmp_path, step, models={"m": model}, optimizers={"m": opt}, schedulers={"m": sched}, keep_last=2
        )
        assert path == tmp_path / f"step_{step}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_4", "step_6"]
    assert (tmp_path / "latest").read_text().strip() == "step_6"
    assert latest_checkpoint(tmp_path) == tmp_path / "step_6"
    ck = tmp_path / "step_6"
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["step"] == 6 and meta["models"] == ["m"] and meta["world_size"] == 1
    weights = load_file(str(ck / "models" / "m" / "model.safetensors"))
    assert set(weights) == set(model.state_dict())
    assert (ck / "optimizers" / "m.pt").is_file() and (ck / "schedulers" / "m.pt").is_file()
    assert (ck / "rng" / "rank_0.pt").is_file()
    assert not list(tmp_path.glob(".*"))  # no temp leftovers
    # re-saving an existing step replaces it
    save_checkpoint(tmp_path, 6, models={"m": model})
    assert json.loads((ck / "meta.json").read_text())["optimizers"] == []


def test_incomplete_checkpoints_are_ignored(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    model = nn.Linear(2, 2)
    save_checkpoint(tmp_path, 3, models={"m": model})
    # a crash mid-save leaves only a temp dir, and a step dir without meta.json is not complete
    (tmp_path / ".step_9.tmp" / "models").mkdir(parents=True)
    (tmp_path / "step_8").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_3"
    (tmp_path / "latest").unlink()  # pointer lost: fall back to the newest complete step dir
    assert latest_checkpoint(tmp_path) == tmp_path / "step_3"
    with pytest.raises(ValueError, match="no checkpoint found"):
        load_checkpoint(tmp_path / "missing", models={"m": model})
    with pytest.raises(ValueError, match="no optimizers named"):
        load_checkpoint(
            tmp_path, models={"m": model}, optimizers={"m": torch.optim.SGD(model.parameters(), 0.1)}
        )


def test_tied_weights_and_rng_roundtrip(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.out = nn.Linear(3, 5, bias=False)
            self.out.weight = self.emb.weight

    a, b = Tied(), Tied()
    save_checkpoint(tmp_path, 1, models={"m": a}, rng=False)
    load_checkpoint(tmp_path, models={"m": b}, rng=False)
    assert torch.equal(a.emb.weight, b.emb.weight) and b.out.weight is b.emb.weight
    assert not (tmp_path / "step_1" / "rng" / "rank_0.pt").exists()

    state = rng_state()
    x = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_state(state)
    y = (random.random(), np.random.rand(), torch.rand(2))
    assert x[0] == y[0] and x[1] == y[1] and torch.equal(x[2], y[2])
