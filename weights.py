"""Reading FLUX.2 weight files: safetensors streamed one tensor at a time into a model built on the meta device
(or already placed by offload.py, FSDP2 shards included), and the DiT's two file layouts: BFL's single file and
diffusers' `transformer/` folder, mapped onto BFL names by the one diffusers <-> BFL name table (which lora.py and
bench.py read too).

Follows docs/flux2_reference.md §3 (checkpoint keys; §3.4 the diffusers names). vae.py and text_encoder.py load
their own layouts with the streaming functions here.
"""
import json
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from torch import Tensor, nn

from flux2 import Flux2, Flux2Config, preset_name
from util import LoadError, ceil_div


# ----------------------------------------------------------------------------------------------------------
# Streaming safetensors loading, shared by the DiT, the autoencoder and the text encoder.
# Models are built on the meta device (no memory); each tensor is read, cast, moved to its final device and
# assigned in place, so host memory never holds two copies.

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


def iter_tensors(files: list[Path], keep=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) from `files` one tensor at a time; `keep(key)` False skips a tensor without reading it."""
    for file in files:
        with _open(file) as f:
            for k in f.keys():
                if keep is not None and not keep(k):
                    continue
                try:
                    yield k, f.get_tensor(k)
                except Exception as e:
                    raise LoadError(f"{file}: tensor {k!r} cannot be read ({e}); the file may be truncated") from None


def _checked(named_tensors: Iterable[tuple[str, Tensor]], shapes: dict[str, tuple], *, source, what: str,
             optional=(), once: bool = False) -> Iterator[tuple[str, Tensor]]:
    """The (name, tensor) pairs, each checked to be a name of `shapes` (at most once, if `once`) with that shape;
    at the end, every name but the `optional` ones must have come. LoadError naming the file otherwise."""
    done = set()
    for name, t in named_tensors:
        if name not in shapes or (once and name in done):
            raise LoadError(f"{source}: unexpected key {name!r} for {what}; is this the right file?")
        if tuple(shapes[name]) != tuple(t.shape):
            raise LoadError(f"{source}: {name} has shape {tuple(t.shape)}, {what} expects {tuple(shapes[name])}")
        done.add(name)
        yield name, t
    missing = [n for n in shapes if n not in done and n not in optional]
    if missing:
        raise LoadError(f"{source}: {len(missing)} keys of {what} missing, e.g. {missing[:4]}; "
                        f"is the file complete and for this model?")


def assign_weights(model: nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]], *, device, dtype,
                   source, what: str = "model") -> nn.Module:
    """Assign (name, tensor) pairs into a meta-device `model`, checking every name and shape."""
    slots = {}  # name -> (owning module, attribute, is_parameter)
    for mod_name, mod in model.named_modules():
        for attr, p in list(mod._parameters.items()) + list(mod._buffers.items()):
            if p is not None:
                slots[f"{mod_name}.{attr}" if mod_name else attr] = (mod, attr, attr in mod._parameters)
    shapes = {name: getattr(mod, attr).shape for name, (mod, attr, _) in slots.items()}
    # BatchNorm's step counter is optional in files; give it a real value rather than leaving it on meta.
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
    """The rows of a DTensor parameter this rank holds, as FSDP2 shards dim 0: torch.chunk's split, ceil(n / world)
    rows each, so the last ranks' shards are short or empty (FSDP2 pads them past what to_local() shows)."""
    from torch.distributed.tensor import Shard
    if len(p.placements) != 1 or p.placements[0] != Shard(0):
        raise ValueError(f"loading into a DTensor sharded as {p.placements}; only FSDP2's Shard(0) is supported")
    n, world, rank = p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank()
    start = min(rank * ceil_div(n, world), n)
    return slice(start, start + p.to_local().shape[0])


@torch.no_grad()
def copy_weights(model: nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]], *, source,
                 what: str = "model") -> nn.Module:
    """Copy (name, tensor) pairs into a model whose storage is already placed (built on meta, then allocated, e.g.
    FSDP2-sharded by offload.prepare), each exactly once, cast to its slot's dtype, checking names and shapes. A
    sharded parameter (DTensor) takes only this rank's rows. Trainable parameters (adapters) are not in files."""
    from torch.distributed.tensor import DTensor
    slots = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()] if not t.requires_grad}
    shapes = {n: t.shape for n, t in slots.items()}
    for name, t in _checked(named_tensors, shapes, source=source, what=what, once=True):
        dst = slots[name]
        if isinstance(dst, DTensor):
            dst, t = dst.to_local(), t[_local_rows(dst)]      # [rows of this rank, ...]
        dst.copy_(t)
    return model


# ----------------------------------------------------------------------------------------------------------
# DiT loading (reference §3; diffusers names from §3.4)

_DIFFUSERS_TO_BFL = [  # (diffusers prefix, BFL prefix), applied to the start of a key after the block index
    ("x_embedder", "img_in"), ("context_embedder", "txt_in"),
    ("time_guidance_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_guidance_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    ("time_guidance_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    ("time_guidance_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    ("double_stream_modulation_img.linear", "double_stream_modulation_img.lin"),
    ("double_stream_modulation_txt.linear", "double_stream_modulation_txt.lin"),
    ("single_stream_modulation.linear", "single_stream_modulation.lin"),
    ("proj_out", "final_layer.linear"), ("norm_out.linear", "final_layer.adaLN_modulation.1"),
]
_DIFFUSERS_DOUBLE = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
    "attn.to_out.0.weight": "img_attn.proj.weight", "attn.to_add_out.weight": "txt_attn.proj.weight",
    "ff.linear_in.weight": "img_mlp.0.weight", "ff.linear_out.weight": "img_mlp.2.weight",
    "ff_context.linear_in.weight": "txt_mlp.0.weight", "ff_context.linear_out.weight": "txt_mlp.2.weight",
}
_DIFFUSERS_QKV = {"attn.to_q.weight": ("img_attn.qkv.weight", 0), "attn.to_k.weight": ("img_attn.qkv.weight", 1),
                  "attn.to_v.weight": ("img_attn.qkv.weight", 2), "attn.add_q_proj.weight": ("txt_attn.qkv.weight", 0),
                  "attn.add_k_proj.weight": ("txt_attn.qkv.weight", 1),
                  "attn.add_v_proj.weight": ("txt_attn.qkv.weight", 2)}
_DIFFUSERS_SINGLE = {"attn.to_qkv_mlp_proj.weight": "linear1.weight", "attn.to_out.weight": "linear2.weight",
                     "attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}


def _dit_from_diffusers(files):
    """Map a diffusers `transformer/` state dict to BFL names, one tensor at a time (q, k, v fused into qkv)."""
    pending = {}  # BFL qkv key -> {0: q, 1: k, 2: v} until all three were read
    for key, t in iter_tensors(files):
        if key.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            kind, idx, rest = key.split(".", 2)
            if kind == "transformer_blocks" and rest in _DIFFUSERS_QKV:
                name, part = _DIFFUSERS_QKV[rest]
                name = f"double_blocks.{idx}.{name}"
                pending.setdefault(name, {})[part] = t
                if len(pending[name]) == 3:
                    parts = pending.pop(name)
                    yield name, torch.cat([parts[0], parts[1], parts[2]])
                continue
            table, bfl = (_DIFFUSERS_DOUBLE, "double_blocks") if kind == "transformer_blocks" else \
                (_DIFFUSERS_SINGLE, "single_blocks")
            yield f"{bfl}.{idx}.{table.get(rest, rest)}", t
            continue
        for src, dst in _DIFFUSERS_TO_BFL:
            if key.startswith(src + "."):
                key = dst + key[len(src):]
                if dst == "final_layer.adaLN_modulation.1":
                    t = torch.cat(t.chunk(2)[::-1])     # diffusers stores (scale; shift), BFL (shift; scale)
                break
        yield key, t
    if pending:
        raise LoadError(f"incomplete q/k/v projections for {sorted(pending)[:3]}")


def _strip_prefix(files):
    """BFL keys, with a ComfyUI-style `model.diffusion_model.` / `diffusion_model.` prefix removed."""
    for key, t in iter_tensors(files):
        for prefix in ("model.diffusion_model.", "diffusion_model."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        yield key, t


def _count(shapes: dict, pattern: str) -> int:
    return sum(1 for k in shapes if k.startswith(pattern.split("{}")[0]) and k.endswith(pattern.split("{}")[1]))


def _config_from_bfl_shapes(shapes: dict) -> Flux2Config:
    """Infer the DiT config from tensor shapes (no config is stored in BFL files)."""
    shapes = {k.removeprefix("model.").removeprefix("diffusion_model."): s for k, s in shapes.items()}
    if "img_in.weight" not in shapes or "double_blocks.0.img_attn.norm.query_norm.scale" not in shapes:
        raise LoadError("does not look like a FLUX.2 transformer (no img_in / double_blocks keys)")
    H, cin = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    return Flux2Config(
        in_channels=cin, context_in_dim=shapes["txt_in.weight"][1], hidden_size=H, num_heads=H // head_dim,
        depth=_count(shapes, "double_blocks.{}.img_attn.qkv.weight"),
        depth_single_blocks=_count(shapes, "single_blocks.{}.linear1.weight"),
        mlp_ratio=shapes["double_blocks.0.img_mlp.2.weight"][1] / H, axes_dim=(head_dim // 4,) * 4,
        use_guidance_embed="guidance_in.in_layer.weight" in shapes)


def _config_from_diffusers(config: dict) -> Flux2Config:
    head_dim = config.get("attention_head_dim", 128)
    return Flux2Config(
        in_channels=config.get("in_channels", 128), context_in_dim=config.get("joint_attention_dim", 15360),
        hidden_size=head_dim * config.get("num_attention_heads", 48), num_heads=config.get("num_attention_heads", 48),
        depth=config.get("num_layers", 8), depth_single_blocks=config.get("num_single_layers", 48),
        mlp_ratio=config.get("mlp_ratio", 3.0), axes_dim=tuple(config.get("axes_dims_rope", (32, 32, 32, 32))),
        theta=config.get("rope_theta", 2000), use_guidance_embed=config.get("guidance_embeds", True))


def dit_config(path) -> Flux2Config:
    """The DiT config of a BFL file or diffusers folder, from its config.json or tensor shapes (no weights read)."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        return _config_from_diffusers(json.loads((path / "config.json").read_text()))
    try:
        return _config_from_bfl_shapes(read_keys(safetensors_files(path)))
    except LoadError as e:
        raise LoadError(f"{path}: {e}") from None


def _dit_tensors(path: Path) -> tuple[Flux2Config, Iterator[tuple[str, Tensor]]]:
    """The DiT config of a BFL file or diffusers folder, and its tensors under BFL names (read lazily, one by one)."""
    files, cfg = safetensors_files(path), dit_config(path)
    diffusers = path.is_dir() and (path / "config.json").is_file()
    return cfg, _dit_from_diffusers(files) if diffusers else _strip_prefix(files)


def load_flux2(path, device="cpu", dtype=torch.bfloat16, expect: str | None = None) -> Flux2:
    """Load a BFL single file (`flux2-dev.safetensors`, optionally `model.diffusion_model.`-prefixed) or a
    diffusers `transformer/` folder, streaming tensors into a meta-built model. `expect` names a preset.
    device="meta" reads no values: the model to place (e.g. shard) first and fill with load_flux2_into."""
    path = Path(path)
    cfg, tensors = _dit_tensors(path)
    looks_like = preset_name(cfg)
    if expect is not None and looks_like != expect:
        raise LoadError(f"{path}: this looks like {looks_like} ({cfg.depth}+{cfg.depth_single_blocks} blocks, "
                        f"hidden {cfg.hidden_size}), not {expect}; pass the {expect} checkpoint")
    with torch.device("meta"):
        model = Flux2(cfg)
    if torch.device(device).type == "meta":
        return model.to(dtype).eval().requires_grad_(False)
    try:
        assign_weights(model, tensors, device=device, dtype=dtype, source=path, what=f"FLUX.2 {looks_like}")
    except LoadError as e:
        raise LoadError(f"{e} (the file looks like {looks_like})") from None
    return model.eval().requires_grad_(False)


def load_flux2_into(model: nn.Module, path) -> nn.Module:
    """Fill a DiT that load_flux2(device="meta") built and offload.prepare placed since (on the GPU, in host copies,
    or as FSDP2 shards, of which each rank copies only its rows) with the values of the file or folder `path`, in the
    model's dtype. Tensors are read one at a time from the memory-mapped files: beyond the placed model, host
    memory holds one tensor."""
    path = Path(path)
    cfg, tensors = _dit_tensors(path)
    looks_like = preset_name(cfg)
    try:
        copy_weights(model, tensors, source=path, what=f"FLUX.2 {looks_like}")
    except LoadError as e:
        raise LoadError(f"{e} (the file looks like {looks_like})") from None
    return model
