"""Reading FLUX.2 weight files: safetensors streamed one tensor at a time into a model built on
the meta device (or already placed by offload.py, FSDP2 shards included), and the DiT's two file
layouts: BFL's single file and diffusers' `transformer/` folder, mapped onto BFL names by the one
diffusers <-> BFL name table (which lora.py and bench.py read too).

Follows docs/flux2_reference.md §3 (checkpoint keys; §3.4 the diffusers names). vae.py and
text_encoder.py load their own layouts with the streaming functions here.
"""
import json
import re
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from torch import Tensor, nn

from flux2 import Flux2, Flux2Config, preset_name
from util import LoadError, ceil_div


# --------------------------------------------------------------------------------------------------
# Streaming safetensors loading, shared by the DiT, the autoencoder and the text encoder.
# Models are built on the meta device (no memory); each tensor is read, cast, moved to its final
# device and assigned in place, so host memory never holds two copies.

def safetensors_files(path) -> list[Path]:
    """The .safetensors files behind `path`: one file, a folder with an index JSON, or a folder."""
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
                raise LoadError(f"{f}: shard listed in {indexes[0].name} is missing; "
                                f"download it again")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LoadError(f"{path}: no .safetensors files in this folder")
    return files


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except Exception as e:  # safetensors has its own error types for truncated or corrupt headers
        raise LoadError(f"{file}: not a readable safetensors file ({e}); "
                        f"the download may be truncated") from None


def read_keys(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every key in `files` with its shape, read from the headers only."""
    shapes = {}
    for file in files:
        with _open(file) as f:
            for k in f.keys():
                shapes[k] = tuple(f.get_slice(k).get_shape())
    return shapes


def iter_tensors(files: list[Path], keep=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) from `files` one tensor at a time; `keep(key)` False skips a tensor
    without reading it."""
    for file in files:
        with _open(file) as f:
            for k in f.keys():
                if keep is not None and not keep(k):
                    continue
                try:
                    yield k, f.get_tensor(k)
                except Exception as e:
                    raise LoadError(f"{file}: tensor {k!r} cannot be read ({e}); "
                                    f"the file may be truncated") from None


def _checked(named_tensors: Iterable[tuple[str, Tensor]], shapes: dict[str, tuple], *, source,
             what: str, optional=(), once: bool = False) -> Iterator[tuple[str, Tensor]]:
    """The (name, tensor) pairs, each checked to be a name of `shapes` (at most once, if `once`)
    with that shape; at the end, every name but the `optional` ones must have come. LoadError
    naming the file otherwise."""
    done = set()
    for name, t in named_tensors:
        if name not in shapes or (once and name in done):
            raise LoadError(f"{source}: unexpected key {name!r} for {what}; "
                            f"is this the right file?")
        if tuple(shapes[name]) != tuple(t.shape):
            raise LoadError(f"{source}: {name} has shape {tuple(t.shape)}, "
                            f"{what} expects {tuple(shapes[name])}")
        done.add(name)
        yield name, t
    missing = [n for n in shapes if n not in done and n not in optional]
    if missing:
        raise LoadError(f"{source}: {len(missing)} keys of {what} missing, e.g. {missing[:4]}; "
                        f"is the file complete and for this model?")


def assign_weights(model: nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]], *, device,
                   dtype, source, what: str = "model") -> nn.Module:
    """Assign (name, tensor) pairs into a meta-device `model`, checking every name and shape."""
    slots = {}  # name -> (owning module, attribute, is_parameter)
    for mod_name, mod in model.named_modules():
        for attr, p in list(mod._parameters.items()) + list(mod._buffers.items()):
            if p is not None:
                name = f"{mod_name}.{attr}" if mod_name else attr
                slots[name] = (mod, attr, attr in mod._parameters)
    shapes = {name: getattr(mod, attr).shape for name, (mod, attr, _) in slots.items()}
    # BatchNorm's step counter is optional in files; give it a real value rather than a meta one.
    optional = [name for name, (_, attr, _) in slots.items() if attr == "num_batches_tracked"]
    for mod, attr, _ in map(slots.get, optional):
        mod._buffers[attr] = torch.zeros((), dtype=torch.long, device=device)
    for name, t in _checked(named_tensors, shapes, source=source, what=what, optional=optional):
        mod, attr, is_param = slots[name]
        t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        if is_param:
            mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
        else:
            mod._buffers[attr] = t
    return model


def _local_rows(p: Tensor) -> slice:
    """The rows of a DTensor parameter this rank holds, as FSDP2 shards dim 0: torch.chunk's split,
    ceil(n / world) rows each, so the last ranks' shards are short or empty (FSDP2 pads them past
    what to_local() shows)."""
    from torch.distributed.tensor import Shard
    if len(p.placements) != 1 or p.placements[0] != Shard(0):
        raise ValueError(f"loading into a DTensor sharded as {p.placements}; "
                         f"only FSDP2's Shard(0) is supported")
    n, world, rank = p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank()
    start = min(rank * ceil_div(n, world), n)
    return slice(start, start + p.to_local().shape[0])


@torch.no_grad()
def copy_weights(model: nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]], *, source,
                 what: str = "model") -> nn.Module:
    """Copy (name, tensor) pairs into a model whose storage is already placed (built on meta, then
    allocated, e.g. FSDP2-sharded by offload.prepare), each exactly once, cast to its slot's dtype,
    checking names and shapes. A sharded parameter (DTensor) takes only this rank's rows. Trainable
    parameters (adapters) are not in files."""
    from torch.distributed.tensor import DTensor
    slots = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]
             if not t.requires_grad}
    shapes = {n: t.shape for n, t in slots.items()}
    for name, t in _checked(named_tensors, shapes, source=source, what=what, once=True):
        dst = slots[name]
        if isinstance(dst, DTensor):
            dst, t = dst.to_local(), t[_local_rows(dst)]      # [rows of this rank, ...]
        dst.copy_(t)
    return model


# --------------------------------------------------------------------------------------------------
# The diffusers <-> BFL name table (reference §3.4)

# diffusers module -> (BFL module, rows); "{}" stands for a block index. rows: None = all rows,
# 0/1/2 = that third (q, k, v) of a fused qkv, "swap" = the two halves swapped (diffusers stores the
# final adaLN as (scale; shift), BFL as (shift; scale)). The q/k norms' parameter is `weight` in
# diffusers, `scale` in BFL.
Rows = int | str | None
DIFFUSERS_TO_BFL: dict[str, tuple[str, Rows]] = {
    "x_embedder": ("img_in", None),
    "context_embedder": ("txt_in", None),
    "time_guidance_embed.timestep_embedder.linear_1": ("time_in.in_layer", None),
    "time_guidance_embed.timestep_embedder.linear_2": ("time_in.out_layer", None),
    "time_guidance_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", None),
    "time_guidance_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", None),
    "double_stream_modulation_img.linear": ("double_stream_modulation_img.lin", None),
    "double_stream_modulation_txt.linear": ("double_stream_modulation_txt.lin", None),
    "single_stream_modulation.linear": ("single_stream_modulation.lin", None),
    "proj_out": ("final_layer.linear", None),
    "norm_out.linear": ("final_layer.adaLN_modulation.1", "swap"),
    # double-stream blocks: image stream `attn.to_*`, text stream `attn.add_*`
    "transformer_blocks.{}.attn.to_q": ("double_blocks.{}.img_attn.qkv", 0),
    "transformer_blocks.{}.attn.to_k": ("double_blocks.{}.img_attn.qkv", 1),
    "transformer_blocks.{}.attn.to_v": ("double_blocks.{}.img_attn.qkv", 2),
    "transformer_blocks.{}.attn.add_q_proj": ("double_blocks.{}.txt_attn.qkv", 0),
    "transformer_blocks.{}.attn.add_k_proj": ("double_blocks.{}.txt_attn.qkv", 1),
    "transformer_blocks.{}.attn.add_v_proj": ("double_blocks.{}.txt_attn.qkv", 2),
    "transformer_blocks.{}.attn.norm_q": ("double_blocks.{}.img_attn.norm.query_norm", None),
    "transformer_blocks.{}.attn.norm_k": ("double_blocks.{}.img_attn.norm.key_norm", None),
    "transformer_blocks.{}.attn.norm_added_q": ("double_blocks.{}.txt_attn.norm.query_norm", None),
    "transformer_blocks.{}.attn.norm_added_k": ("double_blocks.{}.txt_attn.norm.key_norm", None),
    "transformer_blocks.{}.attn.to_out.0": ("double_blocks.{}.img_attn.proj", None),
    "transformer_blocks.{}.attn.to_add_out": ("double_blocks.{}.txt_attn.proj", None),
    "transformer_blocks.{}.ff.linear_in": ("double_blocks.{}.img_mlp.0", None),
    "transformer_blocks.{}.ff.linear_out": ("double_blocks.{}.img_mlp.2", None),
    "transformer_blocks.{}.ff_context.linear_in": ("double_blocks.{}.txt_mlp.0", None),
    "transformer_blocks.{}.ff_context.linear_out": ("double_blocks.{}.txt_mlp.2", None),
    # single-stream blocks
    "single_transformer_blocks.{}.attn.to_qkv_mlp_proj": ("single_blocks.{}.linear1", None),
    "single_transformer_blocks.{}.attn.to_out": ("single_blocks.{}.linear2", None),
    "single_transformer_blocks.{}.attn.norm_q": ("single_blocks.{}.norm.query_norm", None),
    "single_transformer_blocks.{}.attn.norm_k": ("single_blocks.{}.norm.key_norm", None),
}


def bfl_module(diffusers_name: str) -> tuple[str, Rows] | None:
    """The BFL module and rows of a diffusers module name (`transformer_blocks.3.attn.to_q` ->
    (`double_blocks.3.img_attn.qkv`, 0)); None for a name the table does not know."""
    block = re.match(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.", diffusers_name)
    pattern = f"{block[1]}.{{}}.{diffusers_name[block.end():]}" if block else diffusers_name
    if pattern not in DIFFUSERS_TO_BFL:
        return None
    bfl, rows = DIFFUSERS_TO_BFL[pattern]
    return (bfl.format(block[2]) if block else bfl), rows


# --------------------------------------------------------------------------------------------------
# DiT loading (reference §3)

def _dit_from_diffusers(files) -> Iterator[tuple[str, Tensor]]:
    """A diffusers `transformer/` state dict under BFL names, one tensor at a time (q, k, v fused
    into qkv); keys the table does not know pass through unchanged, for the loader to report."""
    pending = {}  # BFL qkv key -> {0: q, 1: k, 2: v} until all three were read
    for key, t in iter_tensors(files):
        module, param = key.rsplit(".", 1)
        hit = bfl_module(module)
        if hit is None:
            yield key, t
            continue
        bfl, rows = hit
        name = f"{bfl}.{'scale' if bfl.endswith('_norm') else param}"   # q/k norms: weight -> scale
        if rows == "swap":
            yield name, torch.cat(t.chunk(2)[::-1])
        elif rows is None:
            yield name, t
        else:
            pending.setdefault(name, {})[rows] = t
            if len(pending[name]) == 3:
                parts = pending.pop(name)
                yield name, torch.cat([parts[0], parts[1], parts[2]])
    if pending:
        raise LoadError(f"incomplete q/k/v projections for {sorted(pending)[:3]}")


def _strip_prefix(files) -> Iterator[tuple[str, Tensor]]:
    """BFL keys, with a ComfyUI-style `model.diffusion_model.` / `diffusion_model.` prefix cut."""
    for key, t in iter_tensors(files):
        for prefix in ("model.diffusion_model.", "diffusion_model."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        yield key, t


def _count(shapes: dict, pattern: str) -> int:
    """How many keys match `pattern`, whose "{}" stands for a block index."""
    head, tail = pattern.split("{}")
    return sum(1 for k in shapes if k.startswith(head) and k.endswith(tail))


def _config_from_bfl_shapes(shapes: dict) -> Flux2Config:
    """Infer the DiT config from tensor shapes (no config is stored in BFL files)."""
    shapes = {k.removeprefix("model.").removeprefix("diffusion_model."): s
              for k, s in shapes.items()}
    q_norm = "double_blocks.0.img_attn.norm.query_norm.scale"
    if "img_in.weight" not in shapes or q_norm not in shapes:
        raise LoadError("does not look like a FLUX.2 transformer (no img_in / double_blocks keys)")
    H, cin = shapes["img_in.weight"]
    head_dim = shapes[q_norm][0]
    return Flux2Config(
        in_channels=cin, context_in_dim=shapes["txt_in.weight"][1], hidden_size=H,
        num_heads=H // head_dim, depth=_count(shapes, "double_blocks.{}.img_attn.qkv.weight"),
        depth_single_blocks=_count(shapes, "single_blocks.{}.linear1.weight"),
        mlp_ratio=shapes["double_blocks.0.img_mlp.2.weight"][1] / H, axes_dim=(head_dim // 4,) * 4,
        use_guidance_embed="guidance_in.in_layer.weight" in shapes)


def _config_from_diffusers(config: dict) -> Flux2Config:
    """The DiT config of a diffusers `transformer/config.json` (missing fields: dev's values)."""
    heads = config.get("num_attention_heads", 48)
    return Flux2Config(
        in_channels=config.get("in_channels", 128),
        context_in_dim=config.get("joint_attention_dim", 15360),
        hidden_size=config.get("attention_head_dim", 128) * heads, num_heads=heads,
        depth=config.get("num_layers", 8), depth_single_blocks=config.get("num_single_layers", 48),
        mlp_ratio=config.get("mlp_ratio", 3.0),
        axes_dim=tuple(config.get("axes_dims_rope", (32, 32, 32, 32))),
        theta=config.get("rope_theta", 2000),
        use_guidance_embed=config.get("guidance_embeds", True))


def _is_diffusers(path: Path) -> bool:
    """A diffusers `transformer/` folder (it has a config.json); else a BFL file or folder."""
    return path.is_dir() and (path / "config.json").is_file()


def dit_config(path) -> Flux2Config:
    """The DiT config of a BFL file or diffusers folder, from its config.json or tensor shapes (no
    weights read)."""
    path = Path(path)
    if _is_diffusers(path):
        return _config_from_diffusers(json.loads((path / "config.json").read_text()))
    try:
        return _config_from_bfl_shapes(read_keys(safetensors_files(path)))
    except LoadError as e:
        raise LoadError(f"{path}: {e}") from None


def _dit_tensors(path: Path) -> tuple[Flux2Config, Iterator[tuple[str, Tensor]]]:
    """The DiT config of a BFL file or diffusers folder, and its tensors under BFL names (read
    lazily, one by one)."""
    files, cfg = safetensors_files(path), dit_config(path)
    return cfg, _dit_from_diffusers(files) if _is_diffusers(path) else _strip_prefix(files)


def load_flux2(path, device="cpu", dtype=torch.bfloat16, expect: str | None = None) -> Flux2:
    """Load a BFL single file (`flux2-dev.safetensors`, optionally `model.diffusion_model.`-
    prefixed) or a diffusers `transformer/` folder, streaming tensors into a meta-built model.
    `expect` names a preset. device="meta" reads no values: the model to place (e.g. shard) first
    and fill with load_flux2_into."""
    path = Path(path)
    cfg, tensors = _dit_tensors(path)
    looks_like = preset_name(cfg)
    if expect is not None and looks_like != expect:
        raise LoadError(f"{path}: this looks like {looks_like} ({cfg.depth}+"
                        f"{cfg.depth_single_blocks} blocks, hidden {cfg.hidden_size}), "
                        f"not {expect}; pass the {expect} checkpoint")
    with torch.device("meta"):
        model = Flux2(cfg)
    if torch.device(device).type == "meta":
        return model.to(dtype).eval().requires_grad_(False)
    try:
        assign_weights(model, tensors, device=device, dtype=dtype, source=path,
                       what=f"FLUX.2 {looks_like}")
    except LoadError as e:
        raise LoadError(f"{e} (the file looks like {looks_like})") from None
    return model.eval().requires_grad_(False)


def load_flux2_into(model: nn.Module, path) -> nn.Module:
    """Fill a DiT that load_flux2(device="meta") built and offload.prepare placed since (on the GPU,
    in host copies, or as FSDP2 shards, of which each rank copies only its rows) with the values of
    the file or folder `path`, in the model's dtype. Tensors are read one at a time from the
    memory-mapped files: beyond the placed model, host memory holds one tensor."""
    path = Path(path)
    cfg, tensors = _dit_tensors(path)
    looks_like = preset_name(cfg)
    try:
        copy_weights(model, tensors, source=path, what=f"FLUX.2 {looks_like}")
    except LoadError as e:
        raise LoadError(f"{e} (the file looks like {looks_like})") from None
    return model
