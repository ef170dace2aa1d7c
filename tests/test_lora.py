"""LoRA adapters, presets and files: math by hand, and our files against diffusers 0.42.1 + PEFT (float64, tiny)."""

import pytest
import torch
from diffusers import Flux2Pipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lora
import weights
from flux2 import Flux2, PRESETS
from lora import LoRAError, LoRALinear
from test_dit import CONFIGS, inputs, random_reference, rel_err, to_bfl

CONFIG = CONFIGS["guided"]   # 2 double + 2 single blocks, guidance embedder
H = CONFIG["attention_head_dim"] * CONFIG["num_attention_heads"]   # hidden size 64


def models(seed: int = 0) -> tuple[nn.Module, Flux2]:
    """A random diffusers reference and our Flux2 holding the same base weights (float64)."""
    ref = random_reference(CONFIG, seed)
    ours = Flux2(weights._config_from_diffusers(CONFIG)).double()
    ours.load_state_dict(to_bfl(ref.state_dict()))
    return ref, ours


def bfl_model(sd: dict) -> Flux2:
    model = Flux2(weights._config_from_diffusers(CONFIG)).double()
    model.load_state_dict(sd)
    return model


def run(model, x) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, Flux2):
            return model(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["guidance"])
        return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], timestep=x["timesteps"],
                     img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"], return_dict=False)[0]


def randomize(model, seed: int = 3):
    """Non-zero adapters (B starts at zero, which would hide every mistake)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.adapters(model).values():
            m.lora_A.copy_(0.3 * torch.randn(m.lora_A.shape, generator=g))
            m.lora_B.copy_(0.3 * torch.randn(m.lora_B.shape, generator=g))


def test_lora_linear_math():
    torch.manual_seed(0)
    base = nn.Linear(6, 10).double()
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    for out_slice in (None, (2, 7)):
        m = LoRALinear(base, rank=3, alpha=5, out_slice=out_slice)
        assert m.weight is base.weight and m.bias is base.bias and not m.weight.requires_grad
        assert m.lora_A.dtype == m.lora_B.dtype == torch.float32 and m.lora_A.requires_grad
        with torch.no_grad():
            m.lora_B.normal_()
        s0, s1 = out_slice or (0, 10)
        A, B = m.lora_A.double(), m.lora_B.double()
        want = x @ base.weight.T + base.bias
        want[..., s0:s1] += 5 / 3 * (x @ A.T) @ B.T
        assert rel_err(m(x), want) <= 1e-12
        A_full, B_full = m.factors()           # export: scale baked in, zero rows outside the slice
        assert rel_err(x @ base.weight.T + base.bias + x @ A_full.double().T @ B_full.double().T, want) <= 1e-6
    drop = LoRALinear(base, rank=3, dropout=0.5)
    with torch.no_grad():
        drop.lora_B.normal_()
    plain = x @ base.weight.T + base.bias + (x @ drop.lora_A.double().T) @ drop.lora_B.double().T
    assert rel_err(drop.eval()(x), plain) <= 1e-12
    assert rel_err(drop.train()(x), plain) > 1e-3   # dropout acts on the adapter input in training


def test_init_std_and_zero_adapters_are_a_no_op():
    torch.manual_seed(0)
    m = LoRALinear(nn.Linear(2048, 8, bias=False), rank=16)
    assert abs(m.lora_A.std().item() * 16 - 1) < 0.03 and abs(m.lora_A.mean().item()) < 0.01
    assert not m.lora_B.any()
    base = nn.Linear(32, 12).double()
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    want = base(x)
    for out_slice in (None, (0, 6)):
        assert torch.equal(LoRALinear(base, rank=4, out_slice=out_slice)(x), want)   # bit-identical per layer
    _, ours = models()
    x = inputs(CONFIG, refs=True)
    before = run(ours, x)
    lora.inject(ours, "all", rank=4)
    # Not bit-identical across a whole model: CPU float64 matmuls round differently with the memory alignment of
    # their (sliced) inputs; the same weights differ by ~4e-13 between two allocations here.
    assert rel_err(run(ours, x), before) <= 1e-12


def test_inject_trains_only_adapters():
    _, ours = models()
    keys = set(ours.state_dict())
    params = lora.inject(ours, "paper", rank=4, alpha=8)
    names = {n for n, _ in ours.named_parameters() if "lora_" in n}
    assert len(names) == len(params) == 2 * (2 * 4 + 2 * 2)       # qkv, proj x 2 streams; linear1 qkv rows, linear2
    assert keys == set(ours.state_dict()) - names                 # base weights keep their BFL keys
    assert ours.single_blocks[0].linear1.lora_B.shape == (3 * H, 4)
    randomize(ours)
    x = inputs(CONFIG, refs=False)
    ours(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["guidance"]).square().mean().backward()
    for n, p in ours.named_parameters():
        if n in names:
            assert p.requires_grad and p.grad is not None and p.grad.abs().max() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n


def test_merge_unmerge():
    _, ours = models()
    lora.inject(ours, "paper", rank=4, alpha=6)
    randomize(ours)
    x = inputs(CONFIG, refs=True)
    weights = {n: p.detach().clone() for n, p in ours.named_parameters()}
    unmerged = run(ours, x)
    lora.merge(ours)
    assert rel_err(run(ours, x), unmerged) <= 1e-12
    assert not torch.equal(ours.single_blocks[0].linear1.weight, weights["single_blocks.0.linear1.weight"])
    assert torch.equal(ours.single_blocks[0].linear1.weight[3 * H:], weights["single_blocks.0.linear1.weight"][3 * H:])
    lora.unmerge(ours)
    for n, p in ours.named_parameters():   # W0 + ΔW - ΔW: one float64 rounding, not bit-exact
        assert (p - weights[n]).abs().max() <= 1e-15 * weights[n].abs().max(), n
    assert rel_err(run(ours, x), unmerged) <= 1e-12


@pytest.mark.parametrize("targets", ["paper", "all", r"double_blocks\.1\..*|img_in"])
def test_save_load_round_trip(tmp_path, targets):
    _, ours = models()
    lora.inject(ours, targets, rank=4, alpha=8)      # alpha / rank = 2: baking it into B is exact in fp32
    randomize(ours)
    path = tmp_path / "lora.safetensors"
    lora.save(ours, path, {"base_model": "tiny", "steps": 7, "dataset": "sha256:abc"})
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]     # the temp file was renamed
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["rank"] == "4" and meta["alpha"] == "8" and meta["steps"] == "7" and meta["base_model"] == "tiny"
    assert meta["targets"] == (targets if targets in lora.PRESETS else "custom")
    x = inputs(CONFIG, refs=True)
    want = run(ours, x)
    for resume in (False, True):        # into a bare model, and into adapters injected before resuming
        _, fresh = models()
        if resume:
            lora.inject(fresh, targets, rank=4, alpha=8)
        params = lora.load(fresh, path)
        got, have = lora.adapters(fresh), lora.adapters(ours)
        assert got.keys() == have.keys() and len(params) == 2 * len(got)
        for n, m in got.items():
            assert (m.rank, m.alpha, m.out_slice) == (have[n].rank, have[n].alpha, have[n].out_slice), n
            assert torch.equal(m.lora_A, have[n].lora_A) and torch.equal(m.lora_B, have[n].lora_B), n
        assert rel_err(run(fresh, x), want) <= 1e-12    # the parameters are equal; see the no-op test


@pytest.mark.parametrize("targets", ["paper", "all"])
def test_diffusers_loads_our_file(tmp_path, targets):
    ref, ours = models()
    lora.inject(ours, targets, rank=4, alpha=6)      # alpha != rank, baked into B
    randomize(ours)
    path = tmp_path / "lora.safetensors"
    lora.save(ours, path, {})
    ref.load_lora_adapter(Flux2Pipeline.lora_state_dict(str(path)), prefix="transformer")
    loaded = {n for n, m in ref.named_modules() if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and m.lora_A}
    # every adapter arrives: double-block qkv becomes to_q/k/v (+2 modules per qkv adapter)
    assert len(loaded) == len(lora.adapters(ours)) + 2 * 2 * 2
    x = inputs(CONFIG, refs=True)
    assert rel_err(run(ours, x), run(ref, x)) <= 1e-6


def test_kohya_file(tmp_path):
    ref, ours = models()
    g = torch.Generator().manual_seed(7)
    # BFL module -> (rank, alpha); bf16 as kohya/musubi save them
    spec = {"double_blocks.0.img_attn.qkv": (4, 2), "double_blocks.1.txt_mlp.2": (3, 8),
            "single_blocks.0.linear1": (2, 1), "single_blocks.1.linear2": (4, 4), "img_in": (2, 3)}
    sd, bfl = {}, to_bfl(ref.state_dict())
    for name, (r, alpha) in spec.items():
        out, inn = bfl[f"{name}.weight"].shape
        stem = "lora_unet_" + name.replace(".", "_")
        sd[f"{stem}.lora_down.weight"] = torch.randn(r, inn, generator=g).bfloat16()
        sd[f"{stem}.lora_up.weight"] = torch.randn(out, r, generator=g).bfloat16()
        sd[f"{stem}.alpha"] = torch.tensor(float(alpha))
    path = tmp_path / "kohya.safetensors"
    save_file(sd, path)
    x = inputs(CONFIG, refs=False)
    for strength in (1.0, 0.5):
        merged = {k: v.clone() for k, v in bfl.items()}
        for name, (r, alpha) in spec.items():
            stem = "lora_unet_" + name.replace(".", "_")
            up, down = sd[f"{stem}.lora_up.weight"].double(), sd[f"{stem}.lora_down.weight"].double()
            merged[f"{name}.weight"] += strength * alpha / r * up @ down
        _, loaded = models()
        lora.load(loaded, path, scale=strength)
        assert rel_err(run(loaded, x), run(bfl_model(merged), x)) <= 1e-6
    # diffusers agrees; its kohya converter multiplies alpha / r in the file's dtype (~1e-3 off in bf16), so fp32 here
    path32 = tmp_path / "kohya32.safetensors"
    save_file({k: v.float() for k, v in sd.items()}, path32)
    ref.load_lora_adapter(Flux2Pipeline.lora_state_dict(str(path32)), prefix="transformer")
    lora.load(ours, path)
    assert rel_err(run(ours, x), run(ref, x)) <= 1e-6


def test_diffusers_file(tmp_path):
    """A genuine diffusers/PEFT file: separate q/k/v with mixed ranks, alpha_pattern, norm_out (rows swapped)."""
    ref, ours = models()
    base = {k: v.clone() for k, v in ref.state_dict().items()}
    targets = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
               "transformer_blocks.1.attn.add_q_proj", "transformer_blocks.1.attn.to_out.0",
               "transformer_blocks.0.ff_context.linear_in", "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
               "single_transformer_blocks.1.attn.to_out", "x_embedder", "norm_out.linear"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern={"to_k": 2}, alpha_pattern={"to_k": 3},
                        init_lora_weights=False)
    ref.add_adapter(config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g).float())   # fp32 values: the file is then exact
    Flux2Pipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(ref),
                                    transformer_lora_adapter_metadata=config.to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    lora.load(ours, path)
    assert ours.double_blocks[0].img_attn.qkv.rank == 4 + 2 + 4       # q/k/v fused, block-diagonal B
    x = inputs(CONFIG, refs=True)
    assert rel_err(run(ours, x), run(ref, x)) <= 1e-6
    with safe_open(str(path), "pt") as f:      # by hand: W += (alpha / r) B A in diffusers names, then to BFL
        for key in f.keys():
            if key.endswith(".lora_A.weight"):
                module = key[len("transformer."):-len(".lora_A.weight")]
                A, B = f.get_tensor(key).double(), f.get_tensor(key.replace("lora_A", "lora_B")).double()
                base[f"{module}.weight"] += (3 if module.endswith("to_k") else 8) / A.shape[0] * B @ A
    assert rel_err(run(ours, x), run(bfl_model(to_bfl(base)), x)) <= 1e-6


@pytest.mark.parametrize("targets", ["paper", "all"])
def test_comfyui_key_rules(tmp_path, targets):
    """ComfyUI (oracle §5.4): stem `diffusion_model.<p>` + `.lora_A/B.weight` patches weight `<p>.weight`."""
    _, ours = models()
    base = {k: v.shape for k, v in ours.state_dict().items()}
    lora.inject(ours, targets, rank=3)
    randomize(ours)
    path = tmp_path / "lora.safetensors"
    lora.save(ours, path, {})
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert len(tensors) == 2 * len(lora.adapters(ours))
    for key, t in tensors.items():
        assert key.startswith("diffusion_model.") and key.endswith((".lora_A.weight", ".lora_B.weight")), key
        stem = key[len("diffusion_model."):].rsplit(".", 2)[0]
        out, inn = base[f"{stem}.weight"]
        assert t.dtype == torch.float32
        assert tuple(t.shape) == ((3, inn) if ".lora_A." in key else (out, 3)), key
    B = tensors["diffusion_model.single_blocks.1.linear1.lora_B.weight"]    # q|k|v rows, then gate|up rows
    assert B[:3 * H].abs().min() > 0 and (targets == "all" or not B[3 * H:].any())


def test_bad_inputs(tmp_path):
    _, ours = models()
    unknown = tmp_path / "lokr.safetensors"
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1": torch.zeros(2, 2),
               "diffusion_model.img_in.lora_A.weight": torch.zeros(2, CONFIG["in_channels"]),
               "diffusion_model.img_in.lora_B.weight": torch.zeros(H, 2)}, unknown)
    with pytest.raises(LoRAError, match=r"lokr.safetensors: not a LoRA .* 1 unknown keys.*img_attn.qkv.lokr_w1"):
        lora.load(ours, unknown)
    dev = tmp_path / "dev.safetensors"     # shapes of FLUX.2 dev (hidden 6144), block 7 does not exist here
    save_file({f"diffusion_model.double_blocks.{i}.img_attn.qkv.lora_{ab}.weight":
               torch.zeros((2, 6144) if ab == "A" else (18432, 2)) for i in (0, 7) for ab in "AB"}, dev)
    with pytest.raises(LoRAError, match=r"dev.safetensors: .*another FLUX.2 size"):
        lora.load(ours, dev)
    assert isinstance(LoRAError(), ValueError) and not lora.adapters(ours)    # nothing changed on failure
    with pytest.raises(LoRAError, match="match no nn.Linear"):
        lora.inject(ours, r"nothing\.here")
    lora.inject(ours, "paper", rank=2)
    with pytest.raises(LoRAError, match="already has a LoRA adapter"):
        lora.inject(ours, "all", rank=2)


def test_dev_paper_rank16_parameter_count():
    with torch.device("meta"):
        dev = Flux2(PRESETS["dev"])
    params = lora.inject(dev, "paper", rank=16)
    assert len(params) == 2 * (8 * 4 + 48 * 2)
    assert sum(p.numel() for p in params) == 51_904_512
