"""A small card end to end, on the CPU at tiny size: the text encoder run layer by layer (the same features as
the whole encoder, bit for bit), the host-memory budget in the planner's arithmetic, out-of-memory errors as one
line, and sample.py's --model choices."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import data
import models
import offload
import planner
import sample
import text_encoder
import train
from text_encoder import TEXT_PRESETS, MistralEncoder, TextWeights, encode_by_layers

MiB = 2**20
TOY = Path(__file__).resolve().parents[1] / "examples" / "toy"
PROMPTS = ["a red circle", "", "a much longer prompt about a small dog dancing on a green hill at dawn"]


def hf_checkpoint(folder: Path, family: str) -> Path:
    """A tiny HF-layout text encoder (config.json + model.safetensors, `model.` keys, float64, every weight and norm
    drawn with a real spread) of the Mistral (dev) or Qwen3 (klein) family; 5 layers, FLUX.2 reads 1, 2 and 4."""
    cfg = dataclasses.replace(TEXT_PRESETS["tiny"], num_layers=5, output_layers=(1, 2, 4), qk_norm=family == "qwen3")
    torch.manual_seed(0)
    model = MistralEncoder(cfg).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    folder.mkdir(parents=True)
    save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "model_type": family, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps, "sliding_window": None}))
    return folder


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("family", ["mistral", "qwen3"])
def test_encoding_layer_by_layer_gives_the_whole_encoders_features_bit_for_bit(tmp_path, family, dtype):
    folder = hf_checkpoint(tmp_path / family, family)
    tokenizer = text_encoder.Tokenizer.tiny()
    ids, mask = tokenizer.encode_prompts(PROMPTS)
    whole = text_encoder.load_text_encoder(folder, layers=(1, 2, 4), dtype=dtype)
    with torch.no_grad():
        want = torch.cat([whole(ids[i:i + 1], mask[i:i + 1]) for i in range(len(PROMPTS))])   # one per forward
    weights = TextWeights(folder, layers=(1, 2, 4))
    with torch.device("meta"):
        encoder = MistralEncoder(weights.cfg).to(dtype)
    parts = []

    def load(name, part):
        parts.append(name)
        weights.load(part, name, device="cpu", dtype=dtype)
    got = encode_by_layers(encoder, ids, mask, load=load, device="cpu", store="cpu")
    assert got.dtype == dtype and got.shape == (3, 512, 3 * 64) and torch.equal(got, want)
    assert parts == ["embed_tokens", "layers.0", "layers.1", "layers.2", "layers.3"]   # layer 5 is never read
    assert all(p.is_meta for p in encoder.parameters())                                # each part dropped again


def test_model_source_picks_layers_when_the_encoder_does_not_fit(monkeypatch):
    sweeps = []
    real = models.encode_by_layers
    monkeypatch.setattr(models, "encode_by_layers", lambda *a, **kw: sweeps.append(1) or real(*a, **kw))
    whole = models.ModelSource("tiny", None, "cpu").load_text_encoder()(PROMPTS)
    assert sweeps == []                                     # a CPU run without a limit: nothing to fit
    # the tiny encoder is ~0.4 MiB: it does not fit 0.1 MiB, so one sweep encodes every prompt
    by_layers = models.ModelSource("tiny", None, "cpu", gpu_memory_limit=0.1 / 1024).load_text_encoder()(PROMPTS)
    assert sweeps == [1] and torch.equal(by_layers, whole)
    forced = models.ModelSource("tiny", None, "cpu", text_by_layers=False, gpu_memory_limit=1e-6)
    assert torch.equal(forced.load_text_encoder()(PROMPTS), whole) and sweeps == [1]


def test_random_models_build_each_layer_on_the_device(monkeypatch):
    """A random model's layers are drawn where they run (fill_random per part, not read): tiny shapes here."""
    monkeypatch.setitem(models.RANDOM_MODELS, "tiny-random", ("tiny", "tiny"))
    source = models.ModelSource("tiny-random", None, "cpu", text_by_layers=True)
    got = source.load_text_encoder()(PROMPTS)
    assert got.shape == (3, 512, 192) and got.isfinite().all() and not torch.equal(got[0], got[2])


def test_caching_encodes_every_missing_text_in_one_call(tmp_path):
    calls = []

    def load_encoder():
        encode = models.ModelSource("tiny", None, "cpu").load_text_encoder()
        return lambda texts: calls.append(len(texts)) or encode(texts)
    texts = [f"caption {i}" for i in range(9)] + [""]
    data.cache_texts(texts, cache_dir=tmp_path, text_id="t", load_encoder=load_encoder)
    assert calls == [10]


# --------------------------------------------------------------------------------------------------
# The host-memory budget (planner arithmetic on round numbers, as tests/test_offload.py)

BLOCKS = [4 * MiB, 4 * MiB, 1 * MiB, 2 * MiB, 3 * MiB]
ACTS = planner.ActivationBytes(saved_input=MiB // 8, working_set=1 * MiB, whole_block=2 * MiB,
                               kept_outputs={"mlp": MiB // 8, "attention": MiB // 4})


def plan(budget_mib, host_mib=None, **kw):
    return planner.plan(BLOCKS, MiB, activations=ACTS, batch_size=2, budget_bytes=int(budget_mib * MiB / 0.95) + 1,
                        trainable_bytes=MiB // 4, host_budget_bytes=None if host_mib is None else int(host_mib * MiB),
                        **kw)


def test_a_host_limit_changes_the_plan_and_describe_shows_host_memory():
    # 2 MiB short of all-resident: blocks 1-4 (10 MiB) stream; with copies hidden behind compute all 5 (14 MiB)
    # stream so that every block keeps its outputs
    hidden = dict(tokens_per_sample=planner.HIDE_TOKENS // 2)
    assert plan(17.25, **hidden).streamed == [0, 1, 2, 3, 4] and plan(17.25, **hidden).host_bytes == 14 * MiB
    p = plan(17.25, host_mib=12, **hidden)                 # 14 MiB would not fit 12: the fewest blocks instead
    assert p.streamed == [1, 2, 3, 4] and p.host_bytes == 10 * MiB and not any(p.kept.values())
    assert "host memory for streamed weights: 10.0 MiB of a 12.0 MiB host budget" in p.describe()
    assert plan(100).host_bytes == 0 and "host memory" not in plan(100).describe()
    fsdp = planner.plan(BLOCKS, MiB, activations=ACTS, batch_size=2, budget_bytes=None, strategy="fsdp2")
    assert fsdp.host_bytes == 15 * MiB and "host memory for streamed weights: 15.0 MiB" in fsdp.describe()


def test_a_host_limit_that_no_plan_fits_says_which_budget_and_by_how_much():
    with pytest.raises(planner.PlanError) as e:
        plan(17.25, host_mib=9)
    assert str(e.value) == ("batch 2 on a 18.2 MiB GPU: 4 streamed blocks need 10.0 MiB of host memory, 1.0 MiB "
                            "more than the 9.0 MiB host budget: raise --host-memory-limit (or free host memory), or "
                            "raise --gpu-memory-limit or lower --batch-size (fewer blocks streamed)")
    with pytest.raises(planner.PlanError, match="--offload stream: all blocks need 14.0 MiB .* use --offload auto"):
        plan(100, host_mib=13, strategy="stream")
    with pytest.raises(planner.PlanError, match="FSDP2's shards in host memory need 15.0 MiB"):
        plan(100, host_mib=13, strategy="fsdp2")


def test_host_budget_default_is_available_memory_less_a_margin(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       65536000 kB\nMemAvailable:   20971520 kB\n")      # 20 GiB available
    assert offload.host_budget(None, meminfo) == 18.0                                   # less 10%
    meminfo.write_text("MemAvailable:   104857600 kB\n")                                 # 100 GiB: less 4 GiB
    assert offload.host_budget(None, meminfo) == 96.0
    assert offload.host_budget(7.5, meminfo) == 7.5
    assert offload.host_budget(None, tmp_path / "absent") is None                      # not Linux: no limit


# --------------------------------------------------------------------------------------------------
# Out of memory: one line, exit 2, checkpoints untouched

def train_argv(tmp_path, *extra):
    return ["--data", str(TOY), "--model", "tiny", "--device", "cpu", "--out", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), "--resolution", "32", "--sample-every", "0", *extra]


def test_out_of_memory_while_training_is_one_line_and_keeps_the_checkpoints(tmp_path, monkeypatch, capsys):
    real, calls = train.flow_matching_loss, []

    def flaky(*a, **kw):                                    # the third step runs out of GPU memory
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **kw)
    monkeypatch.setattr(train, "flow_matching_loss", flaky)
    argv = train_argv(tmp_path, "--steps", "4", "--save-every", "1", "--gpu-memory-limit", "1")
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: GPU memory ran out (limit 1.0 GiB) while training; the offload plan 'auto' "
                          "for batch 1 wanted ~")
    assert err.endswith(f"of it; lower what the run needs or raise what it may use: {planner.MEMORY_FLAGS}")
    saved = train.checkpoints(tmp_path / "out")
    assert [train.load_checkpoint(c)["step"] for c in saved] == [1, 2]          # whole, as written before
    assert not list((tmp_path / "out" / "checkpoints").glob("*.tmp"))


def test_a_failed_page_lock_while_caching_is_a_host_out_of_memory(tmp_path, monkeypatch, capsys):
    def refuse(*a, **kw):
        raise RuntimeError("CUDA error: out of memory")     # what pin_memory's cudaHostAlloc raises
    monkeypatch.setattr(data, "cache_texts", refuse)
    assert train.main(train_argv(tmp_path, "--steps", "1", "--host-memory-limit", "2")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: host memory ran out (limit 2.0 GiB) while caching latents and text features; lower what the run "
        f"needs or raise what it may use: {planner.MEMORY_FLAGS}")


def test_sample_out_of_memory_is_one_line(tmp_path, monkeypatch, capsys):
    def refuse(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(sample, "generate", refuse)
    argv = ["--model", "tiny", "--device", "cpu", "--prompt", "a fox", "--steps", "1", "--width", "32",
            "--height", "32", "--out", str(tmp_path / "x.png")]
    assert sample.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: GPU memory ran out while sampling; the offload plan 'auto' for batch 1 wanted ~")
    assert "\n" not in err and not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------------------------------
# sample.py's models

def test_sample_accepts_tiny_and_the_random_models(tmp_path):
    out = tmp_path / "tiny.png"
    assert sample.main(["--model", "tiny", "--device", "cpu", "--prompt", "a fox", "--seed", "1", "--steps", "1",
                        "--width", "32", "--height", "32", "--out", str(out)]) == 0
    assert out.is_file()
    for name in models.RANDOM_MODELS:
        args = sample._parser().parse_args(["--model", name, "--prompt", "a fox"])
        assert args.model == name and sample._settings(args)["model"] == name
