import torch
from torch import nn

from rlhf_kit.training.offload import (
    model_device,
    offload_model,
    offload_optimizer_state,
    offloaded,
    onload_model,
    onload_optimizer_state,
)


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    return m


def test_cpu_model_offload_is_a_noop_that_keeps_parameters():
    m = _model()
    params = list(m.parameters())
    data_ptrs = [p.data_ptr() for p in params]
    m(torch.randn(3, 4)).sum().backward()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert offload_model(m) is m
    assert [p.data_ptr() for p in m.parameters()] == data_ptrs  # nothing copied on CPU
    assert all(a is b for a, b in zip(params, m.parameters()))
    assert all(p.grad is not None for p in m.parameters())
    onload_model(m, "cpu")
    assert model_device(m) == torch.device("cpu")
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    with offloaded(m, device="cpu"):
        y = m(torch.randn(3, 4))
    assert y.shape == (3, 1) and model_device(nn.Module()) == torch.device("cpu")


def test_optimizer_state_offload_roundtrip_keeps_training_identical():
    def run(offload):
        m = _model()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        torch.manual_seed(1)
        for _ in range(3):
            loss = m(torch.randn(5, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            if offload:
                offload_optimizer_state(opt)
                onload_optimizer_state(opt, "cpu")
            opt.step()
        return m, opt

    a, opt_a = run(False)
    b, opt_b = run(True)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    st = next(iter(opt_b.state.values()))
    assert st["exp_avg"].device.type == "cpu" and st["step"].item() == 3
