import random

import numpy as np
import torch

from rlhf_kit.training import dist as D


def test_single_process_defaults():
    assert D.world_size() == 1 and D.rank() == 0 and D.is_main_process() and not D.is_dist()
    D.barrier()  # no-op without a process group


def test_seed_everything_is_reproducible_and_rank_offset(monkeypatch):
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()

    assert D.seed_everything(7) == 7
    a = draw()
    D.seed_everything(7)
    assert draw() == a
    monkeypatch.setattr(D, "rank", lambda: 3)
    assert D.seed_everything(7) == 10
    assert draw() != a
    assert D.seed_everything(7, rank_offset=False) == 7
    assert draw() == a


def test_end_process_group_ends_a_ddp_run_cleanly_every_time(tmp_path):
    """A 2-process accelerate run (DDP over gloo) that ended its group while the wrapped model was alive
    aborted ('terminate called without an active exception') or hung at exit in about one launch in
    eight on a 2-core machine (2 of 16 with the ending of tests/unit/training/teardown_worker.py 'old';
    a CI run of the reward-model recipe hung this way). Through end_process_group, after deleting the
    model, every launch exits 0."""
    import os
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    worker = Path(__file__).with_name("teardown_worker.py")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(root)}
    env.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    for launch in range(8):
        # both ranks started here with torchrun's variables, not through its launcher (one torch import
        # less per launch); each rank's own exit status is checked
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        logs = [tmp_path / f"launch{launch}_rank{r}.log" for r in range(2)]  # files: no pipe to fill up
        files = [log.open("w") for log in logs]
        ranks = [
            subprocess.Popen([sys.executable, str(worker), "new"], cwd=root, stdout=f, stderr=subprocess.STDOUT,
                             env={**env, "MASTER_PORT": port, "RANK": str(r), "LOCAL_RANK": str(r)})
            for r, f in enumerate(files)
        ]  # fmt: skip
        deadline = time.monotonic() + 120
        try:  # until both end, one fails (the other would wait for it) or the time is up (a hang)
            while any(p.poll() is None for p in ranks) and not any(p.poll() for p in ranks):
                assert time.monotonic() < deadline, f"launch {launch} hung: {[p.poll() for p in ranks]}"
                time.sleep(0.05)
        finally:
            for proc, f in zip(ranks, files):
                if proc.poll() is None:
                    proc.kill()  # a hung rank: the test fails on the timeout, with nothing left behind
                    proc.wait()
                f.close()
        failed = [f"rank {r}: rc {p.returncode}\n{log.read_text()[-3000:]}"
                  for r, (p, log) in enumerate(zip(ranks, logs)) if p.returncode != 0]  # fmt: skip
        assert not failed, f"launch {launch}:\n" + "\n".join(failed)
