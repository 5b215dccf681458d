"""Process-group helpers so one code path serves a single process and ``torchrun`` (DDP).

transformers' ``Trainer`` opens the process group when ``torchrun`` starts several ranks; these helpers let
the rest of the job agree on who writes files, and close the group cleanly: a gloo/NCCL group left open at
interpreter exit can abort the process ("terminate called without an active exception").
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

import torch.distributed as dist

log = logging.getLogger(__name__)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 when not distributed, also before the group is opened)."""
    return dist.get_rank() if active() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if active() else int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


@contextmanager
def main_process_writes() -> Iterator[bool]:
    """``with main_process_writes() as writer:`` -- only rank 0 gets ``writer`` True; every rank
    leaves the block after rank 0 finished writing (so all of them can read the result)."""
    try:
        yield is_main_process()
    finally:
        barrier()


def shutdown() -> None:
    """Close the process group if one is open (all ranks meet first, so none tears down a peer's socket)."""
    if active():
        log.debug("rank %d: closing the process group", rank())
        dist.barrier()
        dist.destroy_process_group()
