"""The Mistral text encoder against transformers' Mistral3ForConditionalGeneration (float64, SDPA attention).

Oracle recipe: docs/oracle.md §4.5 (tiny random Mistral3) and §7.3 (compare hidden_states[k] at every position,
left pads included, with a zero and a non-zero <pad> embedding row).
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralForCausalLM
from transformers import MistralConfig as HFMistralConfig

from util import LoadError
from text_encoder import load_text_encoder
from test_sample import TEXT as SAMPLE_TEXT, VISION, randomize as randomize_all

TEXT = {**SAMPLE_TEXT, "hidden_size": 32, "intermediate_size": 64}     # oracle §4.5's tiny Mistral3
PAD = 11


def randomize(model, pad_row_zero: bool, seed: int = 0):
    """Every parameter drawn with a real spread (HF init leaves norms at 1 and linears near 0), float64; the pad
    embedding row zero (as HF initialises it) or not."""
    model = randomize_all(model, seed, std=0.3)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[PAD] = 0 if pad_row_zero else emb[PAD]
    return model


def mistral3(pad_row_zero: bool):
    model = Mistral3ForConditionalGeneration(Mistral3Config(text_config=TEXT, vision_config=VISION,
                                                           image_token_index=10))
    assert model.config.text_config._attn_implementation == "sdpa"    # what diffusers/BFL run
    return randomize(model, pad_row_zero)


def batch():
    """3 prompts of 24, 17 and 6 tokens, left-padded to 24 with <pad>."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 131072, (3, 24), generator=g)
    mask = torch.ones(3, 24, dtype=torch.long)
    for row, n in enumerate((24, 17, 6)):
        ids[row, :24 - n], mask[row, :24 - n] = PAD, 0
    return ids, mask


def reference(model, layers):
    """cat(hs[k] for k in layers) from transformers: [3, 24, len(layers) * 32]."""
    ids, mask = batch()
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
    return torch.cat([hs[k] for k in layers], dim=-1)


def ours(folder, layers):
    enc = load_text_encoder(folder, layers=layers, dtype=torch.float64)
    ids, mask = batch()
    with torch.no_grad():
        return enc, enc(ids, mask)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=[True, False], ids=["pad-row-zero", "pad-row-random"])
def saved(request, tmp_path_factory):
    """(model, folder) of a saved tiny Mistral3; transformers 5 writes the legacy `language_model.model.*` keys."""
    model = mistral3(pad_row_zero=request.param)
    folder = tmp_path_factory.mktemp("mistral3")
    model.save_pretrained(folder)
    return model, folder


def test_matches_transformers_at_every_position(saved):
    model, folder = saved
    assert any(k.startswith("language_model.model.") for k in load_file(folder / "model.safetensors"))
    enc, out = ours(folder, (1, 2, 3))
    ref = reference(model, (1, 2, 3))
    assert out.shape == (3, 24, 96)
    assert rel_err(out, ref) <= 1e-6
    pads = ~batch()[1].bool()
    pad_rows = out[pads]                                       # [n_pads, 96]
    if model.get_input_embeddings().weight[PAD].any():
        # pad states = the pad embedding through the MLP sub-layers only: non-zero, the same at every pad position
        assert pad_rows.abs().min() > 0 and rel_err(pad_rows, pad_rows[:1].expand_as(pad_rows)) == 0
    else:
        assert (pad_rows == 0).all()


def test_pad_rows_do_not_depend_on_the_sdpa_kernel(saved, monkeypatch):
    """CUDA's cuDNN SDPA kernel (picked for bf16) returns arbitrary values for fully masked rows, where the CPU,
    math and efficient kernels return 0. Emulate such a kernel: the features must not change."""
    model, folder = saved
    ref = reference(model, (1, 2, 3))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def other_kernel(q, k, v, attn_mask, **kw):
        blind = ~attn_mask.any(dim=-1, keepdim=True)                  # fully masked query rows [B, 1, L, 1]
        return sdpa(q, k, v, attn_mask=attn_mask | blind, **kw)      # give them every key instead of none

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", other_kernel)
    enc, out = ours(folder, (1, 2, 3))
    assert rel_err(out, ref) <= 1e-6


def test_deepest_selected_layer_bounds_what_is_built(saved):
    model, folder = saved
    enc, out = ours(folder, (2, 1))
    assert len(enc.layers) == 2 and out.shape == (3, 24, 64)
    assert rel_err(out, reference(model, (2, 1))) <= 1e-6   # order of the argument: [hs[2] | hs[1]]


def test_unused_tensors_are_never_assigned(saved, tmp_path):
    """Layers at or past max(layers), final norm, lm_head and vision tensors are skipped by name: give them
    shapes that would fail the shape check, and the load still succeeds."""
    model, folder = saved
    sd = load_file(folder / "model.safetensors")
    unused = tuple(f"language_model.model.{n}." for n in ("layers.2", "layers.3", "norm"))
    for k in sd:
        if not k.startswith("language_model.model.") or k.startswith(unused):
            sd[k] = torch.zeros(1)
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    enc, out = ours(tmp_path, (1, 2))
    assert rel_err(out, reference(model, (1, 2))) <= 1e-6


def test_new_key_spelling(saved, tmp_path):
    """`model.language_model.*` / `lm_head.*` / `model.vision_tower.*`, as transformers 5 names them in memory."""
    model, folder = saved
    renames = [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
               ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")]
    sd = {}
    for k, t in load_file(folder / "model.safetensors").items():
        old, new = next((o, n) for o, n in renames if k.startswith(o))
        sd[new + k[len(old):]] = t
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    enc, out = ours(tmp_path, (1, 2, 3))
    assert rel_err(out, reference(model, (1, 2, 3))) <= 1e-6


def test_plain_mistral_for_causal_lm(tmp_path):
    """A plain MistralForCausalLM folder (`model.*` keys, config without text_config)."""
    model = randomize(MistralForCausalLM(HFMistralConfig(**{k: v for k, v in TEXT.items() if k != "model_type"})),
                      pad_row_zero=False, seed=3)
    model.save_pretrained(tmp_path)
    assert "text_config" not in json.loads((tmp_path / "config.json").read_text())
    enc, out = ours(tmp_path, (1, 3))
    assert rel_err(out, reference(model, (1, 3))) <= 1e-6


def test_sharded_folder_and_missing_shard(tmp_path):
    model = mistral3(pad_row_zero=False)
    model.save_pretrained(tmp_path, max_shard_size="1MB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    enc, out = ours(tmp_path, (1, 2, 3))
    assert rel_err(out, reference(model, (1, 2, 3))) <= 1e-6
    (tmp_path / shards[-1]).unlink()
    with pytest.raises(LoadError, match=shards[-1]):
        load_text_encoder(tmp_path, layers=(1, 2, 3), dtype=torch.float64)


def test_user_mistakes(saved, tmp_path):
    model, folder = saved
    with pytest.raises(LoadError, match="config.json"):
        load_text_encoder(tmp_path)
    with pytest.raises(LoadError, match="1..3"):                     # hs[4] of 4 layers is HF's normed output
        load_text_encoder(folder, layers=(2, 4))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file({"tok_embeddings.weight": torch.zeros(131072, 32)}, tmp_path / "consolidated.safetensors")
    with pytest.raises(LoadError, match="consolidated"):             # Mistral-native key scheme
        load_text_encoder(tmp_path, layers=(1,))
    save_file({"model.layers.0.input_layernorm.weight": torch.zeros(32)}, tmp_path / "consolidated.safetensors")
    with pytest.raises(LoadError, match="missing"):
        load_text_encoder(tmp_path, layers=(1,))
