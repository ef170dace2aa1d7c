"""Small helpers every module shares: the error a user sees, atomic file writes, the default device, freeing GPU
memory, and which process of a torchrun job this is. Nothing here knows about FLUX.2."""
import argparse
import gc
import os
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

GiB = 2**30


class LoadError(ValueError):
    """A file, folder or flag this run cannot use; the message names it and the fix (the CLIs print it, exit 2)."""


def ceil_div(n: int, d: int) -> int:
    """n / d rounded up, for non-negative integers."""
    return -(-n // d)


def atomic_write(path, write: Callable[[str], None]) -> None:
    """Call write(tmp) and rename tmp onto path, so `path` is either absent, the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")    # same folder: os.replace is atomic there
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def default_device(name: str | None = None) -> torch.device:
    """The device a --device flag names, else the GPU when there is one, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def free_cuda() -> None:
    """Collect dropped Python objects and return the CUDA allocator's cached blocks, so the next model gets them."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: the process group's, or (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_rank0() -> bool:
    """Whether this process speaks for the job: rank 0 of the process group, or of torchrun before it exists."""
    return (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))) == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, so a torchrun log holds one copy of each line."""
    if is_rank0():
        print(*args, **kwargs, flush=True)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help lines that end with the flag's default, unless the text already states it (or there is none)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text
