"""The sampler (sample.py) against the reference schedule vectors (flux2_reference.md §7.1) and against diffusers'
Flux2Pipeline built from the SAME tiny random weights (oracle.md §1.4, §4.5, §4.6, §7.6), in float64; plus LoRA
strength vs merged weights, reference-image preparation, and PNG settings round trips through the CLI.

The tiny snapshot is written in the FLUX.2-dev folder layout (transformer/, vae/, text_encoder/, tokenizer/) by
diffusers / transformers `save_pretrained`, and read back by our `load_models`, so the loaders are exercised too.
"""
import os

import mistral_common
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from PIL import Image
from safetensors.torch import load_file
from transformers import Mistral3Config, Mistral3ForConditionalGeneration
from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

import data
import flux2
import lora
import models
import sample
import text_encoder
import vae
from util import LoadError

# The tiny DiT preset's sizes (flux2.PRESETS["tiny"]) as a diffusers config; its context 192 = 3 layers x 64.
DIT = dict(in_channels=128, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=4,
           joint_attention_dim=192, axes_dims_rope=(8, 8, 8, 8), mlp_ratio=3.0, guidance_embeds=True)
# 4 levels of 32 channels: x8 down, 32 latent channels -> 128 packed, like vae.AE_PRESETS["tiny"]
VAE = dict(block_out_channels=(32,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=32, norm_num_groups=32,
           sample_size=64)
# oracle §4.5 with hidden 64 (so 3 layers make the DiT's 192); vocab 131072 for the real Tekken ids
TEXT = {"model_type": "mistral", "vocab_size": 131072, "hidden_size": 64, "intermediate_size": 128, "head_dim": 16,
        "max_position_embeddings": 1024, "num_attention_heads": 4, "num_hidden_layers": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 1e9, "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 11}
VISION = {"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 4,
          "intermediate_size": 32, "image_size": 32, "patch_size": 8, "num_channels": 3, "head_dim": 4}
LAYERS = (1, 2, 3)
# FLUX.1-dev's scheduler config, which the FLUX.2 conversion copies (oracle §1.4)
SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                 max_image_seq_len=4096, num_train_timesteps=1000)
# The Mistral-Small-3.1 chat format of flux2_reference.md §6.1 for diffusers' list-style messages (oracle §4.6)
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% set text = m['content'] if m['content'] is string "
                 "else m['content'] | map(attribute='text') | join('') %}"
                 "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
                 "{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]{% endif %}{% endfor %}")
PROMPT = "a dog is dancing [IMG] under a red umbrella"
W, H, STEPS = 48, 64, 3


def rel(ours, ref) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def randomize(model, seed: int, std: float = 0.2):
    """float64 with a real spread everywhere (default inits leave layers near zero or norms at exactly 1)."""
    g = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.copy_(1 + std * n if "norm" in name and name.endswith("weight") else std * n)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(diffusers pipeline, our Models) over one tiny snapshot folder, everything float64."""
    root = tmp_path_factory.mktemp("snapshot")
    torch.manual_seed(0)
    transformer = randomize(Flux2Transformer2DModel(**DIT), seed=1)
    vae = AutoencoderKLFlux2(**VAE).double().eval()        # default conv init keeps the pixels mostly in [-1, 1]
    g = torch.Generator().manual_seed(2)
    vae.bn.running_mean.copy_(0.3 * torch.randn(128, generator=g, dtype=torch.float64))
    vae.bn.running_var.copy_(0.5 + torch.rand(128, generator=g, dtype=torch.float64))
    text = Mistral3ForConditionalGeneration(Mistral3Config(text_config=TEXT, vision_config=VISION,
                                                           image_token_index=10))
    text.lm_head = torch.nn.Linear(64, 1, bias=False)   # logits are never used: skip a 131072-wide matmul
    text = randomize(text, seed=3, std=0.3)
    tekken = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tekken_240911.json")
    tokenizer = convert_tekken_tokenizer(tekken, chat_template=CHAT_TEMPLATE)
    tokenizer.padding_side = "left"                            # Mistral-Small-3.1's processor pads on the left
    transformer.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    text.save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")              # before any padded call stores a padding config
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=text,
                         tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    stack = models.load_models(root, device="cpu", dtype=torch.float64, text_layers=LAYERS)
    return pipe, stack


def diffusers_images(pipe, seed, **kw) -> torch.Tensor:
    """Flux2Pipeline output [B, 3, H, W] in [0, 1] from our noise for `seed`."""
    return pipe(height=H, width=W, num_inference_steps=STEPS, guidance_scale=4.0, output_type="pt",
                latents=sample.noise(seed, H // 16, W // 16), text_encoder_out_layers=LAYERS, **kw).images


# ----------------------------------------------------------------------------------------------------------
# Schedule (flux2_reference.md §7.1 test vectors)

VECTORS = [  # width, height, steps, L, mu, first times, last three times
    (1024, 1024, 50, 4096, 2.02335, [1.0, 0.99731, 0.99452, 0.99163, 0.98863], [0.23963, 0.13372, 0.0]),
    (1360, 768, 50, 4080, 2.02168, [1.0, 0.99730, 0.99451], [0.23933, 0.13353, 0.0]),
    (1024, 1024, 28, 4096, 2.15144, [1.0, 0.99571, 0.99113], [0.39807, 0.24151, 0.0]),
    (2048, 2048, 50, 16384, 3.22999, [1.0, 0.99919], [0.51298, 0.34033, 0.0]),
    (1920, 1080, 50, 8040, 1.81760, [1.0, 0.99670], [0.20417, 0.11163, 0.0]),
    (1024, 1024, 4, 4096, 2.29118, [1.0, 0.96738, 0.90814, 0.76720, 0.0], [0.76720, 0.0]),
]


@pytest.mark.parametrize("width,height,steps,L,mu,head,tail", VECTORS)
def test_schedule_vectors(width, height, steps, L, mu, head, tail):
    if height % 16:
        with pytest.warns(UserWarning, match="multiple of 16"):
            width, height = sample.snap16(width, height)          # 1080 -> 1072
    assert (width // 16) * (height // 16) == L
    assert abs(flux2.empirical_mu(L, steps) - mu) < 5e-6
    t = sample.schedule(steps, L)
    assert len(t) == steps + 1
    assert np.allclose(t[:len(head)], head, rtol=0, atol=5e-6) and np.allclose(t[-len(tail):], tail, rtol=0, atol=5e-6)


def test_mu_jumps_above_4300_tokens():
    # at or below 4300 tokens mu is linear in the step count; above, it is the 200-step fit for any count
    assert flux2.empirical_mu(4300, 10) != pytest.approx(flux2.empirical_mu(4300, 50))
    above = 0.00016927 * 4301 + 0.45666666
    assert flux2.empirical_mu(4301, 10) == flux2.empirical_mu(4301, 200) == pytest.approx(above, rel=1e-15)
    assert flux2.empirical_mu(4300, 50) - flux2.empirical_mu(4301, 50) > 0.2        # the discontinuity
    for L, n in [(12, 3), (4096, 50), (4300, 28), (4301, 28), (8040, 50)]:
        assert flux2.empirical_mu(L, n) == pytest.approx(compute_empirical_mu(L, n), rel=1e-15)


def test_schedule_matches_diffusers_scheduler():
    # diffusers: sigmas linspace(1, 1/N, N), exponential shift by mu, trailing 0 (float32) — the same times
    for steps, L in [(50, 4096), (28, 8040), (3, 12)]:
        sched = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(L, steps))
        assert np.allclose(sample.schedule(steps, L), sched.sigmas.numpy(), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Whole pipeline vs diffusers, same tiny weights

def test_text_features_match_diffusers(tiny):
    pipe, stack = tiny
    # flux2_reference.md §6.1 says diffusers' system message has a space where BFL has "\n"; 0.42.1 has the "\n"
    assert pipe.system_message == text_encoder.SYSTEM_MESSAGE
    prompts = [PROMPT, "x"]
    ref, _ = pipe.encode_prompt(prompts, max_sequence_length=512, text_encoder_out_layers=LAYERS)
    ours = models.encode_text(stack, prompts)                                   # [2, 512, 192]
    assert ours.shape == ref.shape == (2, 512, 192) and ours.dtype == torch.float64
    assert rel(ours, ref) <= 1e-12                                               # observed: bit-identical
    # the comparison sees the system message: diffusers with the space variant gives other features
    pipe.system_message = text_encoder.SYSTEM_MESSAGE.replace("object\nattribution", "object attribution")
    try:
        spaced, _ = pipe.encode_prompt(prompts, max_sequence_length=512, text_encoder_out_layers=LAYERS)
    finally:
        pipe.system_message = text_encoder.SYSTEM_MESSAGE
    assert rel(ours, spaced) > 1e-3


def test_text_to_image_matches_diffusers(tiny):
    pipe, stack = tiny
    ref = diffusers_images(pipe, seed=7, prompt=PROMPT, max_sequence_length=512)   # [1, 3, 64, 48] in [0, 1]
    ours = sample.generate_tensors(stack, [PROMPT], width=W, height=H, steps=STEPS, guidance=4.0, seeds=[7])
    assert ours.shape == ref.shape == (1, 3, H, W)
    assert ((ours.abs() < 1).double().mean() > 0.5).item()          # mostly unclamped, so the comparison is real
    # not float64 round-off: diffusers' scheduler.step casts the sample to float32 every step (its "upcast"), and
    # its float32 sigmas are rounded differently from the reference's float32 linspace (observed 8e-9)
    assert rel((ours + 1) / 2, ref) <= 1e-7


def test_editing_with_reference_image_matches_diffusers(tiny):
    pipe, stack = tiny
    g = torch.Generator().manual_seed(4)
    # 72x100: both preprocessings just centre-crop it to 64x96 (no cap applies), so they agree exactly
    ref_img = Image.fromarray(torch.randint(0, 256, (100, 72, 3), generator=g, dtype=torch.uint8).numpy())
    txt = models.encode_text(stack, [PROMPT])
    ref = diffusers_images(pipe, seed=8, image=[ref_img], prompt_embeds=txt)
    ours = sample.generate_tensors(stack, txt=txt, width=W, height=H, steps=STEPS, guidance=4.0, seeds=[8],
                                   refs=[ref_img])
    plain = sample.generate_tensors(stack, txt=txt, width=W, height=H, steps=STEPS, guidance=4.0, seeds=[8])
    assert rel((ours + 1) / 2, ref) <= 1e-7                         # as text-to-image (observed 8e-9)
    assert rel(ours, plain) > 1e-2                                  # the reference tokens do change the image


def test_reference_preparation():
    g = torch.Generator().manual_seed(5)
    img = Image.fromarray(torch.randint(0, 256, (200, 300, 3), generator=g, dtype=torch.uint8).numpy())
    # cap (int-truncated LANCZOS to the area limit), then centre crop to /16: diffusers' helpers do the same steps
    proc = Flux2ImageProcessor(vae_scale_factor=8)
    capped = Flux2ImageProcessor._resize_to_target_area(img, 128 * 128)          # 156x104
    w, h = capped.width // 16 * 16, capped.height // 16 * 16
    ref = proc.preprocess(capped, height=h, width=w, resize_mode="crop")[0]
    ours = data.prepare_ref(img, 128 * 128)
    assert ours.shape == ref.shape == (3, 96, 144) and torch.equal(ours, ref.float())
    # the cap is 2024^2 for one reference, 1024^2 each for several
    wide = Image.new("RGB", (2100, 1000))
    assert sample.prepare_refs([wide])[0].shape == (3, 992, 2096)
    assert [t.shape for t in sample.prepare_refs([wide, wide])] == [(3, 704, 1472)] * 2   # 1483x706 -> 1472x704
    for bad in [(63, 200), (64, 513)]:
        with pytest.raises(LoadError, match="too small or too elongated"):
            data.prepare_ref(Image.new("RGB", bad), 2024 ** 2, name="in.png")


# ----------------------------------------------------------------------------------------------------------
# LoRA, sizes, PNG settings, CLI errors (the tiny demo stack)

def tiny_models(dtype=torch.float64) -> models.Models:
    return models.load_models(tiny=True, device="cpu", dtype=dtype)


def test_tiny_models_are_seeded_and_partial_loads_agree():
    a, b = tiny_models(), models.load_models(tiny=True, device="cpu", dtype=torch.float64, parts=("dit",))
    assert b.ae is None and b.text_encoder is None
    assert all(torch.equal(p, q) for p, q in zip(a.dit.state_dict().values(), b.dit.state_dict().values()))
    c = models.load_models(tiny=True, device="cpu", dtype=torch.float64, seed=1, parts=("dit",))
    assert not torch.equal(a.dit.img_in.weight, c.dit.img_in.weight)


def test_trainer_previews_equal_the_sampler():
    # train.py's path: cached text features, the DiT it trains, generate(txt=...) -- same pixels as from prompts
    src = models.ModelSource("tiny", None, "cpu")
    assert src.dtype == torch.float32 and src.load_ae() is src.load_ae()          # loaded once
    txt = src.load_text_encoder()(["a fox", "a cat"])                              # [2, 512, 192]
    kw = dict(width=W, height=H, steps=1, guidance=4.0, seeds=[1, 2])
    previews = sample.generate(src.for_preview(src.build_dit()), txt=txt, **kw)
    direct = sample.generate(tiny_models(torch.float32), ["a fox", "a cat"], **kw)
    assert [np.asarray(a).tolist() for a in previews] == [np.asarray(b).tolist() for b in direct]


def test_lora_scale_equals_merged_weights(tmp_path):
    trained = tiny_models()
    lora.inject(trained.dit, "paper", rank=4, alpha=8)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for m in lora.adapters(trained.dit).values():
            m.lora_B.copy_(0.5 * torch.randn(m.lora_B.shape, generator=g))
    file = tmp_path / "lora.safetensors"
    lora.save(trained.dit, file)
    s, kw = 0.7, dict(width=W, height=H, steps=1, guidance=4.0, seeds=[3])

    with_lora = tiny_models()
    lora.load(with_lora.dit, file, scale=s)
    ours = sample.generate_tensors(with_lora, ["a fox"], **kw)
    merged = tiny_models()
    sd = load_file(file)                                        # B [out, r] has alpha / r baked in
    with torch.no_grad():
        for key in sd:
            if key.endswith(".lora_A.weight"):
                name = key.removeprefix("diffusion_model.").removesuffix(".lora_A.weight")
                B = sd[f"diffusion_model.{name}.lora_B.weight"]
                merged.dit.get_submodule(name).weight += s * (B.double() @ sd[key].double())
    ref = sample.generate_tensors(merged, ["a fox"], **kw)
    base = sample.generate_tensors(tiny_models(), ["a fox"], **kw)
    assert rel(ours, ref) <= 1e-6              # the loaded B is rounded once to float32 after scaling
    assert rel(ours, base) > 1e-3

    # the CLI path (float32 on CPU) gives the same picture, up to one 8-bit level where truncation flips
    out = tmp_path / "cli.png"
    assert sample.main(["--model", "tiny", "--device", "cpu", "--prompt", "a fox", "--seed", "3", "--steps", "1",
                        "--width", str(W), "--height", str(H), "--lora", str(file), "--lora-scale", str(s),
                        "--out", str(out)]) == 0
    png = np.asarray(Image.open(out)).astype(int)
    assert np.abs(png - np.asarray(vae.to_image(ref[0])).astype(int)).max() <= 1
    assert Image.open(out).text["lora"] == str(file) and float(Image.open(out).text["lora_scale"]) == s


def test_sampling_reads_a_snapshot_into_the_placed_dit(tmp_path, capsys):
    """sample.py's DiT from a snapshot: built on meta, given the LoRA's adapters, placed (here --offload stream, as on
    a GPU: every block in a host copy the GPU streams from), then filled from the file and the LoRA. It holds the
    values of the DiT load_models reads onto the CPU plus the same LoRA, and computes what that one computes."""
    from test_distributed import tiny_snapshot
    from test_offload import batch
    snap = tiny_snapshot(tmp_path / "snap", tmp_path / "cache")         # the tiny DiT's weights, BFL names, float32
    trained = models.load_models(tiny=True, dtype=torch.float32, parts=("dit",)).dit
    lora.inject(trained, "paper", rank=4)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in lora.adapters(trained).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))
    file = tmp_path / "lora.safetensors"
    lora.save(trained, file)

    source = models.ModelSource("dev", snap, "cpu", torch.float32)
    with_lora = lambda dit: lora.load(dit, file, scale=0.7)
    dit, plan = models.placed_dit(source, add_adapters=with_lora, set_adapters=with_lora, strategy="stream",
                                  batch_size=1, tokens_per_sample=64, train=False, gpu_memory_limit=1)
    assert plan.streamed == [0, 1, 2, 3] and "streamed: 4 of 4 blocks" in capsys.readouterr().out
    ref = models.load_models(snap, device="cpu", dtype=torch.float32, parts=("dit",)).dit
    lora.load(ref, file, scale=0.7)
    got, want = dit.state_dict(), ref.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    x, _ = batch(0)
    x = [t.float() for t in x]
    with torch.no_grad():
        assert torch.equal(dit(*x), ref(*x))


def test_sizes_round_down_with_a_warning():
    with pytest.warns(UserWarning, match="70x50 is not a multiple of 16; using 64x48"):
        img, = sample.generate(tiny_models(torch.float32), ["a fox"], width=70, height=50, steps=1, guidance=4.0,
                               seeds=[0])
    assert img.size == (64, 48) and img.mode == "RGB"


def test_png_settings_reproduce_the_image(tmp_path):
    ref = tmp_path / "ref.png"
    Image.fromarray(np.full((80, 64, 3), 200, dtype=np.uint8)).save(ref)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n\nünïcödé prompt\n", encoding="utf-8")
    out = tmp_path / "a.png"
    argv = ["--model", "tiny", "--device", "cpu", "--prompts", str(prompts), "--seed", "11", "--steps", "2",
            "--width", "64", "--height", "48", "--guidance", "3.5", "--ref", str(ref), "--out", str(out)]
    assert sample.main(argv) == 0
    first, second = tmp_path / "a_000.png", tmp_path / "a_001.png"
    s = sample.read_png_settings(second)
    assert s == {"prompt": "ünïcödé prompt", "seed": 12, "steps": 2, "guidance": 3.5, "width": 64, "height": 48,
                 "refs": [str(ref)], "model": "tiny"}
    # the same pixels from the PNG alone, and the same as generate() with those settings
    again = tmp_path / "again.png"
    assert sample.main(["--from-png", str(second), "--device", "cpu", "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(second)))
    assert sample.read_png_settings(again) == s
    img, = sample.generate(tiny_models(torch.float32), [s["prompt"]], width=64, height=48, steps=2, guidance=3.5,
                           seeds=[12], refs=[Image.open(ref)])
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(second)))
    assert not np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))


def test_flags_override_png_settings(tmp_path, capsys):
    png = tmp_path / "a.png"
    sample.save_png(Image.new("RGB", (16, 16)), png, {"prompt": "x", "seed": 1, "model": "tiny"})
    # the stored model is replaced by the flag's (which does not exist, so this fails before any work)
    assert sample.main(["--from-png", str(png), "--model-dir", str(tmp_path / "nope"), "--device", "cpu"]) == 2
    assert "nope: not a folder" in capsys.readouterr().err


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    snap = tmp_path / "snap"
    (snap / "transformer").mkdir(parents=True)
    (snap / "ae.safetensors").write_bytes(b"")
    (tmp_path / "ae.safetensors").write_bytes(b"not a LoRA")
    (snap / "text_encoder").mkdir()
    cases = [(["--model-dir", str(snap), "--prompt", "x"], "no tokenizer found"),
             (["--model-dir", str(tmp_path / "nope"), "--prompt", "x"], "nope: not a folder"),
             (["--model", "tiny", "--prompt", "x", "--lora", str(tmp_path / "none.safetensors")], "no such LoRA"),
             (["--model", "tiny", "--prompt", "x", "--lora", str(tmp_path / "ae.safetensors")], "readable"),
             (["--model", "tiny"], "no prompt"),
             (["--from-png", str(tmp_path / "none.png")], "cannot read this PNG")]
    for argv, message in cases:
        assert sample.main(argv + ["--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    with pytest.raises(LoadError, match="no transformer found"):
        models.load_models(tmp_path, device="cpu")
