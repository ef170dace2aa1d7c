"""FLUX.2 in plain PyTorch: the diffusion transformer (DiT), the latent <-> token helpers, and streaming loaders for
the official files (also used by vae.py, the autoencoder, and text_encoder.py, the text side).

Follows docs/flux2_reference.md (BFL `src/flux2/model.py`): §1-2 for the DiT, §3 for the checkpoint keys and
§4 for the forward pass. Module attribute names ARE the BFL checkpoint keys
(`double_blocks.3.img_attn.qkv.weight`), so a BFL file loads with no renaming; other layouts (diffusers folders)
are mapped to these names in one converter per format.

Shapes use B batch, L_img image tokens, L_txt text tokens (512), H hidden (6144 for dev), D head dim (128).
"""
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn


# ----------------------------------------------------------------------------------------------------------
# Streaming safetensors loading, shared by the DiT, the autoencoder and the text encoder.
# Models are built on the meta device (no memory); each tensor is read, cast, moved to its final device and
# assigned in place, so host memory never holds two copies.

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
    start = min(rank * -(-n // world), n)
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
# DiT configuration (reference §1.2)

@dataclass(frozen=True)
class Flux2Config:
    in_channels: int = 128          # packed latent channels (32 VAE channels x 2x2 patch)
    context_in_dim: int = 15360     # 3 text-encoder layers x 5120
    hidden_size: int = 6144
    num_heads: int = 48
    depth: int = 8                  # double-stream blocks
    depth_single_blocks: int = 48
    mlp_ratio: float = 3.0
    axes_dim: tuple = (32, 32, 32, 32)  # RoPE channels per position axis (t, h, w, l); sums to the head dim
    theta: int = 2000
    use_guidance_embed: bool = True     # dev is guidance-distilled; klein has no guidance embedder


PRESETS = {
    "dev": Flux2Config(),
    "klein-4b": Flux2Config(context_in_dim=7680, hidden_size=3072, num_heads=24, depth=5, depth_single_blocks=20,
                            use_guidance_embed=False),
    "klein-9b": Flux2Config(context_in_dim=12288, hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24,
                            use_guidance_embed=False),
    # For the CPU demo and tests: same module tree, 2+2 blocks, 4 heads of 32, text context 3 x 64.
    "tiny": Flux2Config(context_in_dim=192, hidden_size=128, num_heads=4, depth=2, depth_single_blocks=2,
                        axes_dim=(8, 8, 8, 8)),
}


# Dense bf16 matmul rates measured on these cards (bench/RESULTS.md; the A100 figure is its datasheet), for MFU.
PEAK_BF16_FLOPS = {"H100": 798e12, "H200": 788e12, "A100": 312e12}


def train_step_flops(cfg: Flux2Config, batch: int, l_img: int, l_txt: int) -> float:
    """Model FLOPs of one LoRA training step, the MFU numerator: 4·N·T for the linears (forward and input-gradient
    backward; the frozen base needs no weight gradients) + 3·A for attention, A = its forward (4·L²·H per block).
    N counts the block weights a token meets (one stream's in a double block: 27.48B for dev); recompute not counted."""
    H, M, n = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio), cfg.depth + cfg.depth_single_blocks
    N = (4 * H * H + 3 * H * M) * n                     # qkv + proj + SwiGLU in/out, per token per block
    S = l_img + l_txt
    return 4 * N * batch * S + 3 * 4 * batch * S * S * H * n


def preset_name(cfg: Flux2Config) -> str:
    """The preset a config equals, or 'custom'."""
    return next((name for name, p in PRESETS.items() if p == cfg), "custom")


# ----------------------------------------------------------------------------------------------------------
# The math, as small functions (reference §2.2, §2.4, §2.7)
#
# The elementwise glue between the big matmuls (norms, modulation, RoPE in fp32, SwiGLU) is marked @fusable: eager
# PyTorch runs each of its ops as one pass over memory (RoPE alone is ~6 fp32 passes over q and k), and at FLUX.2
# sizes those passes cost a quarter of a step. `fuse()` swaps in torch.compile'd versions, one kernel per function.
# Compiling these pure functions of activations, rather than whole blocks, leaves the weights outside the compiled
# code, so it works wherever offload.py puts them (resident, streamed through the ring, FSDP2 shards).

_FUSABLE, _FUSED, _COMPILED = [], {}, {}


def fusable(fn):
    """Mark elementwise glue that fuse() may compile; until then (and always on CPU by default) it runs eagerly."""
    @functools.wraps(fn)
    def call(*args):
        if torch.compiler.is_compiling():    # called from another fused function: part of its graph
            return fn(*args)
        return _FUSED.get(fn, fn)(*args)
    _FUSABLE.append(fn)
    return call


def fuse(on: bool = True):
    """Run every @fusable function through torch.compile (one fused kernel each, forward and backward) or not."""
    _FUSED.clear()
    for fn in _FUSABLE if on else []:
        if fn not in _COMPILED:           # compiled once per process: switching back on reuses the kernels
            _COMPILED[fn] = torch.compile(fn)
        _FUSED[fn] = _COMPILED[fn]


def _compute_dtype(x: Tensor) -> torch.dtype:
    """Norms and RoPE run in fp32 for bf16/fp16 inputs (as the reference) and in float64 for float64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of t*1000, [cos | sin] (cos first); the x1000 happens in t's own dtype."""
    t = 1000.0 * t                                                    # bf16 in training: quantized, as BFL does
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                           # [B, 128]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)


def rope(ids: Tensor, axes_dim: tuple, theta: int) -> Tensor:
    """Rotation matrices for 4-axis integer positions: ids [B, L, 4] -> [B, 1, L, D/2, 2, 2] (fp32)."""
    pos = ids.to(torch.float64)
    out = []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)  # [d/2]
        out.append(pos[..., i, None] * omega)                         # [B, L, d/2]
    a = torch.cat(out, dim=-1)                                        # [B, L, D/2] angles, axis order t,h,w,l
    rot = torch.stack([torch.cos(a), -torch.sin(a), torch.sin(a), torch.cos(a)], dim=-1)
    return rot.view(*a.shape, 2, 2)[:, None].float()


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (2p, 2p+1) of x [B, heads, L, D] by pe [B, 1, L, D/2, 2, 2]."""
    xp = x.to(_compute_dtype(x)).reshape(*x.shape[:-1], -1, 1, 2)     # [B, heads, L, D/2, 1, 2]
    out = pe[..., 0] * xp[..., 0] + pe[..., 1] * xp[..., 1]           # [B, heads, L, D/2, 2]
    return out.reshape(x.shape).to(x.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Joint attention, no mask, q and k already rotated (norm_rope): q, k, v [B, heads, L, D] -> [B, L, heads*D]."""
    x = F.scaled_dot_product_attention(q, k, v)
    return x.transpose(1, 2).flatten(2)


def layer_norm(x: Tensor) -> Tensor:
    """LayerNorm without affine parameters, eps 1e-6, returned in x's dtype (bf16 in training, as the reference;
    autocast would otherwise hand back fp32 and double the traffic of the modulation that follows)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6).to(x.dtype)


@fusable
def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """(1 + scale) * LN(x) + shift."""
    return torch.addcmul(shift, 1 + scale, layer_norm(x))


def rms_norm(x: Tensor, scale: Tensor) -> Tensor:
    """x / rms(x) * scale over the last dim, computed in at least fp32, returned in x's dtype (q/k norms)."""
    xf = x.to(_compute_dtype(x))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
    return xf.to(x.dtype) * scale.to(x.dtype)


@fusable
def swiglu(x: Tensor) -> Tensor:
    """silu(first half) * second half: [..., 2M] -> [..., M]."""
    a, b = x.chunk(2, dim=-1)
    return F.silu(a) * b


@fusable
def norm_rope(parts: tuple[Tensor, ...], scales: tuple[Tensor, ...], pe: Tensor) -> Tensor:
    """The q (or k) side of attention: RMS-norm each stream's heads [B, heads, L_i, D] with its own scale, join the
    streams along L (text first), rotate by RoPE: -> [B, heads, sum L_i, D]. One kernel once fused."""
    x = [rms_norm(p, s) for p, s in zip(parts, scales)]
    return apply_rope(torch.cat(x, dim=2) if len(x) > 1 else x[0], pe)


@fusable
def attn_and_swiglu(a: Tensor, mlp: Tensor) -> Tensor:
    """A single block's input to linear2: [attention out | SwiGLU(mlp)], [B, L, H] + [B, L, 2M] -> [B, L, H + M]."""
    return torch.cat([a, swiglu(mlp)], dim=-1)


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """[B, L, 3*H] with rows (q|k|v, head, d) -> three [B, heads, L, D]."""
    B, L, _ = qkv.shape
    return qkv.view(B, L, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


# ----------------------------------------------------------------------------------------------------------
# Modules (reference §2.1-2.8)

class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear, used for the timestep and guidance embeddings."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden, bias=False)
        self.out_layer = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """The learned `scale` of an RMS norm over the head dim (checkpoint key `...norm.query_norm.scale`); rms_norm
    applies it, inside norm_rope."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))


class QKNorm(nn.Module):
    """The per-head q and k norm scales; applied by norm_rope, together with RoPE."""

    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


class SelfAttention(nn.Module):
    """Per-stream attention weights of a double block (driven by the block; no forward of its own)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=False)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, L, H] -> q, k, v [B, heads, L, D] (q and k not yet normalised: norm_rope does that)."""
        return split_heads(self.qkv(x), self.num_heads)


class SiLUActivation(nn.Module):
    """SwiGLU: silu of the first half times the second half."""

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x)


class Modulation(nn.Module):
    """Shared adaLN parameters for all blocks of one kind: vec [B, H] -> tuples of (shift, scale, gate) [B, 1, H]."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=False)

    def forward(self, vec: Tensor) -> tuple[tuple[Tensor, ...], ...]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return tuple(out[i:i + 3] for i in range(0, self.multiplier, 3))


class DoubleStreamBlock(nn.Module):
    """Separate weights for image and text tokens, joint attention over [txt ; img] (reference §2.5)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        mlp = int(dim * mlp_ratio)
        self.img_attn = SelfAttention(dim, num_heads)
        self.img_mlp = nn.Sequential(nn.Linear(dim, 2 * mlp, bias=False), SiLUActivation(),
                                     nn.Linear(mlp, dim, bias=False))
        self.txt_attn = SelfAttention(dim, num_heads)
        self.txt_mlp = nn.Sequential(nn.Linear(dim, 2 * mlp, bias=False), SiLUActivation(),
                                     nn.Linear(mlp, dim, bias=False))

    def forward(self, img: Tensor, txt: Tensor, pe: Tensor, mod_img, mod_txt) -> tuple[Tensor, Tensor]:
        """img [B, L_img, H], txt [B, L_txt, H], pe for [txt ; img] -> updated (img, txt)."""
        (img_shift1, img_scale1, img_gate1), (img_shift2, img_scale2, img_gate2) = mod_img
        (txt_shift1, txt_scale1, txt_gate1), (txt_shift2, txt_scale2, txt_gate2) = mod_txt
        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(img, img_shift1, img_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(txt, txt_shift1, txt_scale1))
        tn, im = self.txt_attn.norm, self.img_attn.norm                                 # text first
        q = norm_rope((txt_q, img_q), (tn.query_norm.scale, im.query_norm.scale), pe)   # [B, heads, L, D]
        k = norm_rope((txt_k, img_k), (tn.key_norm.scale, im.key_norm.scale), pe)
        a = attention(q, k, torch.cat([txt_v, img_v], 2))                              # [B, L, H]
        txt_a, img_a = a[:, :txt.shape[1]], a[:, txt.shape[1]:]
        img = torch.addcmul(img, img_gate1, self.img_attn.proj(img_a))                 # img + gate * proj(...)
        img = torch.addcmul(img, img_gate2, self.img_mlp(modulate(img, img_shift2, img_scale2)))
        txt = torch.addcmul(txt, txt_gate1, self.txt_attn.proj(txt_a))
        txt = torch.addcmul(txt, txt_gate2, self.txt_mlp(modulate(txt, txt_shift2, txt_scale2)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One fused input linear (q|k|v|gate|up) and one fused output linear over [attn | mlp] (reference §2.6)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.mlp_hidden = int(dim * mlp_ratio)
        self.linear1 = nn.Linear(dim, 3 * dim + 2 * self.mlp_hidden, bias=False)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim, bias=False)
        self.norm = QKNorm(dim // num_heads)

    def forward(self, x: Tensor, pe: Tensor, mod) -> Tensor:
        """x [B, L_txt + L_img, H] -> same shape."""
        (shift, scale, gate), = mod
        qkv, mlp = self.linear1(modulate(x, shift, scale)).split([3 * x.shape[-1], 2 * self.mlp_hidden], dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)                    # [B, heads, L, D]
        q = norm_rope((q,), (self.norm.query_norm.scale,), pe)
        k = norm_rope((k,), (self.norm.key_norm.scale,), pe)
        a = attention(q, k, v)                                        # [B, L, H]
        return torch.addcmul(x, gate, self.linear2(attn_and_swiglu(a, mlp)))   # x + gate * linear2(...)


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=False))
        self.linear = nn.Linear(dim, out_channels, bias=False)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)   # shift first (BFL order)
        return self.linear(modulate(x, shift, scale))


class Flux2(nn.Module):
    """The FLUX.2 diffusion transformer: predicts the flow velocity for image tokens (reference §4)."""

    def __init__(self, cfg: Flux2Config = Flux2Config()):
        super().__init__()
        H = cfg.hidden_size
        if H % cfg.num_heads or sum(cfg.axes_dim) != H // cfg.num_heads:
            raise ValueError(f"axes_dim {cfg.axes_dim} must sum to the head dim {H // cfg.num_heads}")
        self.cfg = cfg
        self.img_in = nn.Linear(cfg.in_channels, H, bias=False)
        self.time_in = MLPEmbedder(256, H)
        if cfg.use_guidance_embed:
            self.guidance_in = MLPEmbedder(256, H)
        self.txt_in = nn.Linear(cfg.context_in_dim, H, bias=False)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(H, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(H, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth_single_blocks))
        self.double_stream_modulation_img = Modulation(H, double=True)
        self.double_stream_modulation_txt = Modulation(H, double=True)
        self.single_stream_modulation = Modulation(H, double=False)
        self.final_layer = LastLayer(H, cfg.in_channels)

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                guidance: Tensor | None = None) -> Tensor:
        """img [B, L_img, 128] (target then reference tokens), ids [B, L, 4], txt [B, L_txt, ctx], t [B] in [0, 1],
        guidance [B] (dev) -> velocity [B, L_img, 128] for every input image token."""
        vec = self.time_in(timestep_embedding(timesteps.to(img.dtype)))              # [B, H]
        if self.cfg.use_guidance_embed:
            if guidance is None:
                raise ValueError("this model has a guidance embedder (FLUX.2 dev): pass guidance, e.g. 4.0")
            vec = vec + self.guidance_in(timestep_embedding(guidance.to(img.dtype)))
        mod_img = self.double_stream_modulation_img(vec)
        mod_txt = self.double_stream_modulation_txt(vec)
        mod_single = self.single_stream_modulation(vec)
        img, txt = self.img_in(img), self.txt_in(txt)                                # [B, L, H]
        B = img.shape[0]
        ids = torch.cat([txt_ids.expand(B, -1, -1), img_ids.expand(B, -1, -1)], dim=1)  # text first
        pe = rope(ids, self.cfg.axes_dim, self.cfg.theta)                            # [B, 1, L, D/2, 2, 2]
        for block in self.double_blocks:
            img, txt = block(img, txt, pe, mod_img, mod_txt)
        x = torch.cat([txt, img], dim=1)                                             # [B, L_txt + L_img, H]
        for block in self.single_blocks:
            x = block(x, pe, mod_single)
        return self.final_layer(x[:, txt.shape[1]:], vec)                            # [B, L_img, 128]

    @property
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks in execution order (what offload.py wraps)."""
        return [*self.double_blocks, *self.single_blocks]


# ----------------------------------------------------------------------------------------------------------
# Latent <-> tokens and position ids (reference §4)

def pack(z: torch.Tensor) -> torch.Tensor:
    """Latent [B,C,h,w] -> tokens [B,h*w,C], row-major."""
    return z.flatten(2).transpose(1, 2)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Tokens [B,h*w,C] -> latent [B,C,h,w]; the inverse of `pack`."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


def image_ids(h: int, w: int, t: int = 0) -> torch.Tensor:
    """Position ids int64 [h*w,4] = (t, row, col, 0), row-major; t=0 for the target, 10*(r+1) for reference r."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.full_like(rows, t), rows, cols, torch.zeros_like(rows)], -1).reshape(h * w, 4)


def text_ids(length: int) -> torch.Tensor:
    """Position ids int64 [length,4] = (0, 0, 0, n) for every text token, pads included."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids


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


# ----------------------------------------------------------------------------------------------------------
# A whole FLUX.2 snapshot (dev, or klein: reference §1.1)

SNAPSHOT_PARTS = {  # part -> accepted locations inside a FLUX.2 snapshot directory, first match wins
    "transformer": ["flux2-dev.safetensors", "transformer", *(f"flux-2-klein-{v}.safetensors" for v in
                    ("4b", "9b", "base-4b", "base-9b"))],
    "vae": ["ae.safetensors", "vae"],
    "text_encoder": ["text_encoder"],
    "tokenizer": ["tokenizer/tokenizer.json", "tokenizer/tekken.json", "tokenizer.json", "tekken.json"],
}


def find_snapshot(model_dir) -> dict[str, Path]:
    """Locate the DiT, VAE, text encoder and tokenizer in a FLUX.2 snapshot; say exactly what is missing."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise LoadError(f"{model_dir}: not a folder; --model-dir takes a FLUX.2 (dev or klein) snapshot directory")
    found = {}
    for part, candidates in SNAPSHOT_PARTS.items():
        hit = next((model_dir / c for c in candidates if (model_dir / c).exists()), None)
        if hit is None:
            raise LoadError(f"{model_dir}: no {part} found (looked for {', '.join(candidates)}); "
                            f"download that part of black-forest-labs/FLUX.2-dev (or -klein-*) into this folder")
        found[part] = hit
    return found
