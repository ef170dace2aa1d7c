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


def test_reference_images_add_tokens_and_flops(tmp_path):
    """+ref1 appends a reference image of the run's side: twice the image tokens, the FLOPs of the
    longer sequence, and a loss over the target's tokens only."""
    c = flux2.PRESETS["dev"]
    assert bench.references("auto+fuse+ref1") == 1 and bench.references("auto+fuse") == 0
    assert bench.tokens(1024, 512, refs=1) == 2 * 4096 + 512
    assert bench.flops(c, 1, 1024, 512, refs=1)[0] == flux2.train_step_flops(c, 1, 8192, 512)
    (img, img_ids, *_), target = bench.make_inputs(flux2.PRESETS["tiny"], 2, 64, 16, "cpu",
                                                   torch.float32, refs=1)
    assert img.shape[1] == 2 * target.shape[1] == 32
    assert img_ids[0, :16, 0].eq(0).all() and img_ids[0, 16:, 0].eq(10).all()
    bench.main(["--preset", "tiny", "--device", "cpu", "--txt-len", "16", "--steps", "1",
                "--runs", "1x64:auto,1x64:auto+ref1", "--out", str(tmp_path)])
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [(r["refs"], r["status"], r["tokens_per_sample"]) for r in runs] == \
        [(0, "ok", 32), (1, "ok", 48)]


def test_musubi_side_by_side_runs_and_targets():
    """bench/musubi.py without a musubi checkout: its run list, the flags each run stands for, and
    the musubi LoRA modules matching our presets (128 layers of dev for "paper", 160 for attn+mlp),
    which it checks musubi's network against."""
    import importlib.util
    from pathlib import Path

    import pytest
    path = Path(bench.__file__).parent / "bench" / "musubi.py"
    spec = importlib.util.spec_from_file_location("bench_musubi", path)
    musubi = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(musubi)
    runs = musubi.parse_runs(musubi.RUNS)
    assert [(r["batch"], r["cap_gib"], r["swap"], r["targets"]) for r in runs] == \
        [(1, 80, 0, "paper"), (1, 24, 29, "paper"), (4, 80, 16, "paper"), (1, 80, 0, "attn+mlp")]
    assert musubi.musubi_flags(runs[1])[0] == \
        "--blocks_to_swap 29 --block_swap_h2d_only --use_pinned_memory_for_block_swap"
    with pytest.raises(SystemExit, match="--runs '1x1024@24': expected"):
        musubi.parse_runs("1x1024@24")
    paper = musubi.musubi_lora_names("paper", flux2.PRESETS["dev"])
    assert len(paper) == 128 and "lora_unet_single_blocks_47_linear1" in paper
    assert "lora_unet_double_blocks_0_img_mlp_0" not in paper
    assert len(musubi.musubi_lora_names("attn+mlp", flux2.PRESETS["dev"])) == 160
