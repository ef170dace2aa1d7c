"""The DiT equals diffusers' Flux2Transformer2DModel (float64), loaded through our loaders from both file layouts."""
import json

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from safetensors.torch import save_file

import weights
from flux2 import Flux2, PRESETS
from util import LoadError
from weights import load_flux2

CONFIGS = {  # two tiny shapes; >= 2 blocks of each kind so per-index mistakes show
    "guided": dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
                   joint_attention_dim=24, axes_dims_rope=(8, 8, 8, 8), mlp_ratio=3.0, guidance_embeds=True),
    "klein-like": dict(in_channels=8, num_layers=3, num_single_layers=2, attention_head_dim=16, num_attention_heads=3,
                       joint_attention_dim=20, axes_dims_rope=(4, 4, 4, 4), mlp_ratio=2.0, guidance_embeds=False),
}

# Our independent statement of the BFL <- diffusers key table (flux2_reference.md §3.4), used to write BFL files.
GLOBAL = {"x_embedder": "img_in", "context_embedder": "txt_in",
          "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
          "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
          "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
          "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
          "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
          "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
          "single_stream_modulation.linear": "single_stream_modulation.lin", "proj_out": "final_layer.linear",
          "norm_out.linear": "final_layer.adaLN_modulation.1"}
DOUBLE = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
          "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
          "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.linear_in": "img_mlp.0",
          "ff.linear_out": "img_mlp.2", "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2", "attn.norm_q": "norm.query_norm",
          "attn.norm_k": "norm.key_norm"}


def to_bfl(sd: dict) -> dict:
    """diffusers transformer state dict -> BFL names (q/k/v fused, final adaLN halves swapped)."""
    out = {}
    for key, t in sd.items():
        stem, leaf = key.rsplit(".", 1)
        if stem.startswith("transformer_blocks."):
            _, i, rest = stem.split(".", 2)
            if rest in ("attn.to_q", "attn.add_q_proj"):
                s = "img_attn" if rest == "attn.to_q" else "txt_attn"
                names = [f"attn.to_{c}" for c in "qkv"] if s == "img_attn" else [f"attn.add_{c}_proj" for c in "qkv"]
                out[f"double_blocks.{i}.{s}.qkv.weight"] = torch.cat([sd[f"transformer_blocks.{i}.{n}.weight"]
                                                                      for n in names])
            elif rest in ("attn.to_k", "attn.to_v", "attn.add_k_proj", "attn.add_v_proj"):
                continue
            else:
                name = DOUBLE[rest]
                out[f"double_blocks.{i}.{name}.{'scale' if 'norm' in name else leaf}"] = t
        elif stem.startswith("single_transformer_blocks."):
            _, i, rest = stem.split(".", 2)
            name = SINGLE[rest]
            out[f"single_blocks.{i}.{name}.{'scale' if 'norm' in name else leaf}"] = t
        else:
            if stem == "norm_out.linear":
                scale, shift = t.chunk(2)
                t = torch.cat([shift, scale])
            out[f"{GLOBAL[stem]}.{leaf}"] = t
    return out


def random_reference(config: dict, seed: int = 0) -> Flux2Transformer2DModel:
    torch.manual_seed(seed)
    ref = Flux2Transformer2DModel(**config).double().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():  # a real spread; default init leaves layers near zero
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return ref


def image_ids(h, w, t=0):
    """(t, row, col, 0) for a row-major h x w grid (flux2_reference.md §4)."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.full_like(rows, t), rows, cols, torch.zeros_like(rows)], -1).reshape(-1, 4)


def text_ids(n):
    return torch.stack([torch.zeros(n, dtype=torch.long)] * 3 + [torch.arange(n)], -1)


def inputs(config: dict, refs: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    h, w, L_txt = 3, 4, 5                                                    # non-square latent grid
    img_ids = image_ids(h, w)
    if refs:
        img_ids = torch.cat([img_ids, image_ids(2, 2, t=10)])
    L = img_ids.shape[0]
    return dict(
        img=torch.randn(2, L, config["in_channels"], generator=g, dtype=torch.float64),
        txt=torch.randn(2, L_txt, config["joint_attention_dim"], generator=g, dtype=torch.float64),
        img_ids=img_ids[None].expand(2, -1, -1), txt_ids=text_ids(L_txt)[None].expand(2, -1, -1),
        timesteps=torch.tensor([0.3, 0.9], dtype=torch.float64),
        guidance=torch.tensor([4.0, 2.5], dtype=torch.float64) if config["guidance_embeds"] else None)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("layout", ["diffusers", "bfl", "bfl-prefixed"])
def test_dit_matches_diffusers(tmp_path, name, layout):
    config = CONFIGS[name]
    ref = random_reference(config)
    if layout == "diffusers":
        ref.save_pretrained(tmp_path / "transformer")
        path = tmp_path / "transformer"
    else:
        prefix = "model.diffusion_model." if layout == "bfl-prefixed" else ""
        path = tmp_path / "flux2.safetensors"
        save_file({prefix + k: v.contiguous() for k, v in to_bfl(ref.state_dict()).items()}, path)
    ours = load_flux2(path, dtype=torch.float64)
    assert ours.cfg.hidden_size == config["attention_head_dim"] * config["num_attention_heads"]
    for refs in (False, True):
        x = inputs(config, refs)
        with torch.no_grad():
            want = ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], timestep=x["timesteps"],
                       img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"], return_dict=False)[0]
            got = ours(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["guidance"])
        assert got.shape == want.shape
        assert rel_err(got, want) <= 1e-6, (name, layout, refs, rel_err(got, want))


def test_batch_elements_are_independent():
    """Each sample's output depends only on its own inputs (no cross-batch mixing in attention or modulation)."""
    config = CONFIGS["guided"]
    ref = random_reference(config)
    ours = Flux2(weights._config_from_diffusers(config)).double()
    ours.load_state_dict(to_bfl(ref.state_dict()))
    x = inputs(config, refs=True)
    with torch.no_grad():
        both = ours(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["guidance"])
        one = ours(x["img"][1:], x["img_ids"][1:], x["txt"][1:], x["txt_ids"][1:], x["timesteps"][1:],
                   x["guidance"][1:])
    assert rel_err(both[1:], one) <= 1e-12


def test_name_table_maps_every_diffusers_parameter_to_ours():
    """weights.bfl_module knows the module of every diffusers parameter and names a module of ours
    (q/k/v to their third of the fused qkv); names outside the table give None."""
    config = CONFIGS["guided"]
    with torch.device("meta"):
        ref = Flux2Transformer2DModel(**config)
        ours = dict(Flux2(weights._config_from_diffusers(config)).named_modules())
    for name, _ in ref.named_parameters():
        hit = weights.bfl_module(name.rsplit(".", 1)[0])
        assert hit is not None and hit[0] in ours, name
    assert weights.bfl_module("transformer_blocks.1.attn.add_v_proj") == ("double_blocks.1.txt_attn.qkv", 2)
    assert weights.bfl_module("norm_out.linear") == ("final_layer.adaLN_modulation.1", "swap")
    assert weights.bfl_module("transformer_blocks.1.attn.unknown") is None


@pytest.mark.parametrize("preset,keys,params", [("dev", 299, 32_223_281_152), ("klein-4b", 149, 3_875_544_576),
                                                ("klein-9b", 201, 9_078_581_248)])
def test_preset_sizes_on_meta(preset, keys, params):
    with torch.device("meta"):
        model = Flux2(PRESETS[preset])
    sd = model.state_dict()
    assert len(sd) == keys
    assert sum(t.numel() for t in sd.values()) == params
    assert "final_layer.adaLN_modulation.1.weight" in sd and "single_blocks.0.linear1.weight" in sd


def test_klein_file_where_dev_expected_is_refused(tmp_path, monkeypatch):
    """A klein-shaped file passed as dev: one clear error saying what the file looks like, before reading data."""
    with torch.device("meta"):
        klein = Flux2(PRESETS["klein-4b"])
    path = tmp_path / "flux-2-klein-4b.safetensors"
    save_file({"img_in.weight": torch.zeros(1)}, path)
    monkeypatch.setattr(weights, "read_keys", lambda files: {k: tuple(v.shape) for k, v in klein.state_dict().items()})
    with pytest.raises(LoadError, match=r"flux-2-klein-4b.safetensors: this looks like klein-4b .*not dev"):
        load_flux2(path, expect="dev")


def test_truncated_and_mismatched_files(tmp_path):
    tiny = Flux2(PRESETS["tiny"])
    sd = {k: v.contiguous() for k, v in tiny.state_dict().items()}
    good = tmp_path / "good.safetensors"
    save_file(sd, good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(LoadError, match="cut.safetensors"):
        load_flux2(cut)
    sd.pop("single_blocks.1.linear2.weight")
    missing = tmp_path / "missing.safetensors"
    save_file(sd, missing)
    with pytest.raises(LoadError, match=r"missing.safetensors.*single_blocks\.1\.linear2\.weight"):
        load_flux2(missing)


def test_missing_shard(tmp_path):
    ref = random_reference(CONFIGS["guided"])
    ref.save_pretrained(tmp_path / "transformer", max_shard_size="20KB")
    index = json.loads((tmp_path / "transformer/diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "transformer" / shard).unlink()
    with pytest.raises(LoadError, match=shard):
        load_flux2(tmp_path / "transformer")
