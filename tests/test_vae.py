"""Tests for the FLUX.2 autoencoder and token helpers (flux2_reference.md §5) against diffusers' AutoencoderKLFlux2
and the patchify / BN / packing / ids steps of Flux2Pipeline (oracle.md §1.3, §2.2, §3.2, §3.3, §7.2)."""
import json
import re
import weakref

import pytest
import torch
from diffusers import AutoencoderKLFlux2, Flux2Pipeline
from safetensors.torch import save_file

from flux2 import image_ids, pack, text_ids, unpack
from util import LoadError
from vae import AE_PRESETS, AEConfig, AutoEncoder, load_ae

# oracle.md §1.3 [RUN] config: every channel count a multiple of 32 (GroupNorm(32)), both quant convs present
TINY = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=32,
            sample_size=32)
TINY_AE = AEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)

# diffusers prefix -> BFL prefix for TINY (oracle.md §2.2); the longest matching prefix wins.
# Decoder levels are reversed: diffusers up_blocks.0 (64 ch, lowest resolution) is BFL up.1.
DIFFUSERS_TO_BFL = {
    "bn.": "bn.",
    "quant_conv.": "encoder.quant_conv.",
    "post_quant_conv.": "decoder.post_quant_conv.",
    "encoder.down_blocks.0.resnets.0.": "encoder.down.0.block.0.",
    "encoder.down_blocks.0.downsamplers.0.conv.": "encoder.down.0.downsample.conv.",
    "encoder.down_blocks.1.resnets.0.": "encoder.down.1.block.0.",
    "encoder.down_blocks.1.resnets.0.conv_shortcut.": "encoder.down.1.block.0.nin_shortcut.",
    "decoder.up_blocks.0.resnets.0.": "decoder.up.1.block.0.",
    "decoder.up_blocks.0.resnets.1.": "decoder.up.1.block.1.",
    "decoder.up_blocks.0.upsamplers.0.conv.": "decoder.up.1.upsample.conv.",
    "decoder.up_blocks.1.resnets.0.": "decoder.up.0.block.0.",
    "decoder.up_blocks.1.resnets.0.conv_shortcut.": "decoder.up.0.block.0.nin_shortcut.",
    "decoder.up_blocks.1.resnets.1.": "decoder.up.0.block.1.",
}
for side in ("encoder", "decoder"):
    DIFFUSERS_TO_BFL |= {
        f"{side}.conv_in.": f"{side}.conv_in.",
        f"{side}.conv_out.": f"{side}.conv_out.",
        f"{side}.conv_norm_out.": f"{side}.norm_out.",
        f"{side}.mid_block.resnets.0.": f"{side}.mid.block_1.",
        f"{side}.mid_block.resnets.1.": f"{side}.mid.block_2.",
        f"{side}.mid_block.attentions.0.group_norm.": f"{side}.mid.attn_1.norm.",
        f"{side}.mid_block.attentions.0.to_q.": f"{side}.mid.attn_1.q.",
        f"{side}.mid_block.attentions.0.to_k.": f"{side}.mid.attn_1.k.",
        f"{side}.mid_block.attentions.0.to_v.": f"{side}.mid.attn_1.v.",
        f"{side}.mid_block.attentions.0.to_out.0.": f"{side}.mid.attn_1.proj_out.",
    }


def to_bfl(sd: dict) -> dict:
    """diffusers state dict -> BFL names, attention Linears [C,C] -> 1x1 convs [C,C,1,1]."""
    out = {}
    for k, t in sd.items():
        prefix = max((p for p in DIFFUSERS_TO_BFL if k.startswith(p)), key=len)  # max() of nothing fails: unmapped key
        name = DIFFUSERS_TO_BFL[prefix] + k[len(prefix):]
        out[name] = t[:, :, None, None].contiguous() if t.ndim == 2 else t.contiguous()
    return out


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def randomize_(model: torch.nn.Module, gen: torch.Generator):
    """Unit-gain random weights, visibly non-trivial norms/biases, BN stats with var in [0.5, 2]."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * p[0].numel() ** -0.5)
            else:  # GroupNorm scales around 1, every bias around 0
                centre = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2 + centre)
        bn = model.bn
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen, dtype=bn.running_mean.dtype) * 0.5)
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen, dtype=bn.running_var.dtype) * 1.5 + 0.5)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """A random float64 diffusers VAE, saved as a diffusers folder and as a BFL-named single file."""
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(**TINY).double().eval()
    randomize_(vae, torch.Generator().manual_seed(0))
    root = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(root / "vae", safe_serialization=True)
    save_file(to_bfl(vae.state_dict()), root / "ae.safetensors")
    return vae, root


def ref_encode(vae, x):
    """Flux2Pipeline's image -> latent path: posterior mode, 2x2 patchify, BN-normalise."""
    z = Flux2Pipeline._patchify_latents(vae.encode(x).latent_dist.mode())
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = (vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).sqrt()
    return (z - mean) / std


def ref_decode(vae, z):
    """Flux2Pipeline's latent -> image path: de-normalise, unpatchify, decode."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = (vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).sqrt()
    return vae.decode(Flux2Pipeline._unpatchify_latents(z * std + mean)).sample


@pytest.mark.parametrize("layout", ["vae", "ae.safetensors"])
@torch.no_grad()
def test_matches_diffusers(ref, layout):
    vae, root = ref
    ae = load_ae(root / layout, dtype=torch.float64)
    assert ae.config == TINY_AE
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 48, generator=gen, dtype=torch.float64) * 2 - 1  # non-square; factor 4 for 2 levels
    z_ref = ref_encode(vae, x)
    z = ae.encode(x)
    assert z.shape == z_ref.shape == (2, 16, 8, 12)
    enc_err = rel_err(z, z_ref)
    zin = torch.randn(2, 16, 8, 12, generator=gen, dtype=torch.float64)
    img_ref = ref_decode(vae, zin)
    img = ae.decode(zin)
    assert img.shape == img_ref.shape == (2, 3, 32, 48)
    dec_err = rel_err(img, img_ref)
    print(f"{layout}: encode rel err {enc_err:.1e}, decode rel err {dec_err:.1e}")
    assert enc_err <= 1e-6 and dec_err <= 1e-6


@torch.no_grad()
def test_tiny_preset_roundtrip_and_shapes(tmp_path):
    """Our own state dict saved as a BFL file loads back with the inferred 4-level config, bit-identical."""
    ae = AutoEncoder(AE_PRESETS["tiny"]).double().eval()
    randomize_(ae, torch.Generator().manual_seed(2))
    save_file(ae.state_dict(), tmp_path / "ae.safetensors")
    loaded = load_ae(tmp_path / "ae.safetensors", dtype=torch.float64)
    assert loaded.config == AE_PRESETS["tiny"]
    x = torch.rand(1, 3, 32, 48, dtype=torch.float64) * 2 - 1
    z = loaded.encode(x)
    assert z.shape == (1, 128, 2, 3)  # /16 and 4 * 32 packed channels, like the real VAE
    assert torch.equal(z, ae.encode(x))
    assert loaded.decode(z).shape == (1, 3, 32, 48)
    with pytest.raises(ValueError, match="multiple of 16"):
        loaded.encode(x[..., :40])


def test_pack_unpack_and_ids():
    z = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    tokens = pack(z)
    assert tokens.shape == (2, 12, 5)
    assert torch.equal(tokens, Flux2Pipeline._pack_latents(z))
    assert torch.equal(tokens[:, 1 * 4 + 2], z[:, :, 1, 2])  # row-major
    assert torch.equal(unpack(tokens, 3, 4), z)

    ids = image_ids(3, 5)
    assert ids.dtype == torch.int64 and ids.shape == (15, 4)
    assert torch.equal(ids, Flux2Pipeline._prepare_latent_ids(torch.zeros(1, 1, 3, 5))[0])
    assert ids[7].tolist() == [0, 1, 2, 0]
    # reference r gets t = 10 * (r + 1): the second of two refs is t = 20
    refs = Flux2Pipeline._prepare_image_ids([torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 3, 5)])[0]
    assert torch.equal(image_ids(2, 2, t=10), refs[:4]) and torch.equal(image_ids(3, 5, t=20), refs[4:])

    tids = text_ids(7)
    assert tids.dtype == torch.int64
    assert torch.equal(tids, Flux2Pipeline._prepare_text_ids(torch.zeros(1, 7, 8))[0])


def test_bad_inputs(ref, tmp_path):
    vae, root = ref
    cut = tmp_path / "cut.safetensors"
    data = (root / "ae.safetensors").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match=re.escape(str(cut))):
        load_ae(cut)

    no_weights = tmp_path / "vae"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((root / "vae" / "config.json").read_text())
    with pytest.raises(LoadError, match="no .safetensors"):
        load_ae(no_weights)

    weights = "diffusion_pytorch_model.safetensors"
    (no_weights / weights).write_bytes((root / "vae" / weights).read_bytes())
    cfg = json.loads((no_weights / "config.json").read_text())
    (no_weights / "config.json").write_text(json.dumps(cfg | {"norm_num_groups": 16}))
    with pytest.raises(LoadError, match="norm_num_groups"):
        load_ae(no_weights)

    other = tmp_path / "other.safetensors"
    save_file({"model.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(LoadError, match="autoencoder"):
        load_ae(other)

    with pytest.raises(LoadError, match="shape"):  # an explicit config that does not fit the file
        load_ae(root / "ae.safetensors", config=AE_PRESETS["tiny"])


def test_flux2_preset_size():
    """The real VAE: 248 weight tensors + 2 BN stats = 84,046,371 elements, the same as diffusers' default."""
    with torch.device("meta"):
        ours, theirs = AutoEncoder(AE_PRESETS["flux2"]), AutoencoderKLFlux2()
    sd, ref_sd = ours.state_dict(), theirs.state_dict()
    stats = ["bn.running_mean", "bn.running_var"]
    assert len(list(ours.parameters())) == 248
    assert sum(p.numel() for p in ours.parameters()) + sum(sd[k].numel() for k in stats) == 84_046_371
    assert sum(t.numel() for k, t in ref_sd.items() if k != "bn.num_batches_tracked") == 84_046_371
    assert len(sd) == len(ref_sd) == 251  # + bn.num_batches_tracked
    # same tensors up to naming: compare the multisets of shapes (diffusers attention Linears as 1x1 convs)
    shapes = lambda d: sorted(tuple(t.shape) + ((1, 1) if t.ndim == 2 else ()) for t in d.values())
    assert shapes(sd) == shapes(ref_sd)
    assert sum(p.numel() for p in ours.encoder.parameters()) == 34_425_856
    assert sum(p.numel() for p in ours.decoder.parameters()) == 49_620_259


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of the storages that ops create and that are still alive; keeps the peak."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.live:
                key = t.untyped_storage().data_ptr()
                self.live[key] = t.untyped_storage().nbytes()
                weakref.finalize(t.untyped_storage(), self.live.pop, key, None)
                self.peak = max(self.peak, sum(self.live.values()))
        return out


@pytest.mark.parametrize("config", [AE_PRESETS["tiny"], AEConfig(ch=32, ch_mult=(1, 2, 2, 2))])
def test_decode_bytes_covers_the_decode(config):
    """AutoEncoder.decode_bytes (what the offload plan keeps free for a decode) is at least what a
    decode holds at its peak beside the weights, and at most twice it (its GPU workspace term is
    measured in bench/RESULTS.md)."""
    ae = AutoEncoder(config).eval()
    z = torch.randn(1, 4 * config.z_channels, 8, 12)
    with torch.no_grad(), _LiveBytes() as counter:
        ae.decode(z)
    need = ae.decode_bytes(height=128, width=192)
    assert counter.peak <= need <= 2 * counter.peak, (counter.peak, need)
