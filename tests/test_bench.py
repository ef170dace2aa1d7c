"""bench.py on the CPU: the diffusers baseline adapts the layers our "paper" preset adapts, and a
dry run of every training path ends with each row measured."""
import json

import torch

import bench
import flux2
import lora
import weights


def test_diffusers_baseline_adapts_the_paper_layers():
    from diffusers import Flux2Transformer2DModel
    c = flux2.PRESETS["tiny"]
    with torch.device("meta"):
        theirs = Flux2Transformer2DModel(
            in_channels=c.in_channels, num_layers=c.depth, num_single_layers=c.depth_single_blocks,
            attention_head_dim=c.hidden_size // c.num_heads, num_attention_heads=c.num_heads,
            joint_attention_dim=c.context_in_dim, mlp_ratio=c.mlp_ratio,
            axes_dims_rope=tuple(c.axes_dim), rope_theta=c.theta,
            guidance_embeds=c.use_guidance_embed)
        ours = flux2.Flux2(c)
    targets = bench.diffusers_lora_targets(theirs)
    assert "transformer_blocks.0.attn.to_q" in targets and "transformer_blocks.0.ff.linear_in" \
        not in targets
    # q, k and v are three diffusers linears for one BFL qkv; each BFL module is reached
    assert {weights.bfl_module(n)[0] for n in targets} == set(lora.select(ours, "paper"))


def test_dry_run_measures_every_path(tmp_path):
    bench.main(["--preset", "tiny", "--device", "cpu", "--configs", "1x64", "--txt-len", "16",
                "--steps", "1", "--gpu-memory-limit", "1", "--strategies", "stream,auto,fsdp2",
                "--diffusers-baseline", "--out", str(tmp_path)])
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [(r["strategy"], r["status"]) for r in runs] == \
        [("diffusers", "ok"), ("stream", "ok"), ("auto", "ok"), ("fsdp2", "ok")]
    assert all(r["s_per_step"] > 0 for r in runs)
    assert "| 1x64 | stream |" in (tmp_path / "results.md").read_text()
