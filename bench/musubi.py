"""Our FLUX.2 LoRA training step next to musubi-tuner's, at the same config, in one call.

musubi-tuner (github.com/kohya-ss/musubi-tuner) is what users pick to train FLUX.2 [dev] on small
cards: block swap through an H2D-only ring of GPU buffers fed from pinned host copies. This script
imports its model, block swap and LoRA network from a checkout (--musubi-dir: a copy of its public
repository in a git-ignored folder; never commit its code) and times its training step beside ours.

Both sides: random bf16 weights at full size (no checkpoint files: built on meta, filled block by
block on the GPU by models.fill_random), LoRA rank 16, gradient checkpointing, no fp8, 512 text
tokens, the same random inputs (bench.make_inputs), the GPU capped with offload.cap_gpu_memory, and
the same timer (bench.timed_steps: warm-up steps, then timed ones; s/step is their median). Each
side of each run is its own process, one after the other, so GPU and pinned memory start clean.

    ours     bench.Ours placed with offload.py's "auto" plan under the cap and the glue compiled
             (flux2.fuse; train.py's defaults on a GPU; --no-fuse: eager), fused AdamW.
    musubi   flux_2 Flux2 built as its trainer builds it (on the CPU when it swaps blocks, then
             enable_block_swap, move_to_device_except_swap_blocks, LoRA applied, gradient
             checkpointing, prepare_block_swap_before_forward), SDPA attention (--sdpa), fp32 LoRA
             under bf16 autocast (accelerate's --mixed_precision bf16), its default step: AdamW,
             grad-norm clipping at 1.0, inputs that require grad. A run's SWAP > 0 is
             `--blocks_to_swap SWAP --block_swap_h2d_only --use_pinned_memory_for_block_swap`
             (checked against its parser's source); 0 keeps every block resident.

Targets: "paper" is our preset, 128 layers of dev: both streams' attention qkv and proj in the
double blocks, single blocks' linear1 and linear2; musubi gets the same layers through
--network_args exclude_patterns=['.*'] include_patterns=[<the preset's regex>]. Ours adapts only
the q|k|v rows of linear1 (its first 3·6144 of 55296 outputs); musubi's LoRA module cannot slice a
linear, so it adapts all of linear1 (q|k|v and the MLP input): a rank-16 up-projection 3x taller
there, and more LoRA work per step on its side. "attn+mlp" is musubi's default (every linear of the
blocks, 160 layers) against ours --lora-targets attn+mlp: the same layers on both sides.

Runs are BxSIDE@CAP:SWAP[:TARGETS] (batch x side in pixels @ GPU GiB : musubi blocks to swap).

    python bench/musubi.py --musubi-dir .musubi --out bench/h200
    python bench/musubi.py --musubi-dir .musubi --preset tiny --device cpu --runs 1x64@1:0 \\
        --txt-len 16 --warmup 1 --steps 1 --out /tmp/musubi            # a dry run on the CPU

Writes musubi.json (every record, rewritten after each process) and musubi.md under --out.
"""
import os

# as bench.py: fewer fragments; huge pages make big host tensors faster to pin
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402
import flux2  # noqa: E402
import lora  # noqa: E402
import models  # noqa: E402
import offload  # noqa: E402
from util import GiB, HelpFormatter, atomic_write  # noqa: E402

RUNS = "1x1024@80:0,1x1024@24:29,4x1024@80:16,1x1024@80:0:attn+mlp"
SWAP_FLAGS = ("--blocks_to_swap", "--block_swap_h2d_only", "--use_pinned_memory_for_block_swap")
LINEAR1_CAVEAT = ("musubi adapts all of single blocks' linear1 (q|k|v and MLP input, 55296 rows); "
                  "ours only its q|k|v rows (18432)")


def parse_runs(text: str) -> list[dict]:
    """'1x1024@24:29,1x1024@80:0:attn+mlp' -> one record per run: batch, side, GPU cap in GiB,
    musubi's blocks to swap, LoRA targets (default "paper")."""
    runs = []
    for spec in text.split(","):
        m = re.fullmatch(r"(\d+)x(\d+)@([\d.]+):(\d+)(?::(paper|attn\+mlp))?", spec.strip())
        if not m:
            raise SystemExit(f"bench/musubi.py: --runs {spec!r}: expected "
                             f"BxSIDE@CAP:SWAP[:TARGETS] like 1x1024@24:29 or 1x1024@80:0:attn+mlp")
        batch, side, cap, swap, targets = m.groups()
        runs.append({"batch": int(batch), "side": int(side), "cap_gib": float(cap),
                     "swap": int(swap), "targets": targets or "paper"})
    return runs


def musubi_flags(run: dict) -> tuple[str, str]:
    """(block swap flags, LoRA target flags) of musubi's command line that a run stands for."""
    swap = (f"{SWAP_FLAGS[0]} {run['swap']} {' '.join(SWAP_FLAGS[1:])}" if run["swap"]
            else "resident")
    if run["targets"] == "attn+mlp":
        return swap, "(its default)"
    return swap, (f"--network_args \"exclude_patterns=['.*']\" "
                  f"\"include_patterns=['{lora.PRESETS[run['targets']]}']\"")


def musubi_lora_names(targets: str, cfg: flux2.Flux2Config) -> set[str]:
    """The lora_name of every musubi LoRA module that adapts what our `targets` adapt (musubi names
    a module lora_unet_ + its path with dots as underscores; its paths are BFL's, as ours)."""
    with torch.device("meta"):
        model = flux2.Flux2(cfg)
    return {"lora_unet_" + name.replace(".", "_") for name in lora.select(model, targets)}


# --------------------------------------------------------------------------------------------------
# One side of one run, in its own process

def measure(step, run: dict, args, device, label: str, counter=lambda: 0) -> dict:
    """Warm-up and timed steps (bench.timed_steps), then s/step as their median and the memory."""
    r = bench.timed_steps(step, args.warmup, args.steps if run["batch"] < 4 else
                          args.big_batch_steps, args.deadline, device, label, counter)
    if r["steps_s"]:
        r["s_per_step"] = statistics.median(r["steps_s"])
        r["mean_s_per_step"] = sum(r["steps_s"]) / len(r["steps_s"])
    r.update(bench.gpu_gib(device))
    r["host_rss_gib"], r["host_peak_rss_gib"] = bench.host_gib()
    return r


def run_ours(run: dict, args, device) -> dict:
    """Our step: bench.Ours with the run's LoRA targets, placed by the "auto" plan under the cap,
    with the glue compiled unless --no-fuse."""
    flux2.fuse(args.fuse)
    ns = argparse.Namespace(preset=args.preset, dtype=torch.bfloat16, rank=args.rank,
                            txt_len=args.txt_len, gpu_memory_limit=run["cap_gib"])
    ours = bench.Ours(ns, device, with_lora=False)
    ours.lora = lora.inject(ours.model, run["targets"], rank=args.rank)
    t0 = time.time()
    plan = ours.prepare("auto", run["batch"], run["side"])
    setup_s = time.time() - t0
    bench.free_memory(device)
    r = measure(ours.step_fn(run["batch"], run["side"]), run, args, device, "ours",
                lambda: offload.stats(ours.model)["moved_bytes"])
    stats = offload.stats(ours.model)
    r.update(setup_s=setup_s, plan=plan.describe(), pinned_gib=stats["pinned_bytes"] / GiB,
             modules=len(lora.select(ours.model, run["targets"])))
    return r


def import_musubi(musubi_dir: Path):
    """musubi's FLUX.2 model module, its BlockSwapConfig and its FLUX.2 LoRA network module."""
    sys.path.insert(0, str(musubi_dir / "src"))
    from musubi_tuner.flux_2 import flux2_models
    from musubi_tuner.modules.custom_offloading_utils import BlockSwapConfig
    from musubi_tuner.networks import lora_flux_2
    return flux2_models, BlockSwapConfig, lora_flux_2


def build_musubi(flux2_models, cfg: flux2.Flux2Config, swap: int, device) -> torch.nn.Module:
    """musubi's Flux2 with random bf16 weights where its trainer loads them: on the CPU when it
    swaps blocks, else on the GPU. Filled one part at a time on the GPU (fast, and within a small
    cap), then moved home."""
    params = flux2_models.Flux2Params(
        in_channels=cfg.in_channels, context_in_dim=cfg.context_in_dim,
        hidden_size=cfg.hidden_size, num_heads=cfg.num_heads, depth=cfg.depth,
        depth_single_blocks=cfg.depth_single_blocks, axes_dim=list(cfg.axes_dim), theta=cfg.theta,
        mlp_ratio=cfg.mlp_ratio, use_guidance_embed=cfg.use_guidance_embed)
    with torch.device("meta"):
        model = flux2_models.Flux2(params, attn_mode="torch").to(torch.bfloat16)   # its --sdpa
    home = torch.device("cpu") if swap else device
    parts = [m for name, m in model.named_children() if name not in ("double_blocks",
                                                                      "single_blocks")]
    for part in [*parts, *model.double_blocks, *model.single_blocks]:
        part.to_empty(device=device)
        models.fill_random(part, device)
        part.to(home)
    return model


def swap_config(BlockSwapConfig, musubi_dir: Path, device):
    """musubi's block-swap config for --block_swap_h2d_only --use_pinned_memory_for_block_swap,
    after checking that its parser still defines those flags."""
    parser_src = (musubi_dir / "src/musubi_tuner/training/parser_common.py").read_text()
    missing = [f for f in SWAP_FLAGS if f'"{f}"' not in parser_src]
    if missing:
        raise SystemExit(f"bench/musubi.py: --musubi-dir {musubi_dir}: its parser has no "
                         f"{', '.join(missing)}; use a checkout with the H2D-only block swap")
    flags = argparse.Namespace(block_swap_h2d_only=True, use_pinned_memory_for_block_swap=True,
                               gradient_checkpointing=True, block_swap_ring_size=2)
    return BlockSwapConfig.from_args(flags, device, supports_backward=True)


def prepare_musubi(run: dict, args, device):
    """(model, LoRA network) placed as musubi's trainer places them (trainer_base.py:
    _load_dit_and_swap, _create_network, _prepare_with_accelerator)."""
    flux2_models, BlockSwapConfig, lora_flux_2 = import_musubi(args.musubi_dir)
    cfg = flux2.PRESETS[args.preset]
    model = build_musubi(flux2_models, cfg, run["swap"], device)
    model.eval()
    model.requires_grad_(False)
    if run["swap"]:
        model.enable_block_swap(run["swap"], swap_config(BlockSwapConfig, args.musubi_dir, device))
        model.move_to_device_except_swap_blocks(device)
    patterns = {} if run["targets"] == "attn+mlp" else {
        "exclude_patterns": repr([".*"]), "include_patterns": repr([lora.PRESETS[run["targets"]]])}
    network = lora_flux_2.create_arch_network(1.0, args.rank, args.rank, None, [], model,
                                              **patterns)
    names = {m.lora_name for m in network.unet_loras}
    if names != musubi_lora_names(run["targets"], cfg):
        raise RuntimeError(f"musubi's LoRA adapts {len(names)} modules, not ours "
                           f"({run['targets']}): the comparison would not be like for like")
    network.apply_to(None, model, apply_text_encoder=False, apply_unet=True)
    model.enable_gradient_checkpointing()
    network.to(device)                          # accelerator.prepare(network); adapters stay fp32
    if run["swap"]:
        model.move_to_device_except_swap_blocks(device)
        model.prepare_block_swap_before_forward()
    model.train()                               # its checkpointing runs only in train mode
    return model, network


def musubi_step(model, network, run: dict, args, device):
    """musubi's training step on our random inputs, as a closure returning the loss: inputs that
    require grad (as its call_dit does under checkpointing), forward under bf16 autocast, MSE in
    fp32, backward, grad-norm clip 1.0, AdamW."""
    params, _ = network.prepare_optimizer_params(unet_lr=1e-4)
    opt = torch.optim.AdamW(params, lr=1e-4)
    trainable = list(network.get_trainable_params())
    (img, img_ids, txt, txt_ids, t, guidance), target = bench.make_inputs(
        flux2.PRESETS[args.preset], run["batch"], run["side"], args.txt_len, device, torch.bfloat16)
    img.requires_grad_(True)
    txt.requires_grad_(True)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = model(x=img, x_ids=img_ids, timesteps=t, ctx=txt, ctx_ids=txt_ids,
                         guidance=guidance)                          # [B, h·w, 128]
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def run_musubi(run: dict, args, device) -> dict:
    """musubi's step at the run's config, with the host memory its block swap pinned."""
    if run["swap"] and device.type != "cuda":
        return {"status": "skipped: musubi's block swap needs CUDA"}
    t0 = time.time()
    model, network = prepare_musubi(run, args, device)
    setup_s = time.time() - t0
    bench.free_memory(device)
    r = measure(musubi_step(model, network, run, args, device), run, args, device, "musubi")
    pinned = sum(flat.nbytes for o in (model.offloader_double, model.offloader_single) if o
                 for flat in getattr(o, "cpu_flat", {}).values() if flat.is_pinned())
    r.update(setup_s=setup_s, pinned_gib=pinned / GiB, modules=len(network.unet_loras))
    return r


def child(args):
    """One side of one run in this process; its record goes to --child-json."""
    run = parse_runs(args.runs)[0]
    device = torch.device(args.device)
    if device.type == "cuda":                   # an index, as bench.py's runs have
        device = torch.device("cuda", torch.cuda.current_device())
    offload.cap_gpu_memory(device, run["cap_gib"])
    try:
        r = (run_ours if args.child == "ours" else run_musubi)(run, args, device)
        r.setdefault("status", "ok" if r.get("steps_s") else "cut: time budget")
    except torch.OutOfMemoryError:
        r = {"status": "OOM", **bench.gpu_gib(device)}
    r["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    atomic_write(args.child_json, lambda tmp: Path(tmp).write_text(json.dumps(r)))


# --------------------------------------------------------------------------------------------------
# The call: every run, each side in its own process

def side_cmd(args, spec: str, side: str, record: Path) -> list[str]:
    """The command line that measures one side of one run in a fresh process."""
    return [sys.executable, __file__, "--child", side, "--child-json", str(record),
            "--runs", spec, "--musubi-dir", str(args.musubi_dir), "--deadline", str(args.deadline),
            "--preset", args.preset, "--rank", str(args.rank), "--txt-len", str(args.txt_len),
            "--warmup", str(args.warmup), "--steps", str(args.steps),
            "--big-batch-steps", str(args.big_batch_steps), "--device", args.device,
            "--out", str(args.out), "--fuse" if args.fuse else "--no-fuse"]


def run_side(args, spec: str, side: str) -> dict:
    """One side of one run through side_cmd; a crash or a timeout becomes the record's status."""
    remaining = args.deadline - time.time()
    if remaining < 30:
        return {"status": "skipped: time budget"}
    record = args.out / f".musubi-{side}.json"
    record.unlink(missing_ok=True)
    try:
        done = subprocess.run(side_cmd(args, spec, side, record), timeout=remaining + 60)
    except subprocess.TimeoutExpired:
        return {"status": "killed: time budget"}
    if not record.exists():
        return {"status": f"error: exit {done.returncode} (see the output above)"}
    return json.loads(record.read_text())


def table(results: list[dict]) -> str:
    """The markdown table of every run: both sides' s/step, their ratio, memory, musubi's swap."""
    rows = ["| run | targets | ours s/step | musubi s/step | musubi/ours | peak GPU GiB ours / "
            "musubi | pinned GiB ours / musubi | musubi block swap |",
            "|---|---|---|---|---|---|---|---|"]
    for res in results:
        o, m = res["ours"], res["musubi"]
        s = [x.get("s_per_step") for x in (o, m)]
        ratio = f"{s[1] / s[0]:.2f}x" if all(s) else "-"
        times = [f"{x:.2f}" if x else y["status"] for x, y in zip(s, (o, m))]
        mem = [f"{x.get('peak_gpu_gib', 0):.1f}" for x in (o, m)]
        pin = [f"{x.get('pinned_gib', 0):.1f}" for x in (o, m)]
        rows.append(f"| {res['batch']}x{res['side']} @ {res['cap_gib']:g} GiB | {res['targets']} "
                    f"| {times[0]} | {times[1]} | {ratio} | {' / '.join(mem)} | {' / '.join(pin)} "
                    f"| {musubi_flags(res)[0]} |")
    return "\n".join(rows)


def write_results(out: Path, meta: dict, results: list[dict]):
    """musubi.json (every record) and musubi.md (the table and the linear1 caveat)."""
    atomic_write(out / "musubi.json", lambda tmp: Path(tmp).write_text(
        json.dumps({"meta": meta, "runs": results}, indent=1)))
    text = (f"# ours vs musubi-tuner {meta['musubi_commit']}, {meta['device']}, "
            f"torch {meta['torch']}; ours {'with' if meta.get('fuse') else 'without'} the "
            f"compiled glue\n\n{table(results)}\n\npaper targets: {LINEAR1_CAVEAT}; "
            f"musubi gets them by {musubi_flags({'swap': 0, 'targets': 'paper'})[1]}.\n")
    atomic_write(out / "musubi.md", lambda tmp: Path(tmp).write_text(text))


def musubi_commit(musubi_dir: Path) -> str:
    """The checkout's commit when it is a git work tree of its own, else its pyproject version."""
    done = subprocess.run(["git", "-C", str(musubi_dir), "rev-parse", "--show-toplevel",
                           "--short", "HEAD"], capture_output=True, text=True)
    top, _, commit = done.stdout.strip().partition("\n")
    if done.returncode == 0 and Path(top).resolve() == musubi_dir.resolve():
        return commit
    version = re.search(r'^version = "(.+)"', (musubi_dir / "pyproject.toml").read_text()
                        if (musubi_dir / "pyproject.toml").is_file() else "", re.M)
    return f"version {version[1]}" if version else "unknown"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--musubi-dir", type=Path, required=True,
                   help="a checkout of github.com/kohya-ss/musubi-tuner (holding "
                        "src/musubi_tuner)")
    p.add_argument("--runs", default=RUNS,
                   help="BxSIDE@CAP:SWAP[:TARGETS], comma-separated: batch x side in pixels, the "
                        "GPU cap in GiB for both sides, musubi's --blocks_to_swap (0: resident), "
                        "LoRA targets paper unless :attn+mlp is named")
    p.add_argument("--musubi-commit", default=None,
                   help="the checkout's commit for the report (else git's, or its version, is "
                        "read from it)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--steps", type=int, default=5, help="timed steps (batch < 4)")
    p.add_argument("--big-batch-steps", type=int, default=3, help="timed steps at batch >= 4")
    p.add_argument("--time-budget", type=float, default=540,
                   help="seconds for the whole call; a side that would start later is skipped")
    p.add_argument("--preset", default="dev", choices=sorted(flux2.PRESETS), help="DiT size")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank on both sides")
    p.add_argument("--txt-len", type=int, default=512, help="text tokens per sample")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run (--preset tiny)")
    p.add_argument("--out", type=Path, required=True, help="folder for musubi.json and musubi.md")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                   help="ours with the glue between the matmuls compiled (flux2.fuse), as train.py "
                        "runs on a GPU by default; musubi runs as its trainer does by default")
    p.add_argument("--child", choices=["ours", "musubi"], help=argparse.SUPPRESS)
    p.add_argument("--child-json", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return p


def main(argv=None):
    """CLI entry point: each run's two sides, one process each; results under --out."""
    args = _parser().parse_args(argv)
    if args.child:
        return child(args)
    runs = parse_runs(args.runs)
    if not (args.musubi_dir / "src/musubi_tuner/flux_2/flux2_models.py").is_file():
        raise SystemExit(f"bench/musubi.py: --musubi-dir {args.musubi_dir}: no "
                         f"src/musubi_tuner/flux_2/flux2_models.py there; pass a checkout of "
                         f"github.com/kohya-ss/musubi-tuner")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench/musubi.py: no CUDA device here; for a dry run pass --device cpu "
                         "--preset tiny")
    t_start = time.time()
    args.deadline = t_start + args.time_budget
    args.out.mkdir(parents=True, exist_ok=True)
    # the children name the device: this process makes no CUDA context of its own
    meta = {"device": "?", "torch": torch.__version__, "preset": args.preset, "rank": args.rank,
            "musubi_commit": args.musubi_commit or musubi_commit(args.musubi_dir),
            "paper_targets": LINEAR1_CAVEAT, "fuse": args.fuse,
            "command": "python bench/musubi.py " + " ".join(argv or sys.argv[1:])}
    print(json.dumps(meta), flush=True)
    results = []
    for spec, run in zip(args.runs.split(","), runs):
        res = {**run, "musubi_flags": " ".join(musubi_flags(run)), "ours": {"status": "not run"},
               "musubi": {"status": "not run"}}
        results.append(res)
        for side in ("ours", "musubi"):
            print(f"\n=== {spec.strip()} {side} ({time.time() - t_start:.0f} s elapsed) ===",
                  flush=True)
            res[side] = run_side(args, spec.strip(), side)
            meta["device"] = res[side].get("device", meta["device"])
            write_results(args.out, meta, results)
    print("\n" + table(results) + f"\n\npaper targets: {LINEAR1_CAVEAT}", flush=True)
    print(f"done in {time.time() - t_start:.0f} s; results in {args.out}", flush=True)


if __name__ == "__main__":
    main()
