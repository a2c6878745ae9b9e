"""Host lists onto the device without a synchronisation."""

import pytest
import torch

from rlhf_kit.models.transfer import batch_to_device, host_tensor

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.float32])
def test_host_tensor_holds_the_values_on_the_device_without_a_sync(dtype):
    """The values, dtype and device of ``torch.tensor(values, device=...)``; on CUDA under sync debug mode
    "error", which raises for a copy that makes the host wait (``torch.tensor(values, device="cuda")``
    does)."""
    values = [3, 0, 5, 2]
    if DEVICE == "cuda":
        with pytest.raises(RuntimeError, match="synchroniz"):
            torch.cuda.set_sync_debug_mode("error")
            try:
                torch.tensor(values, dtype=dtype, device=DEVICE)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        torch.cuda.set_sync_debug_mode("error")
    try:
        got = host_tensor(values, DEVICE, dtype)
    finally:
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    assert got.device.type == DEVICE and got.dtype == dtype
    assert got.tolist() == torch.tensor(values, dtype=dtype).tolist()
    assert host_tensor([1.5], "cpu").dtype == torch.float32  # dtype inferred as torch.tensor does


def test_host_tensor_takes_a_cpu_tensor():
    idx = torch.tensor([2, 0, 1])
    got = host_tensor(idx, DEVICE, torch.long)
    assert got.device.type == DEVICE and got.tolist() == [2, 0, 1]
    assert host_tensor(torch.tensor([1, 2], dtype=torch.int32), "cpu", torch.long).dtype == torch.long


def test_rollout_minibatches_wait_for_the_device_once_each():
    """A mini-batch of a rollout on the device: its index goes over once, without a wait, and trimming its
    response columns reads the device once (it indexed each of the 11 fields with a host index before,
    each a copy the host waited for, then trimmed with two reads). The same samples as indexing on the host;
    on CUDA, sync debug mode counts the waits."""
    import warnings

    from rlhf_kit.rollout import RolloutBuffer
    from tests.unit.test_rollout import make_rollout

    r = make_rollout(6, 3, 5, fill=4, resp_len=[5, 2, 1, 3, 2, 1])
    host_buf, dev_buf = RolloutBuffer(seed=0), RolloutBuffer(seed=0)
    host_buf.set_data(r)
    dev_buf.set_data(r.to(DEVICE))
    want = [mb.sequences.tolist() for mb in host_buf.minibatches(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            got = list(dev_buf.minibatches(3))
        finally:
            if DEVICE == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    assert [mb.sequences.tolist() for mb in got] == want
    # each trimmed to its own longest response (the responses here are prefixes of their rows)
    assert [mb.response_mask.shape[1] for mb in got] == [int(mb.response_mask.sum(1).max()) for mb in got]
    assert sorted(w for mb in got for w in mb.response_mask.sum(1).tolist()) == [1, 1, 2, 2, 3, 5]
    if DEVICE == "cuda":
        waits = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(waits) == 2, [str(w.message) for w in waits]  # one read per mini-batch


def test_batch_to_device_moves_every_tensor_and_keeps_other_values():
    batch = {"input_ids": torch.tensor([[1, 2]]), "labels": torch.tensor([[-100, 2]]), "max_length": 2}
    got = batch_to_device(batch, DEVICE)
    assert got.keys() == batch.keys() and got["max_length"] == 2
    for k in ("input_ids", "labels"):
        assert got[k].device.type == DEVICE and torch.equal(got[k].cpu(), batch[k])
