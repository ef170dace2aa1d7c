"""The FLUX.2 autoencoder: 16x16 pixels -> one 128-channel latent token (an 8x-down KL autoencoder
with 32 latent channels, 2x2-patchified and normalised with its BatchNorm running statistics), the
pixel conversion it expects, and its loader for a BFL `ae.safetensors` file or a diffusers `vae/`
folder.

Follows docs/flux2_reference.md §5 (architecture, normalisation; §5.3 the diffusers names, §5.4
the latent pipeline). Module attribute names are the BFL checkpoint keys
(`encoder.down.0.block.1.conv1.weight`). Shapes for a 1024² image: pixels [B, 3, 1024, 1024] ->
latent [B, 128, 64, 64] (flux2.pack turns it into [B, 4096, 128] tokens).
"""
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import nn

from util import LoadError
from weights import assign_weights, iter_tensors, read_keys, safetensors_files


# --------------------------------------------------------------------------------------------------
# The modules (reference §5)

@dataclass(frozen=True)
class AEConfig:
    in_channels: int = 3                # RGB
    ch: int = 128                       # width of the first level
    out_ch: int = 3                     # RGB
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)   # width of each level, x ch; one 2x resample between
    num_res_blocks: int = 2             # ResnetBlocks per encoder level (the decoder has one more)
    z_channels: int = 32                # latent channels before the 2x2 patchify (x 4 = 128)


AE_PRESETS = {
    "flux2": AEConfig(),
    # keeps the /16 factor and 4 * 32 = 128 packed channels, so it pairs with a tiny DiT of
    # in_channels 128
    "tiny": AEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=32),
}


def _group_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class ResnetBlock(nn.Module):
    """Two (GroupNorm, SiLU, 3x3 conv) steps plus the input (via a 1x1 conv if widths differ)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1 convs as projections."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):  # [B, C, H, W]
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2)[:, None]                # [B, 1, HW, C]
                   for m in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """3x3 conv with stride 2."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):  # padding on the right and bottom only, as the checkpoint was trained
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    """The lowest resolution: ResnetBlock, attention, ResnetBlock."""

    def __init__(self, c: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution: `block.{b}` ResnetBlocks, then `downsample` or `upsample` unless it is the
    last level."""

    def __init__(self, cin: int, cout: int, n_blocks: int, resample: str = ""):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if b == 0 else cout, cout)
                                   for b in range(n_blocks))
        self.resample = resample  # the attribute name is the checkpoint key
        if resample:
            setattr(self, resample, (Downsample if resample == "downsample" else Upsample)(cout))

    def forward(self, x):
        for block in self.block:
            x = block(x)
        return getattr(self, self.resample)(x) if self.resample else x


class Encoder(nn.Module):
    """Pixels [B, 3, H, W] -> moments (mean, logvar) [B, 2z, H/8, W/8]."""

    def __init__(self, c: AEConfig):
        super().__init__()
        chans = [c.ch * m for m in c.ch_mult]  # [128, 256, 512, 512]
        ins = [c.ch] + chans[:-1]  # a level's first block takes the previous level's width
        last = len(chans) - 1
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level(ins[l], chans[l], c.num_res_blocks, "downsample" if l < last else "")
            for l in range(len(chans)))
        self.mid = Mid(chans[-1])
        self.norm_out = _group_norm(chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], 2 * c.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * c.z_channels, 2 * c.z_channels, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(self.mid(h)))))


class Decoder(nn.Module):
    """Latent [B, z, h, w] -> pixels [B, 3, 8h, 8w]."""

    def __init__(self, c: AEConfig):
        super().__init__()
        chans = [c.ch * m for m in c.ch_mult]
        ins = chans[1:] + chans[-1:]  # up.l is fed by up.{l+1}; the lowest level by mid
        self.post_quant_conv = nn.Conv2d(c.z_channels, c.z_channels, 1)
        self.conv_in = nn.Conv2d(c.z_channels, chans[-1], 3, padding=1)
        self.mid = Mid(chans[-1])
        # up.0 is the highest resolution, so the forward pass walks up.{n-1} .. up.0
        self.up = nn.ModuleList(
            Level(ins[l], chans[l], c.num_res_blocks + 1, "upsample" if l > 0 else "")
            for l in range(len(chans)))
        self.norm_out = _group_norm(chans[0])
        self.conv_out = nn.Conv2d(chans[0], c.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """FLUX.2 VAE: encode/decode between pixels and the BN-normalised, 2x2-patchified latent the
    DiT sees."""

    def __init__(self, config: AEConfig = AE_PRESETS["flux2"]):
        super().__init__()
        self.config = config
        self.encoder, self.decoder = Encoder(config), Decoder(config)
        # only its running stats are used (never training mode): they whiten the patchified latent
        self.bn = nn.BatchNorm2d(4 * config.z_channels, eps=1e-4, affine=False)

    def _stats(self):
        """The BatchNorm's mean and std, each [1, 4z, 1, 1]."""
        std = (self.bn.running_var + self.bn.eps).sqrt()
        return self.bn.running_mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1], H and W multiples of 16 (2**levels) -> normalised
        latent [B, 4z, H/16, W/16]."""
        factor = 2 ** len(self.config.ch_mult)
        if pixels.shape[-2] % factor or pixels.shape[-1] % factor:
            raise ValueError(f"image size {tuple(pixels.shape[-2:])} must be a multiple of "
                             f"{factor}; crop it first")
        # the posterior mean (its mode), no sampling: [B, z, H/8, W/8]
        m = self.encoder(pixels)[:, : self.config.z_channels]
        z = rearrange(m, "B c (h pi) (w pj) -> B (c pi pj) h w", pi=2, pj=2)   # 2x2 patchify
        mean, std = self._stats()
        return (z - mean) / std

    def decode_bytes(self, *, height: int, width: int) -> int:
        """Bytes a decode to height x width pixels holds at its peak, beside the weights: in the
        second ResnetBlock at full resolution, the level's input (as wide as the level below, kept
        by the caller) and four tensors of the top level's width (the block's input, the conv's
        input and output, the tensor that output replaces); on a GPU the convolutions' workspace
        adds about two more of the level below (H200, float32: 4.77 GiB at 1024², this gives 5.0;
        bench/RESULTS.md §13). The offload plan keeps this much free between forwards."""
        c = self.config
        top = c.ch * c.ch_mult[0]
        below = c.ch * c.ch_mult[1] if len(c.ch_mult) > 1 else top
        itemsize = next(self.parameters()).element_size()
        return (3 * below + 4 * top) * height * width * itemsize

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latent [B, 4z, h, w] -> pixels [B, 3, 16h, 16w] (about [-1, 1]); the inverse
        of `encode`."""
        mean, std = self._stats()
        z = rearrange(z * std + mean, "B (c pi pj) h w -> B c (h pi) (w pj)", pi=2, pj=2)
        return self.decoder(z)


# --------------------------------------------------------------------------------------------------
# Pixels: the autoencoder reads and writes RGB in [-1, 1] (reference §5.4)

def to_pixels(img: Image.Image) -> torch.Tensor:
    """8-bit RGB image -> float32 pixels [3, H, W] in [-1, 1], what AutoEncoder.encode takes."""
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return a.float() / 127.5 - 1.0


def to_image(pixels: torch.Tensor) -> Image.Image:
    """Pixels [3, H, W] in [-1, 1] -> 8-bit RGB, truncating like the reference ((x + 1) * 127.5,
    then byte)."""
    return Image.fromarray(((pixels.float() + 1) * 127.5).byte().permute(1, 2, 0).cpu().numpy())


# --------------------------------------------------------------------------------------------------
# Loading (reference §5.3)

# diffusers `vae/` name -> BFL name (§5.3), applied in order after the decoder's up index is
# reversed.
_VAE_DIFFUSERS_TO_BFL = [
    (r"^quant_conv\.", "encoder.quant_conv."),
    (r"^post_quant_conv\.", "decoder.post_quant_conv."),
    (r"\.(down|up)_blocks\.(\d+)\.resnets\.", r".\1.\2.block."),
    (r"\.(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.", r".\1.\2.\3sample."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
    (r"\.mid_block\.attentions\.0\.to_([qkv])\.", r".mid.attn_1.\1."),
    (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
    (r"\.conv_norm_out\.", ".norm_out."),
]


def _vae_bfl_name(key: str, levels: int) -> str:
    """BFL name of a checkpoint key; BFL keys pass through unchanged."""
    # diffusers lists decoder levels lowest resolution first, BFL highest first
    key = re.sub(r"\.up_blocks\.(\d+)\.", lambda m: f".up_blocks.{levels - 1 - int(m[1])}.", key)
    for pattern, repl in _VAE_DIFFUSERS_TO_BFL:
        key = re.sub(pattern, repl, key)
    return key


def _ae_tensors(files, levels: int):
    """(BFL name, tensor) pairs from a BFL or diffusers checkpoint, streamed."""
    for k, t in iter_tensors(files):
        # the only 2-D tensors are diffusers' attention Linears [C, C]; BFL stores them as 1x1
        # convs [C, C, 1, 1]
        yield _vae_bfl_name(k, levels), t[:, :, None, None] if t.ndim == 2 else t


def _ae_config_from_shapes(shapes: dict, levels: int, source) -> AEConfig:
    """AEConfig from BFL-named tensor shapes."""
    try:
        ch = shapes["encoder.conv_in.weight"][0]
        blocks = {k.split(".")[4] for k in shapes if k.startswith("encoder.down.0.block.")}
        return AEConfig(
            in_channels=shapes["encoder.conv_in.weight"][1], ch=ch,
            out_ch=shapes["decoder.conv_out.weight"][0],
            ch_mult=tuple(shapes[f"encoder.down.{l}.block.0.conv1.weight"][0] // ch
                          for l in range(levels)),
            num_res_blocks=len(blocks), z_channels=shapes["decoder.post_quant_conv.weight"][0])
    except KeyError as e:
        raise LoadError(f"{source}: no tensor {e} (BFL or diffusers naming); "
                        f"is this a FLUX.2 autoencoder?") from None


def _check_vae_config_json(folder: Path):
    """Reject diffusers settings that the tensor shapes cannot reveal but this module hard-codes."""
    file = folder / "config.json"
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise LoadError(f"{file}: not valid JSON ({e}); download it again") from None
    want = {"norm_num_groups": 32, "batch_norm_eps": 1e-4, "patch_size": [2, 2], "act_fn": "silu"}
    for key, value in want.items():
        got = cfg.get(key, value)
        if (list(got) if isinstance(got, (list, tuple)) else got) != value:
            raise LoadError(f"{file}: {key}={got!r} is not supported (FLUX.2 uses {value!r})")


def load_ae(path, device="cpu", dtype=torch.float32, config: AEConfig | None = None) -> AutoEncoder:
    """Load a BFL `ae.safetensors` file or a diffusers `vae/` folder; the config is read off the
    tensor shapes."""
    path = Path(path)
    files = safetensors_files(path)
    if path.is_dir() and (path / "config.json").is_file():
        _check_vae_config_json(path)
    keys = read_keys(files)
    levels = len({m[1] for k in keys if (m := re.match(r"encoder\.down(?:_blocks)?\.(\d+)\.", k))})
    shapes = {_vae_bfl_name(k, levels): s for k, s in keys.items()}
    config = config or _ae_config_from_shapes(shapes, levels, path)
    with torch.device("meta"):
        model = AutoEncoder(config)
    assign_weights(model, _ae_tensors(files, levels), device=device, dtype=dtype, source=path,
                   what="FLUX.2 autoencoder")
    return model.eval()
