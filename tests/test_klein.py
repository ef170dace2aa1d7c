"""FLUX.2 [klein] (flux2_reference.md §1.1, §6.2, §7.2): the Qwen3 text encoder against transformers' Qwen3, the
klein prompt template against an HF tokenizer, the whole klein-base pipeline (true CFG) against diffusers'
Flux2KleinPipeline, klein LoRA files in diffusers, and the refusals (mismatched snapshot parts, dev LoRA on klein).

Everything is float64 and tiny. The snapshot is written by `Flux2KleinPipeline.save_pretrained` (so its
model_index.json says is_distilled false) and read back by our `load_models`.
"""
import json

import pytest
import tokenizers
import torch
from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline,
                       Flux2Transformer2DModel)
from safetensors import safe_open
from safetensors.torch import save_file
from PIL import Image
from torch import nn
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

import data
import flux2
import lora
import models
import sample
import text_encoder
import train
import weights
from util import LoadError
from test_sample import SCHEDULER, VAE, randomize, rel
from test_train import TOY

CONTROLS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<think>": 151667,
            "</think>": 151668}                                         # Qwen3's real ids (reference §6.2)
QWEN = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=1024,
            tie_word_embeddings=False, pad_token_id=151643)
LAYERS = (1, 2, 3)                                                      # 3 x 32 = 96 = the klein DiT's context
DIT = dict(in_channels=128, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=4,
           joint_attention_dim=96, axes_dims_rope=(8, 8, 8, 8), mlp_ratio=3.0, guidance_embeds=False)
# Qwen3's chat template with add_generation_prompt and enable_thinking=False, for one user message
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
                 "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
PROMPT = "a small dog dancing under a red umbrella"
W, H, STEPS = 48, 64, 3


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (bytes, a few merges, filler up to 151643) with Qwen3's control tokens at their real ids."""
    chars = text_encoder._byte_chars()
    merges = [("a", "n"), ("Ġ", "d"), ("Ġd", "o"), ("e", "r"), ("Ċ", "Ċ"), ("u", "s")]
    vocab = {c: i for i, c in enumerate(chars)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab.update({f"<filler{i}>": i for i in range(len(vocab), 151643)})
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    for name in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        tok.add_special_tokens([tokenizers.AddedToken(name, special=True)])
    tok.add_tokens([tokenizers.AddedToken(f"<filler{i}>", special=False) for i in range(151646, 151667)])
    tok.add_tokens([tokenizers.AddedToken(n, special=False) for n in ("<think>", "</think>")])   # not special in Qwen3
    assert {n: tok.token_to_id(n) for n in CONTROLS} == CONTROLS
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   padding_side="right", chat_template=CHAT_TEMPLATE)


def qwen3(seed: int) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**QWEN))
    model.lm_head = nn.Linear(QWEN["hidden_size"], 1, bias=False)   # logits are never used: skip a 151936-wide matmul
    return randomize(model, seed=seed, std=0.3)


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    """(diffusers Flux2KleinPipeline, snapshot folder) of a tiny klein base model, float64."""
    root = tmp_path_factory.mktemp("klein-snapshot")
    torch.manual_seed(0)
    transformer = randomize(Flux2Transformer2DModel(**DIT), seed=1)
    vae = AutoencoderKLFlux2(**VAE).double().eval()
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=qwen3(3),
                              tokenizer=qwen_tokenizer(), transformer=transformer, is_distilled=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root)
    return pipe, root


# ----------------------------------------------------------------------------------------------------------
# Text side

def test_qwen3_encoder_matches_transformers(klein):
    pipe, root = klein
    ids = torch.randint(0, 151669, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False                                                 # right padding, as klein's prompts
    ids[1, 7:] = CONTROLS["<|endoftext|>"]
    ours = text_encoder.load_text_encoder(root / "text_encoder", layers=(1, 2), dtype=torch.float64)
    assert len(ours.layers) == 2 and ours.cfg.qk_norm and ours.cfg.rope_theta == 1e6 and ours.cfg.head_dim == 8
    with torch.no_grad():
        hs = pipe.text_encoder(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
        got = ours(ids, mask)                                           # [2, 12, 64], every position incl. pads
    want = torch.cat([hs[1], hs[2]], dim=-1)
    assert got.shape == want.shape == (2, 12, 64) and got.dtype == torch.float64
    assert rel(got, want) <= 1e-6
    # the q/k norms matter: without them the features differ
    for layer in ours.layers:
        del layer.self_attn.q_norm, layer.self_attn.k_norm
    with torch.no_grad():
        assert rel(ours(ids, mask), want) > 1e-3


def test_qwen3_presets_and_default_layers(klein):
    _, root = klein
    assert text_encoder.text_family(root / "text_encoder") == "qwen3"
    with pytest.raises(LoadError, match=r"must lie in 1..3 .*\(9, 18, 27\)"):    # Qwen3's layers, 4 here
        text_encoder.load_text_encoder(root / "text_encoder")
    for name, hidden in (("qwen3-4b", 2560), ("qwen3-8b", 4096)):
        cfg = text_encoder.TEXT_PRESETS[name]
        assert 3 * cfg.hidden_size == 3 * hidden == flux2.PRESETS["klein-4b" if hidden == 2560 else "klein-9b"] \
            .context_in_dim and cfg.output_layers == (9, 18, 27) and cfg.qk_norm


def test_prompt_template_and_right_padding(klein):
    pipe, root = klein
    ours = text_encoder.Tokenizer(root / "tokenizer")
    assert ours.family == "qwen3"
    prompts = [PROMPT, "", "dogs\nand <|im_start|>cats"]
    ids, mask = ours.encode_prompts(prompts)
    for i, p in enumerate(prompts):
        text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=False)
        assert text == f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        ref = pipe.tokenizer(text, padding="max_length", truncation=True, max_length=512, return_tensors="pt")
        n = int(mask[i].sum())
        assert mask[i, :n].all() and not mask[i, n:].any()                             # right padding
        assert (ids[i, n:] == CONTROLS["<|endoftext|>"]).all()
        if "<|im_start|>" in p:
            # HF turns a control spelling inside the prompt into the control id; ours keeps it text
            assert ref["input_ids"][0].tolist().count(CONTROLS["<|im_start|>"]) == 3
            assert ids[i].tolist().count(CONTROLS["<|im_start|>"]) == 2
            assert "<|im_start|>cats" in ours.decode(ids[i])
            continue
        assert torch.equal(ids[i], ref["input_ids"][0]) and torch.equal(mask[i], ref["attention_mask"][0].bool())
    # the row ends in </think> "\n\n" (one token with this BPE's merges)
    assert ids[0, 0] == CONTROLS["<|im_start|>"] and ids[0, int(mask[0].sum()) - 2] == CONTROLS["</think>"]
    long_ids, long_mask = ours.encode_prompts(["a" * 600])              # truncated on the right, like HF
    ref = pipe.tokenizer(pipe.tokenizer.apply_chat_template([{"role": "user", "content": "a" * 600}], tokenize=False,
                         add_generation_prompt=True, enable_thinking=False), truncation=True, max_length=512)
    assert long_mask.all() and long_ids[0].tolist() == ref["input_ids"]


# ----------------------------------------------------------------------------------------------------------
# Whole pipeline

def test_klein_base_cfg_matches_diffusers(klein):
    pipe, root = klein
    assert models.model_defaults(root) == {"steps": 50, "cfg": 4.0}               # model_index.json: not distilled
    stack = models.load_models(root, device="cpu", dtype=torch.float64, text_layers=LAYERS)
    txt = models.encode_text(stack, [PROMPT])
    ref_txt, _ = pipe.encode_prompt([PROMPT], max_sequence_length=512, text_encoder_out_layers=LAYERS)
    assert rel(txt, ref_txt) <= 1e-12
    for cfg in (4.0, None):                          # base with CFG; distilled-style (diffusers: guidance_scale 1)
        ref = pipe(prompt=PROMPT, height=H, width=W, num_inference_steps=STEPS, guidance_scale=cfg or 1.0,
                   output_type="pt", latents=sample.noise(7, H // 16, W // 16), text_encoder_out_layers=LAYERS).images
        ours = sample.generate_tensors(stack, [PROMPT], width=W, height=H, steps=STEPS, guidance=4.0, seeds=[7],
                                       cfg=cfg)
        assert ((ours.abs() < 1).double().mean() > 0.5).item()
        assert rel((ours + 1) / 2, ref) <= 1e-5                  # diffusers' scheduler steps in float32
        if cfg:
            with_cfg = ours
    assert rel(with_cfg, ours) > 1e-3                              # CFG changes the image


def test_klein_base_edit_with_cfg_matches_diffusers(klein):
    """Editing on klein base: a reference image beside CFG (both rows carry the reference) gives
    Flux2KleinPipeline(image=...)'s pixels."""
    pipe, root = klein
    stack = models.load_models(root, device="cpu", dtype=torch.float64, text_layers=LAYERS)
    g = torch.Generator().manual_seed(5)
    ref_img = Image.fromarray(torch.randint(0, 256, (100, 72, 3), generator=g, dtype=torch.uint8).numpy())
    want = pipe(image=[ref_img], prompt=PROMPT, height=H, width=W, num_inference_steps=STEPS, guidance_scale=4.0,
                output_type="pt", latents=sample.noise(7, H // 16, W // 16), text_encoder_out_layers=LAYERS).images
    ours = sample.generate_tensors(stack, [PROMPT], width=W, height=H, steps=STEPS, guidance=4.0, seeds=[7],
                                   cfg=4.0, refs=[ref_img])
    plain = sample.generate_tensors(stack, [PROMPT], width=W, height=H, steps=STEPS, guidance=4.0, seeds=[7],
                                    cfg=4.0)
    assert rel((ours + 1) / 2, want) <= 1e-5                      # diffusers' scheduler steps in float32
    assert rel(ours, plain) > 1e-3                                # the reference changes the image


def test_snapshot_defaults_and_mismatched_parts(klein, tmp_path):
    _, root = klein
    index = json.loads((root / "model_index.json").read_text())
    distilled = tmp_path / "FLUX.2-klein-4B"
    distilled.mkdir()
    for part in ("transformer", "vae", "text_encoder", "tokenizer"):
        (distilled / part).symlink_to(root / part)
    assert models.model_defaults(distilled) == {"steps": 4}                      # no model_index.json, no "base"
    (distilled / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    assert models.model_defaults(tmp_path / "FLUX.2-klein-4B") == {"steps": 4}
    base = tmp_path / "FLUX.2-klein-base-4B"
    base.symlink_to(distilled)
    (distilled / "model_index.json").unlink()
    assert models.model_defaults(base) == {"steps": 50, "cfg": 4.0}
    cached = tmp_path / "models--black-forest-labs--FLUX.2-klein-base-4B" / "snapshots" / "0123abc"
    cached.parent.mkdir(parents=True)
    cached.symlink_to(distilled)                                      # the HF cache layout: the repo name decides
    assert models.model_defaults(cached) == {"steps": 50, "cfg": 4.0}
    # a dev-shaped DiT (guidance embedder) next to the Qwen3 encoder is refused in one line
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for part in ("vae", "text_encoder", "tokenizer"):
        (mixed / part).symlink_to(root / part)
    with torch.device("meta"):
        dev_like = flux2.Flux2(flux2.Flux2Config(context_in_dim=96, hidden_size=128, num_heads=4, depth=1,
                                                 depth_single_blocks=1, axes_dim=(8, 8, 8, 8)))
    save_file({k: torch.zeros(v.shape) for k, v in dev_like.state_dict().items()}, mixed / "flux2-dev.safetensors")
    with pytest.raises(LoadError, match=r"text_encoder: a qwen3 encoder giving 96-wide .* takes 96-wide mistral"):
        models.load_models(mixed, dtype=torch.float64, parts=("dit",), text_layers=LAYERS)
    with pytest.raises(LoadError, match=r"giving 64-wide .*takes 96-wide qwen3"):   # width: wrong layer count
        models.load_models(root, dtype=torch.float64, parts=("text",), text_layers=(1, 2))


# ----------------------------------------------------------------------------------------------------------
# LoRA files on klein

def test_klein_lora_loads_in_diffusers_and_dev_lora_is_refused(klein, tmp_path):
    pipe, root = klein
    ours = weights.load_flux2(root / "transformer", dtype=torch.float64)
    assert not ours.cfg.use_guidance_embed
    lora.inject(ours, "all", rank=4, alpha=6)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in lora.adapters(ours).values():
            m.lora_A.copy_(0.3 * torch.randn(m.lora_A.shape, generator=g, dtype=torch.float64))
            m.lora_B.copy_(0.3 * torch.randn(m.lora_B.shape, generator=g, dtype=torch.float64))
    path = tmp_path / "klein.safetensors"
    lora.save(ours, path, {"base_model": "klein"})
    ref = Flux2Transformer2DModel.from_pretrained(root / "transformer", torch_dtype=torch.float64)
    ref.load_lora_adapter(Flux2Pipeline.lora_state_dict(str(path)), prefix="transformer")
    loaded = {n for n, m in ref.named_modules() if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and m.lora_A}
    assert len(loaded) == len(lora.adapters(ours)) + 2 * 2 * 2       # double-block qkv -> to_q/k/v (+2 each)
    L, Lt = 12, 5
    x = {"img": torch.randn(1, L, 128, generator=g, dtype=torch.float64),
         "txt": torch.randn(1, Lt, 96, generator=g, dtype=torch.float64),
         "img_ids": flux2.image_ids(3, 4)[None], "txt_ids": flux2.text_ids(Lt)[None],
         "t": torch.tensor([0.7], dtype=torch.float64)}
    with torch.no_grad():
        got = ours(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], None)
        want = ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], timestep=x["t"], img_ids=x["img_ids"],
                   txt_ids=x["txt_ids"], guidance=None, return_dict=False)[0]
    assert rel(got, want) <= 1e-6
    dev = tmp_path / "dev.safetensors"                 # a FLUX.2 dev LoRA (hidden 6144) on the klein model
    save_file({f"diffusion_model.double_blocks.0.img_attn.qkv.lora_{ab}.weight":
               torch.zeros((2, 6144) if ab == "A" else (18432, 2)) for ab in "AB"}, dev)
    fresh = weights.load_flux2(root / "transformer", dtype=torch.float64)
    with pytest.raises(lora.LoRAError, match=r"dev.safetensors: .*another FLUX.2 size"):
        lora.load(fresh, dev)


# ----------------------------------------------------------------------------------------------------------
# Training on klein snapshots

@pytest.fixture(scope="module")
def klein_base(klein, tmp_path_factory):
    """A klein base snapshot that train.py reads with its default text layers (9, 18, 27)."""
    _, root = klein
    base = tmp_path_factory.mktemp("base") / "FLUX.2-klein-base-tiny"
    base.mkdir()
    for part in ("transformer", "vae", "tokenizer"):
        (base / part).symlink_to(root / part)
    torch.manual_seed(0)            # Qwen3's 9/18/27 need >= 28 layers; float32 keeps the folder small
    Qwen3ForCausalLM(Qwen3Config(**{**QWEN, "num_hidden_layers": 28})).float().save_pretrained(base / "text_encoder")
    return base


def test_training_an_edit_lora_on_klein_base(klein_base, tmp_path):
    """klein base trains edit LoRAs as dev does: references cached, CFG previews with them, the
    header says edit."""
    toy = TOY.parent / "toy_edit"
    out = train.train(train.parse_args([
        "--data", str(toy / "images"), "--control-dir", str(toy / "control"), "--model-dir", str(klein_base),
        "--cache-dir", str(tmp_path / "cache"), "--resolution", "32", "--steps", "1", "--save-every", "0",
        "--sample-every", "1", "--sample-steps", "2", "--device", "cpu", "--out", str(tmp_path / "edit")]))["out"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000000.png", "step-000001.png"]
    with safe_open(str(out / "lora.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["edit"] == "true" and meta["references"] == "1"


def test_training_base_previews_use_cfg_and_distilled_warns(klein_base, tmp_path, capsys):
    base = klein_base
    flags = ["--data", str(TOY), "--model", "dev", "--cache-dir", str(tmp_path / "cache"), "--resolution", "32",
             "--steps", "1", "--save-every", "0", "--device", "cpu"]
    out = train.train(train.parse_args([*flags, "--model-dir", str(base), "--out", str(tmp_path / "a"),
                                        "--sample-every", "1", "--sample-steps", "2"]))["out"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000000.png", "step-000001.png"]
    source = models.ModelSource("dev", base, "cpu")
    assert data.text_path(tmp_path / "cache", "", source.text_id).is_file()     # the CFG negative, cached
    capsys.readouterr()
    png = tmp_path / "base.png"                 # sample.py: CFG 4.0 by default, both rows in each forward
    assert sample.main(["--model-dir", str(base), "--prompt", "a red circle", "--width", "32", "--height", "32",
                        "--steps", "2", "--seed", "1", "--device", "cpu", "--out", str(png)]) == 0
    assert "for inference, batch 2 x" in capsys.readouterr().out           # the plan counts both rows
    assert sample.read_png_settings(png)["cfg"] == 4.0
    distilled = tmp_path / "FLUX.2-klein-tiny"
    distilled.symlink_to(base)
    with pytest.warns(UserWarning, match="step-distilled FLUX.2 \\[klein\\].*klein base"):
        train.train(train.parse_args([*flags, "--model-dir", str(distilled), "--out", str(tmp_path / "b"),
                                      "--sample-every", "0"]))


@pytest.mark.parametrize("name, preset, text", [("dev-random", "dev", "mistral-small-3.2"),
                                                ("klein-4b-random", "klein-4b", "qwen3-4b"),
                                                ("klein-9b-random", "klein-9b", "qwen3-8b")])
def test_random_full_size_models_pair_the_right_text_encoder(name, preset, text):
    """--model klein-4b-random etc. (speed and memory checks without weights): the full-size DiT on meta, for
    offload.prepare to place, and a text encoder whose three layers give that DiT's context width."""
    source = models.ModelSource(name, None, "cpu")
    dit = source.build_dit()
    assert dit.cfg == flux2.PRESETS[preset] and all(p.is_meta for p in dit.parameters())
    enc = text_encoder.TEXT_PRESETS[text]
    assert len(enc.output_layers) * enc.hidden_size == dit.cfg.context_in_dim
    assert enc.qk_norm is (not dit.cfg.use_guidance_embed)          # Qwen3 for klein, Mistral for dev
    assert (source.ae_id, source.text_id) == (f"{name}-ae-seed0", f"{name}-text-seed0")   # caches never mix
    assert train.parse_args(["--data", "d", "--model", name]).resolution == 1024           # no --model-dir needed
