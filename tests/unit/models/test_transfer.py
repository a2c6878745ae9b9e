"""Host lists onto the device without a synchronisation."""

import pytest
import torch

from rlhf_kit.models.transfer import host_tensor

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
