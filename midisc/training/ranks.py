"""Which process of a distributed job this is, read before Lightning starts one.

Lightning's DDP launcher starts the ranks after the first: each reruns `python -m midisc.train` with the same
overrides and LOCAL_RANK (NODE_RANK on other nodes) in its environment; torchrun and SLURM set RANK for
every process. Everything before `trainer.fit` (config checks, the run's row, the harvest) runs in each of
them, so the ranks after the first must know they are such a rank: they write no rows and no files (only
rank 0 records the run), and they mark the run failed when they crash, since rank 0 is then stopped without
a chance to (Lightning's launcher kills it) or waits in a collective until `ddp_timeout`.
"""

from __future__ import annotations

import os

RUN_ID_ENV = "MIDISC_DDP_RUN_ID"  # rank 0 leaves its run id here for the ranks it launches


def _env_int(*names: str) -> int:
    for name in names:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def rank_name() -> str:
    """This process's place as its launcher set it: 'rank 0' in a process a user started, 'rank 1' in one
    Lightning launched beside it, 'node 1 local rank 0' on another node."""
    if os.environ.get("RANK", "").isdigit():
        return f"rank {os.environ['RANK']}"
    node, local = _env_int("NODE_RANK", "GROUP_RANK"), _env_int("LOCAL_RANK")
    return f"node {node} local rank {local}" if node else f"rank {local}"


def is_secondary() -> bool:
    """A rank after the first of a distributed job: it trains its share and records nothing."""
    if os.environ.get("RANK", "").isdigit():
        return int(os.environ["RANK"]) != 0
    return _env_int("NODE_RANK", "GROUP_RANK") != 0 or _env_int("LOCAL_RANK") != 0


def run_id_of_job() -> int | None:
    """The run rank 0 recorded, in a rank it launched; None elsewhere (torchrun starts every rank at once)."""
    value = os.environ.get(RUN_ID_ENV, "")
    return int(value) if value.isdigit() else None


class RankFailed(RuntimeError):
    """Another rank of a distributed run failed, and this one lost it; the message (one line) says which and why."""


# What torch.distributed says when a peer is gone: gloo's errors are plain RuntimeErrors naming their transport.
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL", "timed out", "Timed out")


def lost_a_rank(error: BaseException) -> bool:
    """Whether `error` is a collective operation failing because another rank crashed or stopped answering."""
    import torch.distributed as dist

    return isinstance(error, getattr(dist, "DistError", ())) or (
        isinstance(error, RuntimeError) and any(sign in str(error) for sign in LOST_PEER))
