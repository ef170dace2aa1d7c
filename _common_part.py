"""Streaming safetensors loading shared by every FLUX.2 component (DiT, VAE, text encoder).

Models are built on the meta device (no memory), then each tensor is read from disk one at a time,
cast, moved to its final device and assigned in place, so host memory never holds two copies.
"""
import json
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn


class LoadError(ValueError):
    """A checkpoint or input that does not fit; the message names the file and the fix."""


def safetensors_files(path) -> list[Path]:
    """The .safetensors files behind `path`: one file, a folder with an index JSON, or a folder of files."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise LoadError(f"{path}: no such file or folder")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise LoadError(f"{f}: shard listed in {indexes[0].name} is missing; download it again")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LoadError(f"{path}: no .safetensors files in this folder")
    return files


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
        raise LoadError(f"{file}: not a readable safetensors file ({e}); the download may be truncated") from None


def read_keys(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every key in `files` with its shape, read from the headers only."""
    shapes = {}
    for file in files:
        with _open(file) as f:
            for k in f.keys():
                shapes[k] = tuple(f.get_slice(k).get_shape())
    return shapes


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) from `files` one tensor at a time."""
    for file in files:
        with _open(file) as f:
            for k in f.keys():
                try:
                    yield k, f.get_tensor(k)
                except Exception as e:
                    raise LoadError(f"{file}: tensor {k!r} cannot be read ({e}); the file may be truncated") from None


def assign_weights(model: nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]], *, device, dtype,
                   source, what: str = "model") -> nn.Module:
    """Assign (name, tensor) pairs into a meta-device `model`, checking every name and shape."""
    slots = {}  # name -> (owning module, attribute, is_parameter)
    for mod_name, mod in model.named_modules():
        for attr, p in list(mod._parameters.items()) + list(mod._buffers.items()):
            if p is not None:
                slots[f"{mod_name}.{attr}" if mod_name else attr] = (mod, attr, attr in mod._parameters)
    done = set()
    for name, t in named_tensors:
        if name not in slots:
            raise LoadError(f"{source}: unexpected key {name!r} for {what}; is this the right file?")
        mod, attr, is_param = slots[name]
        old = getattr(mod, attr)
        if tuple(old.shape) != tuple(t.shape):
            raise LoadError(f"{source}: {name} has shape {tuple(t.shape)}, {what} expects {tuple(old.shape)}")
        t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        if is_param:
            mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
        else:
            mod._buffers[attr] = t
        done.add(name)
    # BatchNorm's step counter is optional in files; give it a real value rather than leaving it on meta.
    for name, (mod, attr, _) in slots.items():
        if name not in done and attr == "num_batches_tracked":
            mod._buffers[attr] = torch.zeros((), dtype=torch.long, device=device)
            done.add(name)
    missing = [n for n in slots if n not in done]
    if missing:
        raise LoadError(f"{source}: {len(missing)} keys of {what} missing, e.g. {missing[:4]}; "
                        f"is the file complete and for this model?")
    return model
