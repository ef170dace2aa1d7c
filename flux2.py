"""FLUX.2 in plain PyTorch: the diffusion transformer (DiT), the autoencoder, the Mistral text encoder,
the tokenizer, and streaming loaders for the official files.

Follows docs/flux2_reference.md (BFL `src/flux2/model.py`): §1-2 for the DiT, §3 for the checkpoint keys,
§4 for the forward pass, §5 for the autoencoder and §6 for the text encoder. Module attribute names ARE the
BFL checkpoint keys (`double_blocks.3.img_attn.qkv.weight`), so a BFL file loads with no renaming; other
layouts (diffusers folders, HF shards) are mapped to these names in one converter per format.

Shapes use B batch, L_img image tokens, L_txt text tokens (512), H hidden (6144 for dev), D head dim (128).
"""
import json
import math
from dataclasses import dataclass, asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _common_part import LoadError, safetensors_files, iter_tensors, read_keys, assign_weights  # noqa: F401


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


def preset_name(cfg: Flux2Config) -> str:
    """The preset a config equals, or 'custom'."""
    return next((name for name, p in PRESETS.items() if p == cfg), "custom")


# ----------------------------------------------------------------------------------------------------------
# The math, as small functions (reference §2.2, §2.4, §2.7)

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


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """Joint attention with RoPE, no mask: q, k, v [B, heads, L, D] -> [B, L, heads*D]."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    x = F.scaled_dot_product_attention(q, k, v)
    return x.transpose(1, 2).flatten(2)


def layer_norm(x: Tensor) -> Tensor:
    """LayerNorm without affine parameters, eps 1e-6 (pre-attention, pre-MLP and final norms)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """(1 + scale) * LN(x) + shift."""
    return torch.addcmul(shift, 1 + scale, layer_norm(x))


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
    """RMS norm over the head dim with a learned `scale`, computed in at least fp32."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(_compute_dtype(x))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return xf.to(x.dtype) * self.scale.to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


class SelfAttention(nn.Module):
    """Per-stream attention weights of a double block (driven by the block; no forward of its own)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=False)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, L, H] -> normalised q, k and v [B, heads, L, D]."""
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


class SiLUActivation(nn.Module):
    """SwiGLU: silu of the first half times the second half."""

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b


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
        a = attention(torch.cat([txt_q, img_q], 2), torch.cat([txt_k, img_k], 2), torch.cat([txt_v, img_v], 2), pe)
        txt_a, img_a = a[:, :txt.shape[1]], a[:, txt.shape[1]:]     # text first
        img = img + img_gate1 * self.img_attn.proj(img_a)
        img = img + img_gate2 * self.img_mlp(modulate(img, img_shift2, img_scale2))
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_a)
        txt = txt + txt_gate2 * self.txt_mlp(modulate(txt, txt_shift2, txt_scale2))
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
        self.mlp_act = SiLUActivation()

    def forward(self, x: Tensor, pe: Tensor, mod) -> Tensor:
        """x [B, L_txt + L_img, H] -> same shape."""
        (shift, scale, gate), = mod
        qkv, mlp = self.linear1(modulate(x, shift, scale)).split([3 * x.shape[-1], 2 * self.mlp_hidden], dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        a = attention(q, k, v, pe)                                    # [B, L, H]
        return x + gate * self.linear2(torch.cat([a, self.mlp_act(mlp)], dim=-1))


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


def load_flux2(path, device="cpu", dtype=torch.bfloat16, expect: str | None = None) -> Flux2:
    """Load a BFL single file (`flux2-dev.safetensors`, optionally `model.diffusion_model.`-prefixed) or a
    diffusers `transformer/` folder, streaming tensors into a meta-built model. `expect` names a preset."""
    path = Path(path)
    files = safetensors_files(path)
    if path.is_dir() and (path / "config.json").is_file():
        cfg, tensors = _config_from_diffusers(json.loads((path / "config.json").read_text())), _dit_from_diffusers(files)
    else:
        try:
            cfg = _config_from_bfl_shapes(read_keys(files))
        except LoadError as e:
            raise LoadError(f"{path}: {e}") from None
        tensors = _strip_prefix(files)
    looks_like = preset_name(cfg)
    if expect is not None and looks_like != expect:
        raise LoadError(f"{path}: this looks like {looks_like} ({cfg.depth}+{cfg.depth_single_blocks} blocks, "
                        f"hidden {cfg.hidden_size}), not {expect}; pass the {expect} checkpoint")
    with torch.device("meta"):
        model = Flux2(cfg)
    try:
        assign_weights(model, tensors, device=device, dtype=dtype, source=path, what=f"FLUX.2 {looks_like}")
    except LoadError as e:
        raise LoadError(f"{e} (the file looks like {looks_like})") from None
    return model.eval().requires_grad_(False)


# --- parts written in parallel; inlined here before the merge ---
try:
    from _vae_part import *  # noqa: F401,F403
except ImportError:
    pass
try:
    from _text_part import *  # noqa: F401,F403
except ImportError:
    pass


# ----------------------------------------------------------------------------------------------------------
# A whole FLUX.2-dev snapshot, and the tiny random-weight stack for the CPU demo

SNAPSHOT_PARTS = {  # part -> accepted locations inside a FLUX.2-dev snapshot directory, first match wins
    "transformer": ["flux2-dev.safetensors", "transformer"],
    "vae": ["ae.safetensors", "vae"],
    "text_encoder": ["text_encoder"],
    "tokenizer": ["tokenizer/tokenizer.json", "tokenizer/tekken.json", "tokenizer.json", "tekken.json"],
}


def find_snapshot(model_dir) -> dict[str, Path]:
    """Locate the DiT, VAE, text encoder and tokenizer in a FLUX.2-dev snapshot; say exactly what is missing."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise LoadError(f"{model_dir}: not a folder; --model-dir takes a FLUX.2-dev snapshot directory")
    found = {}
    for part, candidates in SNAPSHOT_PARTS.items():
        hit = next((model_dir / c for c in candidates if (model_dir / c).exists()), None)
        if hit is None:
            raise LoadError(f"{model_dir}: no {part} found (looked for {', '.join(candidates)}); "
                            f"download that part of black-forest-labs/FLUX.2-dev into this folder")
        found[part] = hit
    return found


def tiny_models(seed: int = 0, dtype=torch.float32):
    """The tiny demo stack with random weights from `seed`: (DiT, autoencoder, text encoder, tokenizer)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit = Flux2(PRESETS["tiny"]).to(dtype)
        ae = AutoEncoder(AE_PRESETS["tiny"]).to(dtype)
        text = MistralEncoder(TEXT_PRESETS["tiny"]).to(dtype)
    for m in (dit, ae, text):
        m.eval().requires_grad_(False)
    return dit, ae, text, Tokenizer.tiny()
