"""FLUX.2 in plain PyTorch: the diffusion transformer (DiT) that predicts the flow velocity of image
tokens, the latent <-> token packing with its position ids, the time shift of the schedule, and the
FLOP count for MFU.

Follows docs/flux2_reference.md: §1.2 for the configs, §2 for the modules and their math, §4 for the
forward pass, §7.1 for the time shift. Module attribute names ARE the BFL checkpoint keys
(`double_blocks.3.img_attn.qkv.weight`), so a BFL file loads with no renaming; weights.py maps the
diffusers layout onto them.

Shapes: B batch, L_img image tokens, L_txt text tokens (512), L = L_txt + L_img, H hidden (6144 for
dev), heads = H / D attention heads of D = 128 channels, M = 3H the MLP width.
"""
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


# --------------------------------------------------------------------------------------------------
# Configuration (reference §1.2)

@dataclass(frozen=True)
class Flux2Config:
    in_channels: int = 128              # packed latent channels: 32 VAE channels x a 2x2 patch
    context_in_dim: int = 15360         # text features: 3 text-encoder layers x 5120
    hidden_size: int = 6144             # H, the width of both token streams
    num_heads: int = 48                 # attention heads; H / num_heads = D = 128
    depth: int = 8                      # double-stream blocks (separate image and text weights)
    depth_single_blocks: int = 48       # single-stream blocks (one set of weights for all tokens)
    mlp_ratio: float = 3.0              # M = H x mlp_ratio
    axes_dim: tuple = (32, 32, 32, 32)  # RoPE channels per position axis (t, h, w, l); sums to D
    theta: int = 2000                   # RoPE base frequency
    use_guidance_embed: bool = True     # dev is guidance-distilled; klein has no guidance embedder


PRESETS = {
    "dev": Flux2Config(),
    "klein-4b": Flux2Config(context_in_dim=7680, hidden_size=3072, num_heads=24, depth=5,
                            depth_single_blocks=20, use_guidance_embed=False),
    "klein-9b": Flux2Config(context_in_dim=12288, hidden_size=4096, num_heads=32, depth=8,
                            depth_single_blocks=24, use_guidance_embed=False),
    # For the CPU demo and tests: same module tree, 2+2 blocks, 4 heads of 32, text context 3 x 64.
    "tiny": Flux2Config(context_in_dim=192, hidden_size=128, num_heads=4, depth=2,
                        depth_single_blocks=2, axes_dim=(8, 8, 8, 8)),
}


def preset_name(cfg: Flux2Config) -> str:
    """The preset a config equals, or 'custom'."""
    return next((name for name, p in PRESETS.items() if p == cfg), "custom")


# --------------------------------------------------------------------------------------------------
# Fusion. The elementwise glue between the big matmuls (norms, modulation, RoPE, SwiGLU) is marked
# @fusable. Eager PyTorch makes one pass over memory per op, and at FLUX.2 sizes those passes cost
# a quarter of a step; `fuse()` swaps in torch.compile'd versions, one kernel per function. They
# are pure functions of tensors (weights come in as arguments), so the weights stay outside the
# compiled code wherever offload.py puts them, and the matmuls and the attention call stay visible
# to its selective checkpoint policy.

_FUSABLE, _FUSED, _COMPILED = [], {}, {}


def fusable(fn):
    """Mark elementwise glue that fuse() may compile; until then it runs eagerly."""
    @functools.wraps(fn)
    def call(*args):
        if torch.compiler.is_compiling():    # called from compiled code: part of that graph
            return fn(*args)
        return _FUSED.get(fn, fn)(*args)
    _FUSABLE.append(fn)
    return call


def fuse(on: bool = True):
    """Run every @fusable function through torch.compile (one kernel each, forward and backward), or
    not."""
    _FUSED.clear()
    for fn in _FUSABLE if on else []:
        if fn not in _COMPILED:           # once per process: switching back on reuses the kernels
            _COMPILED[fn] = torch.compile(fn)
        _FUSED[fn] = _COMPILED[fn]


# --------------------------------------------------------------------------------------------------
# The math, as small functions (reference §2.2-2.7)

def _compute_dtype(x: Tensor) -> torch.dtype:
    """Norms and RoPE run in fp32 for bf16/fp16 inputs (as the reference), float64 for float64."""
    return torch.promote_types(x.dtype, torch.float32)


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of t*1000, [cos | sin] (cos first); the x1000 happens in t's dtype."""
    t = 1000.0 * t                                      # bf16 in training: quantized, as BFL does
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / half)
    args = t.float()[:, None] * freqs[None]             # [B, 128]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)


@fusable
def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """(1 + scale) * LN(x) + shift, LN without affine parameters (eps 1e-6). LN's result is cast
    back to x's dtype (bf16 in training, as the reference): autocast would hand back fp32 and
    double the traffic."""
    return (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=1e-6).to(x.dtype) + shift


def split_heads(qkv: Tensor, num_heads: int) -> Tensor:
    """[B, L, 3H] with rows (q|k|v, head, d) -> q, k, v stacked: [3, B, heads, L, D]."""
    return rearrange(qkv, "B L (K heads D) -> K B heads L D", K=3, heads=num_heads)


def rope(ids: Tensor, axes_dim: tuple, theta: int) -> Tensor:
    """Rotation matrices for 4-axis integer positions: ids [B, L, 4] -> pe [B, 1, L, D/2, 2, 2]."""
    pos = ids.to(torch.float64)
    out = []
    for i, d in enumerate(axes_dim):
        j2 = torch.arange(0, d, 2, dtype=torch.float64, device=ids.device)
        omega = 1.0 / theta ** (j2 / d)                                         # [d/2]
        out.append(pos[..., i, None] * omega)                                   # [B, L, d/2]
    a = torch.cat(out, dim=-1)                              # [B, L, D/2] angles, axes t, h, w, l
    rot = torch.stack([torch.cos(a), -torch.sin(a), torch.sin(a), torch.cos(a)], dim=-1)
    return rot.view(*a.shape, 2, 2)[:, None].float()


def rotate(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (2p, 2p+1) of x [B, heads, L, D] by pe, in fp32."""
    xp = x.to(_compute_dtype(x)).reshape(*x.shape[:-1], -1, 1, 2)   # [B, heads, L, D/2, 1, 2]
    out = pe[..., 0] * xp[..., 0] + pe[..., 1] * xp[..., 1]         # [B, heads, L, D/2, 2]
    return out.reshape(x.shape).to(x.dtype)


@fusable
def rms_norm(x: Tensor, scale: Tensor, pe: Tensor | None = None) -> Tensor:
    """x / rms(x) * scale over the last dim, in at least fp32, returned in x's dtype (q/k norms);
    then rotated by RoPE when positions pe are given (one kernel for both once fused)."""
    xf = x.to(_compute_dtype(x))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
    x = xf.to(x.dtype) * scale.to(x.dtype)
    return x if pe is None else rotate(x, pe)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Joint attention without a mask over q and k already rotated by RoPE (QKNorm does it):
    [B, heads, L, D] -> [B, L, H]."""
    x = F.scaled_dot_product_attention(q, k, v)     # [B, heads, L, D]
    return rearrange(x, "B heads L D -> B L (heads D)")


@fusable
def swiglu(x: Tensor) -> Tensor:
    """silu(first half) * second half: [..., 2M] -> [..., M]."""
    a, b = x.chunk(2, dim=-1)
    return F.silu(a) * b


@fusable
def concat_swiglu(attn: Tensor, mlp: Tensor) -> Tensor:
    """A single block's input to linear2, [attention | SwiGLU(mlp)]: [B, L, H] and [B, L, 2M] ->
    [B, L, H + M], written in one pass once fused."""
    return torch.cat([attn, swiglu(mlp)], dim=-1)


# --------------------------------------------------------------------------------------------------
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
    """RMS norm over the head dim with a learned `scale` (key `...norm.query_norm.scale`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, pe: Tensor | None = None) -> Tensor:
        """x [..., D] normalised; then rotated by RoPE when positions pe are given (queries, keys)."""
        return rms_norm(x, self.scale, pe)


class QKNorm(nn.Module):
    """Per-head RMS norms of queries and keys, each with its own scale. RoPE is applied here too, in
    the same kernel once fused: positions enter attention only through the rotated q and k, and a
    token's rotation depends on its own position alone, so each stream can be rotated before the
    streams are joined."""

    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        """q, k [B, heads, L, D] normalised, then rotated by RoPE at positions pe [B, 1, L, ...]."""
        return self.query_norm(q, pe), self.key_norm(k, pe)


class SelfAttention(nn.Module):
    """One stream's attention weights in a double block: qkv in, q/k norms, output projection. The
    block drives them, because attention runs over both streams at once."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=False)


class SiLUActivation(nn.Module):
    """SwiGLU: silu of the first half times the second half."""

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x)


class Modulation(nn.Module):
    """Shared adaLN parameters for all blocks of one kind: vec [B, H] -> tuples of
    (shift, scale, gate), each [B, 1, H]."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=False)

    def forward(self, vec: Tensor) -> tuple[tuple[Tensor, ...], ...]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return tuple(out[i:i + 3] for i in range(0, self.multiplier, 3))


class DoubleStreamBlock(nn.Module):
    """Separate weights for image and text tokens, joint attention over [txt ; img] (§2.5)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        mlp = int(dim * mlp_ratio)
        self.num_heads = num_heads
        self.img_attn = SelfAttention(dim, num_heads)
        self.img_mlp = nn.Sequential(nn.Linear(dim, 2 * mlp, bias=False), SiLUActivation(),
                                     nn.Linear(mlp, dim, bias=False))
        self.txt_attn = SelfAttention(dim, num_heads)
        self.txt_mlp = nn.Sequential(nn.Linear(dim, 2 * mlp, bias=False), SiLUActivation(),
                                     nn.Linear(mlp, dim, bias=False))

    def forward(self, img: Tensor, txt: Tensor, pe: Tensor, mod_img, mod_txt
                ) -> tuple[Tensor, Tensor]:
        """img [B, L_img, H], txt [B, L_txt, H], pe for [txt ; img] -> updated (img, txt)."""
        (img_shift1, img_scale1, img_gate1), (img_shift2, img_scale2, img_gate2) = mod_img
        (txt_shift1, txt_scale1, txt_gate1), (txt_shift2, txt_scale2, txt_gate2) = mod_txt
        img_qkv = self.img_attn.qkv(modulate(img, img_shift1, img_scale1))
        img_q, img_k, img_v = split_heads(img_qkv, self.num_heads)     # [B, heads, L_img, D]
        pe_txt, pe_img = pe[:, :, :txt.shape[1]], pe[:, :, txt.shape[1]:]
        img_q, img_k = self.img_attn.norm(img_q, img_k, pe_img)        # RMSNorm per head, RoPE
        txt_qkv = self.txt_attn.qkv(modulate(txt, txt_shift1, txt_scale1))
        txt_q, txt_k, txt_v = split_heads(txt_qkv, self.num_heads)     # [B, heads, L_txt, D]
        txt_q, txt_k = self.txt_attn.norm(txt_q, txt_k, pe_txt)
        q, k, v = (torch.cat(parts, dim=2)                      # text first: [B, heads, L, D]
                   for parts in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        attn = attention(q, k, v)                                       # [B, L, H]
        txt_attn, img_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + img_gate1 * self.img_attn.proj(img_attn)
        img = img + img_gate2 * self.img_mlp(modulate(img, img_shift2, img_scale2))
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_gate2 * self.txt_mlp(modulate(txt, txt_shift2, txt_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One fused input linear (q|k|v|gate|up), one fused output linear over [attn | mlp] (§2.6)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.mlp_hidden = int(dim * mlp_ratio)
        self.linear1 = nn.Linear(dim, 3 * dim + 2 * self.mlp_hidden, bias=False)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim, bias=False)
        self.norm = QKNorm(dim // num_heads)

    def forward(self, x: Tensor, pe: Tensor, mod) -> Tensor:
        """x [B, L, H] (text tokens first) -> same shape."""
        (shift, scale, gate), = mod
        x_mod = modulate(x, shift, scale)
        qkv, mlp = self.linear1(x_mod).split([3 * x.shape[-1], 2 * self.mlp_hidden], dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)                      # [B, heads, L, D]
        q, k = self.norm(q, k, pe)                                      # RMSNorm per head, RoPE
        attn = attention(q, k, v)                                       # [B, L, H]
        return x + gate * self.linear2(concat_swiglu(attn, mlp))        # of [B, L, H + M]


class LastLayer(nn.Module):
    """Final adaLN (shift, scale) and the projection back to packed latent channels (§2.8)."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=False))
        self.linear = nn.Linear(dim, out_channels, bias=False)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)   # shift first
        return self.linear(modulate(x, shift, scale))


class Flux2(nn.Module):
    """The FLUX.2 diffusion transformer: predicts the flow velocity of image tokens (§4)."""

    def __init__(self, cfg: Flux2Config = Flux2Config()):
        super().__init__()
        H = cfg.hidden_size
        if H % cfg.num_heads or sum(cfg.axes_dim) != H // cfg.num_heads:
            raise ValueError(f"axes_dim {cfg.axes_dim} must sum to the head dim "
                             f"{H // cfg.num_heads}")
        self.cfg = cfg
        self.img_in = nn.Linear(cfg.in_channels, H, bias=False)
        self.time_in = MLPEmbedder(256, H)
        if cfg.use_guidance_embed:
            self.guidance_in = MLPEmbedder(256, H)
        self.txt_in = nn.Linear(cfg.context_in_dim, H, bias=False)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(H, cfg.num_heads, cfg.mlp_ratio)
                                           for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(H, cfg.num_heads, cfg.mlp_ratio)
                                           for _ in range(cfg.depth_single_blocks))
        self.double_stream_modulation_img = Modulation(H, double=True)
        self.double_stream_modulation_txt = Modulation(H, double=True)
        self.single_stream_modulation = Modulation(H, double=False)
        self.final_layer = LastLayer(H, cfg.in_channels)

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                guidance: Tensor | None = None) -> Tensor:
        """img [B, L_img, 128] (target then reference tokens), ids [B, L, 4], txt [B, L_txt, ctx],
        t [B] in [0, 1], guidance [B] (dev) -> velocity [B, L_img, 128] for every image token."""
        vec = self.time_in(timestep_embedding(timesteps.to(img.dtype)))       # [B, H]
        if self.cfg.use_guidance_embed:
            if guidance is None:
                raise ValueError("this model has a guidance embedder (FLUX.2 dev): pass guidance, "
                                 "e.g. 4.0")
            vec = vec + self.guidance_in(timestep_embedding(guidance.to(img.dtype)))
        mod_img = self.double_stream_modulation_img(vec)
        mod_txt = self.double_stream_modulation_txt(vec)
        mod_single = self.single_stream_modulation(vec)
        img, txt = self.img_in(img), self.txt_in(txt)                         # [B, L_img|L_txt, H]
        B = img.shape[0]
        ids = torch.cat([txt_ids.expand(B, -1, -1), img_ids.expand(B, -1, -1)], dim=1)  # txt first
        pe = rope(ids, self.cfg.axes_dim, self.cfg.theta)                     # [B, 1, L, D/2, 2, 2]
        for block in self.double_blocks:
            img, txt = block(img, txt, pe, mod_img, mod_txt)
        x = torch.cat([txt, img], dim=1)                                      # [B, L, H]
        for block in self.single_blocks:
            x = block(x, pe, mod_single)
        return self.final_layer(x[:, txt.shape[1]:], vec)                     # [B, L_img, 128]

    @property
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks in execution order (what offload.py wraps)."""
        return [*self.double_blocks, *self.single_blocks]


# --------------------------------------------------------------------------------------------------
# Latent <-> tokens and position ids (reference §4)

def pack(z: Tensor) -> Tensor:
    """Latent [B, C, h, w] -> tokens [B, h*w, C], row-major."""
    return rearrange(z, "B C h w -> B (h w) C")


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """Tokens [B, h*w, C] -> latent [B, C, h, w]; the inverse of `pack`."""
    return rearrange(tokens, "B (h w) C -> B C h w", h=h, w=w)


def image_ids(h: int, w: int, t: int = 0) -> Tensor:
    """Position ids int64 [h*w, 4] = (t, row, col, 0), row-major; t = 0 for the target image,
    10 * (r + 1) for reference image r."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ids = torch.stack([torch.full_like(rows, t), rows, cols, torch.zeros_like(rows)], dim=-1)
    return ids.reshape(h * w, 4)


def text_ids(length: int) -> Tensor:
    """Position ids int64 [length, 4] = (0, 0, 0, n) for every text token, pads included."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids


# --------------------------------------------------------------------------------------------------
# The time axis (reference §7.1): FLUX.2 is sampled, and trained here, with times pushed towards
# noise (t = 1) by a shift that grows with the number of image tokens

def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """The resolution- and step-dependent time shift: linear in L between fits at 10 and 200 steps,
    step-free above 4300 tokens (so the schedule jumps there)."""
    a1, b1 = 8.73809524e-05, 1.89833333     # fit at 10 steps
    a2, b2 = 0.00016927, 0.45666666         # fit at 200 steps
    m200 = a2 * image_seq_len + b2
    if image_seq_len > 4300:
        return m200
    m10 = a1 * image_seq_len + b1
    return m10 + (m200 - m10) * (num_steps - 10) / 190


def time_shift(t: Tensor, mu: float) -> Tensor:
    """exp(mu) / (exp(mu) + (1/t - 1)): times in [0, 1] pushed towards 1; 0 and 1 stay put."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


# --------------------------------------------------------------------------------------------------
# FLOP counting, for MFU

# Dense bf16 matmul rates measured on these cards (bench/RESULTS.md; A100: its datasheet).
PEAK_BF16_FLOPS = {"H100": 798e12, "H200": 788e12, "A100": 312e12}


def train_step_flops(cfg: Flux2Config, batch: int, l_img: int, l_txt: int) -> float:
    """Model FLOPs of one LoRA training step, the MFU numerator: 4·N·T for the linears (forward and
    input-gradient backward; the frozen base needs no weight gradients) + 3·A for attention, A = its
    forward (4·L²·H per block). N counts the block weights a token meets (one stream's in a double
    block: 27.48B for dev); recompute is not counted."""
    H, M = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
    n = cfg.depth + cfg.depth_single_blocks
    N = (4 * H * H + 3 * H * M) * n             # qkv + proj + SwiGLU in/out, per token per block
    S = l_img + l_txt
    return 4 * N * batch * S + 3 * 4 * batch * S * S * H * n
