"""The critic and the reward model served from a separate job, as NeMo-Aligner's critic server does.

The actor job keeps the actor and the reference; a server job holds the critic (with its optimizer and
LR schedule) and the reward model. Per PPO step each actor rank sends::

    make_experience(..., remote=client)       POST /infer   values (b, n) and RM scores (b,)
    fut = client.submit_train_rollout(rollout, cfg, seed, rank=r, world_size=w)
                                              POST /train   the critic half of ppo_update, on the server,
    ppo_update(..., UpdateConfig(train_critic=False))       while the actor-only update runs locally
    stats |= fut.result()
    client.save(path) / client.load(path)     POST /save, /load   exact-resume state, next to the actor's

The server trains with :func:`rlhf_kit.ppo.ppo_update` itself (critic-only) once per global batch of
all ranks' shares, seeded like the actor job's buffers, so the critic ends with the weights a local run
gives. Modules: :mod:`~rlhf_kit.serving.wire` (message format, request checks),
:mod:`~rlhf_kit.serving.store` (confined checkpoint paths), :mod:`~rlhf_kit.serving.service` (the
models), :mod:`~rlhf_kit.serving.server` (starlette/uvicorn: auth, limits, global batches),
:mod:`~rlhf_kit.serving.client` (:class:`RemoteCritic`). Threat model: docs/server.md.
"""

from rlhf_kit.serving.client import TOKEN_ENV, CriticServerError, RemoteCritic, connect_critic_server
from rlhf_kit.serving.server import CriticServer, is_loopback
from rlhf_kit.serving.service import CriticRewardService, TrainShare
from rlhf_kit.serving.store import MARKER, CheckpointStore
from rlhf_kit.serving.wire import check_batch, decode, encode

__all__ = [
    "MARKER",
    "TOKEN_ENV",
    "CheckpointStore",
    "CriticRewardService",
    "CriticServer",
    "CriticServerError",
    "RemoteCritic",
    "TrainShare",
    "check_batch",
    "connect_critic_server",
    "decode",
    "encode",
    "is_loopback",
]
