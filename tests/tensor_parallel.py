"""Runs a test function on two spawned gloo ranks and hands back what each rank returned."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

WORLD_SIZE = 2


def _rank_main(rank: int, fn: Callable[..., Any], args: tuple, folder: Path) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}",
                                         rank=rank, world_size=WORLD_SIZE)
    torch.set_num_threads(1)
    torch.save(fn(rank, WORLD_SIZE, *args), folder / f"rank{rank}.pt")
    torch.distributed.barrier()  # neither rank leaves while the other still needs it
    # Leave without tearing gloo down: its destructors race at interpreter exit now and then
    # ("terminate called without an active exception", SIGABRT) after the work is done and saved.
    os._exit(0)


def on_two_ranks(fn: Callable[..., Any], *args: Any, folder: Path) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on two gloo ranks; return each rank's result.

    ``fn`` must be a module-level function (the ranks are spawned). An exception in a rank fails
    the test with that rank's traceback.
    """
    saved = os.environ.get("GLOO_SOCKET_IFNAME")
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # the ranks talk over loopback (inherited by the spawn)
    try:
        mp.spawn(_rank_main, args=(fn, args, folder), nprocs=WORLD_SIZE, join=True)
    finally:
        if saved is None:
            del os.environ["GLOO_SOCKET_IFNAME"]
        else:
            os.environ["GLOO_SOCKET_IFNAME"] = saved
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
