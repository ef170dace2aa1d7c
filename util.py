"""Small helpers every module shares: the error a user sees and the guard that turns known failures (a full
or read-only disk, text that is not UTF-8, out of memory) into it, atomic file writes, the default device,
freeing GPU memory, and which process of a torchrun job this is. Nothing here knows about FLUX.2."""
import argparse
import errno
import gc
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

GiB = 2**30


class LoadError(ValueError):
    """A file, folder or flag this run cannot use; the message names it and the fix (the CLIs print it, exit 2)."""


# OS errors a user can fix: errno -> (the cause in words, the fix)
OS_CAUSES = {
    errno.ENOSPC: ("no space left on the disk", "free some space or write elsewhere"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or write elsewhere"),
    errno.EFBIG: ("file too large for this file system", "write elsewhere"),
    errno.EROFS: ("read-only file system", "write to a writable folder"),
    errno.EACCES: ("permission denied", "fix the permissions or write elsewhere"),
    errno.EPERM: ("permission denied", "fix the permissions or write elsewhere"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.ENOTDIR: ("a part of the path is not a folder", "check the path"),
    errno.EISDIR: ("is a folder, not a file", "name a file"),
    errno.EEXIST: ("is a file, not a folder", "name a folder"),     # mkdir on a file
}


def os_error_line(e: OSError) -> str:
    """An OSError as one line: the path, the cause in words (a full disk names its folder) and
    the fix."""
    cause, fix = OS_CAUSES.get(e.errno, (e.strerror or str(e), "check the path"))
    where = e.filename if e.filename is not None else "a file"
    if e.errno in (errno.ENOSPC, errno.EDQUOT) and e.filename is not None:
        cause = f"{cause} of {Path(e.filename).parent}"
    return f"{where}: {cause}; {fix}"


def read_text(path) -> str:
    """A UTF-8 text file's contents; LoadError naming the file when it is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LoadError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                        f"{e.start}); save it as UTF-8") from None


def check_writable(folder, *, flag: str) -> None:
    """Create `folder` if needed and write a probe file in it, so an unwritable output ends the
    run before anything heavy loads; LoadError naming the flag and the cause."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        e.filename = e.filename or str(folder)
        raise LoadError(f"{flag} {os_error_line(e)}") from None


def check_free_space(folder, *, needed: int, flag: str) -> None:
    """LoadError naming the flag when the disk of `folder` has less than `needed` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise LoadError(f"{flag} {folder}: {free / GiB:.2f} GiB free but a checkpoint needs "
                        f"about {needed / GiB:.2f} GiB; free some space or pass another {flag}")


def guard(body: Callable[[], int], *, user_errors: tuple[type, ...] = (),
          say: Callable[[str], None] | None = None) -> int:
    """Run a CLI's body and return its exit code; a failure of a known kind (LoadError or one of
    `user_errors`, an OSError a user can fix, running out of GPU memory) ends in one `error:` line
    via `say` and exit code 2. Anything else is a bug and keeps its traceback."""
    say = say or (lambda message: print(f"error: {message}", file=sys.stderr))
    try:
        return body()
    except (LoadError, *user_errors) as e:
        say(str(e))
    except OSError as e:
        if e.errno not in OS_CAUSES:
            raise
        say(os_error_line(e))
    except torch.OutOfMemoryError:
        say("out of GPU memory; lower --batch-size or --resolution, set --gpu-memory-limit a "
            "few GiB below what is free, or pass --offload stream")
    return 2


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
    except OSError as e:
        e.filename = str(path)          # the file the user asked for, not the temp file
        raise
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
