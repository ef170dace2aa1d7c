"""Full-size FLUX.2 LoRA training on one GPU: seconds per step, MFU and memory for each offload.py
strategy, against a diffusers + PEFT baseline; and the speed of one resident forward.

Training runs (the default) measure, per batch x side and strategy: seconds per step, samples/s,
MFU and HFU, peak GPU memory, host memory pinned and resident, and the host-to-device bytes per step
the plan expects against those the streamer moved. --forward-only measures one forward per config
without autograd, every block resident: seconds, TFLOP/s, MFU and peak memory. Weights are random
bf16 (models.fill_random): the numbers do not depend on their values. Follows docs/offload.md §6
for the FLOP and traffic bounds.

    python bench.py --out bench/h100                        # 4 configs x 5 strategies
    python bench.py --forward-only --out bench/h100-fwd     # one forward at 1024² and 512², batch 1
    python bench.py --gpu-memory-limit 80 --runs 8x1024:auto+fuse,1x1024:auto+fuse --out bench/h200
    python bench.py --preset tiny --device cpu --configs 1x64 --txt-len 16 --steps 1 \\
        --gpu-memory-limit 1 --strategies resident,stream,auto,fsdp2 --diffusers-baseline \\
        --out /tmp/bench                                    # a dry run of every path

FLOPs per step, for B samples of S tokens (image + text), T = B·S, N = 27.48e9 block parameters a
token meets (a double block's token uses one stream's weights), A = 4·B·S²·H·L the attention
forward (QKᵀ and PV, H = 6144, L = 56 blocks):
    model work     4·N·T + 3·A    forward + activation-gradient backward (the base is frozen: no
                                  weight gradients), attention forward + backward;
                                  MFU = model work / (s/step · peak)
    executed work  6·N·T + 4.5·A  adds the checkpoint recompute (2·N·T + A) and FlashAttention's
                                  recompute of the scores in backward (0.5·A);
                                  HFU = executed work / (s/step · peak)
LoRA (~0.2% of N) and the embedders / final layer are left out. Peak = the card's measured bf16
matmul rate (flux2.PEAK_BF16_FLOPS: 8192³ bf16 matmuls, H100 798, H200 788 TFLOP/s);
--peak-tflops overrides.

Runs go in this order, each skipped when the time budget would not cover it: the diffusers baseline
(resident, batch <= 2; first, so the two models never share the GPU), then ours: 8x1024 auto and
stream, 1x1024 resident, the other eager runs as listed, the +fuse runs, then FSDP2 (its own model;
ours is freed first). Our model is built once and re-planned per run, keeping host copies, so host
memory is pinned once. `--runs` gives an explicit list instead (8x1024:auto+fuse,...), run in that
order. A strategy's suffixes: +fuse compiles the glue between the matmuls (flux2.fuse, what
train.py --compile does); +recompute makes checkpointed blocks recompute everything (plain
checkpointing; by default the planner lets them keep their MLP and attention outputs when memory
allows, planner.plan); +refN appends N reference images of the run's side to every sample, as an
edit LoRA trains (the loss covers the target's tokens; the FLOPs count the references' too).
Whole blocks compile only for a forward (--forward-only --compile): in training, compiled blocks
under the streamer are not safe (bench/RESULTS.md §6). results.json and results.md are rewritten
after every run, so a run cut off by a time limit keeps what it measured.
"""
import os

# set before torch is imported: fewer fragments; huge pages make big host tensors faster to pin
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import json
import re
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

import flux2
import lora
import models
import offload
import planner
import weights
from util import GiB, HelpFormatter, free_cuda

HEADLINE = [(8, 1024, "auto"), (8, 1024, "stream"), (1, 1024, "resident")]
OURS = {"resident": "checkpoint", "stream": "stream", "auto": "auto", "fsdp2": "fsdp2"}


# --------------------------------------------------------------------------------------------------
# Measurements

def tokens(side: int, txt_len: int, refs: int = 0) -> int:
    """Tokens per sample: the image's (side/16)² patches, as many for each reference image of the
    same side (an edit LoRA's), and the text's."""
    return (1 + refs) * (side // 16) ** 2 + txt_len


def references(strategy: str) -> int:
    """The reference images per sample a run's strategy names: '+ref2' -> 2, none -> 0."""
    return sum(int(s[3:]) for s in strategy.split("+")[1:] if s.startswith("ref"))


def flops(cfg: flux2.Flux2Config, batch: int, side: int, txt_len: int,
          refs: int = 0) -> tuple[float, float]:
    """(model work, executed work) of one training step: flux2.train_step_flops, and 1.5x that for
    what the GPU executes with full recompute (6·N·T + 4.5·A); see the module docstring. Reference
    tokens cost what image tokens cost: they pass every block forward and backward."""
    work = flux2.train_step_flops(cfg, batch, (1 + refs) * (side // 16) ** 2, txt_len)
    return work, 1.5 * work


def host_gib() -> tuple[float, float]:
    """(resident set, its peak) of this process in GiB."""
    kb = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            kb[line[:5]] = int(line.split()[1])
    return kb.get("VmRSS", 0) / 2**20, kb.get("VmHWM", 0) / 2**20


def sync(device: torch.device):
    """Wait for the GPU, so a wall-clock time covers the work queued before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device):
    """Free what the last run dropped and restart the peak-memory count."""
    sync(device)
    free_cuda()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def gpu_gib(device: torch.device) -> dict:
    """Peak allocated and reserved GPU memory since the last free_memory, in GiB."""
    if device.type != "cuda":
        return {}
    return {"peak_gpu_gib": torch.cuda.max_memory_allocated(device) / GiB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GiB}


def make_inputs(cfg: flux2.Flux2Config, batch: int, side: int, txt_len: int, device, dtype,
                seed: int = 0, refs: int = 0):
    """(model inputs, flow-matching-like target), random; `refs` reference images of the same side
    follow the target's tokens with time ids 10, 20, ... (the target covers the target's tokens)."""
    g = torch.Generator(device).manual_seed(seed)
    h = side // 16
    img = torch.randn(batch, (1 + refs) * h * h, cfg.in_channels, generator=g, device=device,
                      dtype=dtype)                                  # [B, (1 + refs) h², 128]
    txt = torch.randn(batch, txt_len, cfg.context_in_dim, generator=g, device=device, dtype=dtype)
    img_ids = torch.cat([flux2.image_ids(h, h, t=10 * r) for r in range(1 + refs)])
    img_ids = img_ids.to(device)[None].expand(batch, -1, -1)
    txt_ids = flux2.text_ids(txt_len).to(device)[None].expand(batch, -1, -1)
    t = torch.rand(batch, generator=g, device=device)
    guidance = torch.full((batch,), 4.0, device=device) if cfg.use_guidance_embed else None
    target = torch.randn(batch, h * h, cfg.in_channels, generator=g, device=device, dtype=dtype)
    return (img, img_ids, txt, txt_ids, t, guidance), target


def train_step(forward, params: list, target: torch.Tensor, device: torch.device):
    """One LoRA training step (MSE to the target over the target's tokens, fused AdamW on the GPU)
    as a closure returning the loss."""
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")

    def step():
        loss = F.mse_loss(forward()[:, :target.shape[1]].float(), target.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def timed_steps(step, warmup: int, steps: int, deadline: float, device: torch.device, label: str,
                counter=lambda: 0) -> dict:
    """Run warm-up then timed steps, stopping early when the next step would pass the deadline;
    `counted` is what `counter` advanced over the timed steps."""
    times, losses, last, mark = [], [], 0.0, counter()
    for i in range(warmup + steps):
        if i and time.time() + last > deadline:
            return {"steps_s": times, "losses": losses, "counted": counter() - mark,
                    "cut": f"after {i} steps"}
        if i == warmup:
            mark = counter()
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        last = time.perf_counter() - t0
        losses.append(float(loss))
        if i >= warmup:
            times.append(last)
        print(f"  {label} step {i + 1}/{warmup + steps}: {last:.3f} s, loss {float(loss):.4f}",
              flush=True)
    return {"steps_s": times, "losses": losses, "counted": counter() - mark}


def summarise(r: dict, cfg, args, device):
    """Add s/step, samples/s, MFU/HFU and memory to a run record that ran (or ran out of memory)."""
    if r.get("steps_s"):
        s = sum(r["steps_s"]) / len(r["steps_s"])
        model_f, exec_f = flops(cfg, r["batch"], r["side"], args.txt_len, r.get("refs", 0))
        r.update(s_per_step=s, samples_per_s=r["batch"] / s)
        if args.peak_tflops:
            peak = args.peak_tflops * 1e12
            r.update(mfu=model_f / s / peak, hfu=exec_f / s / peak)
    if "losses" in r or r["status"] == "OOM":
        r.update(gpu_gib(device))
        r["host_rss_gib"], r["host_peak_rss_gib"] = host_gib()


# --------------------------------------------------------------------------------------------------
# The models under test

class Ours:
    """Our DiT with paper LoRA (models.py: the preset's random model, or the tiny one), built on
    meta once and re-planned for every run; host copies are kept, so host memory is pinned once."""

    def __init__(self, args, device, with_lora: bool = True):
        self.args, self.device, self.cfg = args, device, flux2.PRESETS[args.preset]
        name = next((n for n, (dit, _) in models.RANDOM_MODELS.items() if dit == args.preset),
                    args.preset)                             # "tiny" for the dry run
        self.source = models.ModelSource(name, None, device, args.dtype)
        self.model = self.source.build_dit()
        self.lora = lora.inject(self.model, "paper", rank=args.rank) if with_lora else []
        self.filled = False

    def plan(self, strategy: str, batch: int, side: int, train: bool = True,
             selective: bool = True, refs: int = 0) -> planner.Plan:
        """What offload.prepare would do for this run, without doing it."""
        return offload.plan_for(self.model, self.model.blocks,
                                strategy=OURS.get(strategy, strategy), device=self.device,
                                batch_size=batch,
                                tokens_per_sample=tokens(side, self.args.txt_len, refs),
                                train=train,
                                gpu_memory_limit=self.args.gpu_memory_limit, selective=selective)

    def prepare(self, strategy: str, batch: int, side: int, compile: bool = False,
                train: bool = True, selective: bool = True, refs: int = 0) -> planner.Plan:
        """Place the model for this run (re-planned, keeping host copies, except for FSDP2, which
        shards it); the first placement also writes the random values."""
        plan = offload.prepare(self.model, self.model.blocks, strategy=OURS.get(strategy, strategy),
                               device=self.device, batch_size=batch,
                               tokens_per_sample=tokens(side, self.args.txt_len, refs),
                               train=train, gpu_memory_limit=self.args.gpu_memory_limit,
                               compile=compile,
                               keep_host_copy=strategy != "fsdp2", selective=selective)
        if not self.filled:
            self.source.fill_dit(self.model)
            self.filled = True
        return plan

    def step_fn(self, batch: int, side: int, refs: int = 0):
        """One training step on random inputs, as a closure."""
        x, target = make_inputs(self.cfg, batch, side, self.args.txt_len, self.device,
                                self.args.dtype, refs=refs)
        return train_step(lambda: self.model(*x), self.lora, target, self.device)

    def free(self):
        """Give back the model's GPU and pinned host memory."""
        offload.release(self.model)
        self.model = self.lora = None


def diffusers_lora_targets(model: torch.nn.Module) -> list[str]:
    """The diffusers linears whose BFL counterpart (weights.bfl_module) our "paper" preset adapts:
    both streams' q, k, v and output projections, and the single blocks' two linears."""
    paper = lora.PRESETS["paper"]
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and (bfl := weights.bfl_module(name)) is not None and re.fullmatch(paper, bfl[0])]


class Diffusers:
    """diffusers' Flux2Transformer2DModel, resident, PEFT LoRA on the same attention layers as ours
    (single blocks: the whole fused qkv+mlp input linear, which PEFT cannot slice), fp32 adapters,
    gradient checkpointing."""

    def __init__(self, args, device):
        from diffusers import Flux2Transformer2DModel
        from peft import LoraConfig
        c = flux2.PRESETS[args.preset]
        self.args, self.device, self.cfg = args, device, c
        with torch.device("meta"):
            model = Flux2Transformer2DModel(
                in_channels=c.in_channels, num_layers=c.depth,
                num_single_layers=c.depth_single_blocks,
                attention_head_dim=c.hidden_size // c.num_heads, num_attention_heads=c.num_heads,
                joint_attention_dim=c.context_in_dim, mlp_ratio=c.mlp_ratio,
                axes_dims_rope=tuple(c.axes_dim), rope_theta=c.theta,
                guidance_embeds=c.use_guidance_embed).to(args.dtype)      # bf16 before allocating
        model = model.to_empty(device=device).requires_grad_(False)
        models.fill_random(model, device)
        model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank,
                                     target_modules=diffusers_lora_targets(model)))
        self.lora = [p for p in model.parameters() if p.requires_grad]
        for p in self.lora:
            p.data = p.data.float()
        model.enable_gradient_checkpointing()
        self.model = model

    def free(self):
        """Drop the model (free_memory then gives its GPU memory back)."""
        self.model = self.lora = None

    def step_fn(self, batch: int, side: int, refs: int = 0):
        """One training step on the same random inputs as ours, as a closure."""
        (img, img_ids, txt, txt_ids, t, guidance), target = make_inputs(
            self.cfg, batch, side, self.args.txt_len, self.device, self.args.dtype, refs=refs)
        forward = lambda: self.model(hidden_states=img, encoder_hidden_states=txt,  # noqa: E731
                                     timestep=t, img_ids=img_ids, txt_ids=txt_ids,
                                     guidance=guidance, return_dict=False)[0]
        return train_step(forward, self.lora, target, self.device)


# --------------------------------------------------------------------------------------------------
# The run list, the time estimate, the report

def parse_configs(text: str) -> list[tuple[int, int]]:
    """--configs 8x1024,1x512 -> [(8, 1024), (1, 512)]: batch and side in pixels."""
    out = []
    for c in text.split(","):
        try:
            b, s = c.lower().split("x")
            out.append((int(b), int(s)))
        except ValueError:
            raise SystemExit(f"bench.py: --configs entry {c!r} should look like 8x1024 "
                             f"(batch x side in pixels)")
    return out


def parse_runs(text: str) -> list[tuple[int, int, str]]:
    """--runs 8x1024:auto+fuse,1x512:diffusers -> [(8, 1024, 'auto+fuse'), (1, 512, 'diffusers')],
    run in that order."""
    out = []
    for r in text.split(","):
        config, _, strategy = r.partition(":")
        if not strategy:
            raise SystemExit(f"bench.py: --runs entry {r!r} should look like 8x1024:auto+fuse")
        out.append((*parse_configs(config)[0], strategy))
    return out


def schedule(configs, strategies, diffusers: bool) -> list[tuple[int, int, str]]:
    """Diffusers first (so the two models never share the GPU), then ours: the headline runs, the
    other eager runs, the fused runs (compile time is the least predictable), FSDP2 last (its own
    model); else as listed."""
    runs = [(b, s, k) for b, s in configs for k in strategies]
    runs.sort(key=lambda r: (r[2].startswith("fsdp2"), "+fuse" in r[2],
                             HEADLINE.index(r) if r in HEADLINE else len(HEADLINE)))
    base = [(b, s, "diffusers") for b, s in sorted(configs, key=lambda c: (c != (1, 1024), c))
            if b <= 2]
    return (base if diffusers else []) + runs


def estimate_s(plan: planner.Plan | None, work: float, steps: int, args, pin_bytes: int,
               pin_rate: float) -> float:
    """Rough seconds for a run: compute at half the peak, H2D at 45 GB/s (overlapped except under
    FSDP2), pinning."""
    compute = work / (0.5 * (args.peak_tflops or 400) * 1e12)
    h2d = plan.h2d_bytes_per_step / 45e9 if plan else 0.0
    per = compute + h2d if plan and plan.strategy == "fsdp2" else max(compute, h2d)
    return 10 + steps * per + pin_bytes / pin_rate


def write_report(out: Path, meta: dict, results: list[dict]):
    """results.json and results.md (rewritten after every run, so a cut-off run keeps what it
    measured); returns the table."""
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1))
    f = lambda v, fmt: "" if v is None else format(v, fmt)                     # noqa: E731
    rows = ["| config | strategy | s/step | samples/s | MFU | HFU | peak GPU GiB "
            "| pinned GiB (plan / process) | host RSS GiB "
            "| H2D GiB/step (plan / measured) | status |", "|" + "---|" * 11]
    for r in results:
        h2d = "" if r.get("h2d_plan_gib") is None else \
            f"{r['h2d_plan_gib']:.1f} / {f(r.get('h2d_measured_gib'), '.1f') or '-'}"
        rows.append(f"| {r['batch']}x{r['side']} | {r['strategy']} "
                    f"| {f(r.get('s_per_step'), '.3f')} | {f(r.get('samples_per_s'), '.2f')} "
                    f"| {f(r.get('mfu'), '.1%')} | {f(r.get('hfu'), '.1%')} "
                    f"| {f(r.get('peak_gpu_gib'), '.1f')} "
                    f"| {f(r.get('pinned_plan_gib'), '.1f')} / {f(r.get('pinned_gib'), '.1f')} "
                    f"| {f(r.get('host_rss_gib'), '.1f')} | {h2d} | {r['status']} |")
    plans = [f"### {r['batch']}x{r['side']} {r['strategy']}\n```\n{r['plan']}\n```"
             for r in results if r.get("plan")]
    head = (f"# bench.py on {meta['device']} (torch {meta['torch']}), {meta['preset']}, "
            f"LoRA r{meta['rank']}\n\n"
            f"`{meta['command']}`\n\n"
            f"MFU = (4·N·T + 3·A) / (s/step · {meta['peak_tflops']} TFLOP/s), "
            f"HFU counts the recompute (6·N·T + 4.5·A); see bench.py. Pinned: what the plan "
            f"streams (a fresh run pins exactly that) / what this process has page-locked (host "
            f"copies are kept across re-plans, so it grows). diffusers: PEFT LoRA r16, on the "
            f"whole fused qkv+mlp linear in single blocks.\n\n")
    (out / "results.md").write_text(head + "\n".join(rows) + "\n\n" + "\n\n".join(plans) + "\n")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------------
# Training runs

class TrainingRuns:
    """The state the runs of one call share: the one model alive (a new family frees the old one
    first, so two full-size models never share the GPU), the deadline, and the host pinning rate
    that estimates how long placing a model takes."""

    def __init__(self, args, device, deadline: float):
        self.args, self.device, self.deadline = args, device, deadline
        self.cfg = flux2.PRESETS[args.preset]
        self.live = {}                   # family ("ours", "fsdp2", "diffusers") -> its model
        self.pin_rate = 1.0 * GiB        # bytes/s; re-measured from the first host copies pinned

    def model_for(self, family: str):
        """The model of `family`, built when it is not the one alive."""
        if family not in self.live:
            for other in list(self.live):
                self.live.pop(other).free()
                free_memory(self.device)
            self.live[family] = Diffusers(self.args, self.device) if family == "diffusers" else \
                Ours(self.args, self.device)
        return self.live[family]

    def timed_steps(self, batch: int) -> int:
        """How many steps are timed after the warm-up (fewer at batch >= 4: they are long)."""
        return self.args.big_batch_steps if batch >= 4 else self.args.steps

    def fits(self, r: dict, plan: planner.Plan | None, pin_bytes: int = 0,
             margin: float = 0.0) -> bool:
        """Whether run `r` would end before the deadline (estimate_s, plus `margin` seconds)."""
        work = flops(self.cfg, r["batch"], r["side"], self.args.txt_len, r["refs"])[1]
        steps = self.args.warmup + self.timed_steps(r["batch"])
        seconds = estimate_s(plan, work, steps, self.args, pin_bytes, self.pin_rate)
        return time.time() + seconds + margin <= self.deadline

    def place(self, r: dict, family: str, kind: str, selective: bool, margin: float):
        """Our model (re-planned) or the FSDP2 one (sharded once) placed for run `r`, or None with
        the reason in r["status"]: the plan does not fit the budget, or the time would not."""
        fresh = family not in self.live
        model = self.model_for(family)
        plan = model.plan(kind, r["batch"], r["side"], selective=selective, refs=r["refs"])
        r["plan"], r["h2d_plan_gib"] = plan.describe(), plan.h2d_bytes_per_step / GiB
        r["pinned_plan_gib"] = sum(plan.block_bytes[i] for i in plan.streamed) / GiB
        if plan.budget_bytes and plan.peak_bytes > 1.05 * plan.budget_bytes:
            r["status"] = (f"skipped: plan needs {plan.peak_bytes / GiB:.1f} > "
                           f"{plan.budget_bytes / GiB:.1f} GiB")
            return None
        have = offload.stats(model.model)["host_copy_bytes"]
        if family == "fsdp2":            # sharding pins every block and the root, once
            to_pin = sum(plan.block_bytes) + plan.root_bytes if fresh else 0
        else:                            # the streamed blocks that have no host copy yet
            to_pin = max(0, sum(plan.block_bytes[i] for i in plan.streamed) - have)
        if not self.fits(r, plan, to_pin, margin):
            r["status"] = "skipped: time budget"
            return None
        t0 = time.time()
        if family == "ours" or fresh:    # FSDP2 shards once; later runs only change the batch
            model.prepare(kind, r["batch"], r["side"], selective=selective, refs=r["refs"])
        r["prepare_s"] = time.time() - t0
        pinned = offload.stats(model.model)["host_copy_bytes"] - have
        if pinned > GiB:
            self.pin_rate = pinned / r["prepare_s"]
            print(f"  new host copies: {pinned / GiB:.1f} GiB pinned in {r['prepare_s']:.1f} s",
                  flush=True)
        return model

    def measure(self, r: dict) -> None:
        """Run `r` into its record: its model placed (or why it is skipped), then warm-up and timed
        steps, with the H2D bytes the streamer moved and the memory it pinned."""
        kind, *suffixes = r["strategy"].split("+")
        fuse = "fuse" in suffixes
        flux2.fuse(fuse)
        family = kind if kind in ("diffusers", "fsdp2") else "ours"
        if family == "diffusers":
            if not self.fits(r, None, margin=20):
                r["status"] = "skipped: time budget"
                return
            t0 = time.time()
            model = self.model_for(family)
            r["prepare_s"] = time.time() - t0
        else:
            model = self.place(r, family, kind, selective="recompute" not in suffixes,
                               margin=60 * fuse)       # compiling the glue: a minute at most
            if model is None:
                return
        free_memory(self.device)
        moved = (lambda: offload.stats(model.model)["moved_bytes"]) if family == "ours" else \
            (lambda: 0)
        r.update(timed_steps(model.step_fn(r["batch"], r["side"], r["refs"]), self.args.warmup,
                             self.timed_steps(r["batch"]), self.deadline, self.device,
                             f"{r['batch']}x{r['side']} {r['strategy']}", moved))
        if family == "ours" and r["steps_s"]:
            r["h2d_measured_gib"] = r["counted"] / GiB / len(r["steps_s"])
        if family != "diffusers":
            r["pinned_gib"] = offload.stats(model.model)["pinned_bytes"] / GiB
        if r.pop("cut", None) and not r["steps_s"]:
            r["status"] = "cut: time budget"

    def free(self):
        """Free the model alive, if any."""
        for model in self.live.values():
            model.free()
        self.live.clear()


def training_runs(args) -> list[tuple[int, int, str]]:
    """The runs of this call: --runs as given, else --configs x --strategies in schedule's order."""
    runs = parse_runs(args.runs) if args.runs else \
        schedule(parse_configs(args.configs), args.strategies.split(","), args.diffusers_baseline)
    if args.compile or any("+compile" in k for _, _, k in runs):
        raise SystemExit("bench.py: whole-block compile is for --forward-only; training runs "
                         "compile the glue (+fuse), as train.py --compile does "
                         "(bench/RESULTS.md §6)")
    return runs


def run_training(args, device, out: Path, meta: dict, t_start: float):
    """Every scheduled run; each records its numbers or why it has none. One model is alive at a
    time."""
    runs = training_runs(args)
    print(f"{len(runs)} runs: " + ", ".join(f"{b}x{s}:{k}" for b, s, k in runs), flush=True)
    bench = TrainingRuns(args, device, deadline=t_start + args.time_budget)
    results = []
    for b, side, strategy in runs:
        refs = references(strategy)
        r = {"batch": b, "side": side, "strategy": strategy, "refs": refs,
             "tokens_per_sample": tokens(side, args.txt_len, refs), "status": "ok"}
        results.append(r)
        elapsed = time.time() - t_start
        print(f"\n=== {b}x{side} {strategy} ({elapsed:.0f} s elapsed) ===", flush=True)
        try:
            bench.measure(r)
        except torch.OutOfMemoryError:
            r["status"] = "OOM"
        except planner.PlanError as e:
            r["status"] = f"does not fit: {e}"
        except Exception as e:              # a benchmark keeps going: record the error, free, next
            traceback.print_exc()
            r["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
        finally:
            for model in bench.live.values():
                for p in model.lora or []:
                    p.grad = None
            summarise(r, bench.cfg, args, device)
            free_memory(device)
            print(write_report(out, meta, results), flush=True)
    bench.free()
    return results


# --------------------------------------------------------------------------------------------------
# One forward

def run_forward(args, device, out: Path, meta: dict):
    """One resident forward per config without autograd: seconds, TFLOP/s, MFU, peak memory."""
    ours, results = Ours(args, device, with_lora=False), []
    for b, side in parse_configs(args.configs):
        r = {"batch": b, "side": side, "strategy": "forward (no grad)", "status": "ok"}
        results.append(r)
        try:
            plan = ours.prepare("auto", b, side, args.compile, train=False)
            r["plan"] = plan.describe()
            x, _ = make_inputs(ours.cfg, b, side, args.txt_len, device, args.dtype)
            free_memory(device)
            with torch.no_grad():
                r.update(timed_steps(lambda: ours.model(*x).float().mean(), args.warmup,
                                     args.steps, float("inf"), device, f"forward {b}x{side}"))
            s = sum(r["steps_s"]) / len(r["steps_s"])
            model_f = flops(ours.cfg, b, side, args.txt_len)[0] / 2    # forward: half the work
            r.update(s_per_step=s, samples_per_s=b / s, tflops_per_s=model_f / s / 1e12)
            if args.peak_tflops:
                r["mfu"] = model_f / s / (args.peak_tflops * 1e12)
        except torch.OutOfMemoryError:
            r["status"] = "OOM"
        r.update(gpu_gib(device))
        r["host_rss_gib"], r["host_peak_rss_gib"] = host_gib()
        (out / "forward.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1))
        print(json.dumps({k: v for k, v in r.items() if k != "plan"}), flush=True)
    rows = ["| config | s/forward | TFLOP/s | MFU | peak GPU GiB | status |",
            "|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['batch']}x{r['side']} | {r.get('s_per_step', 0):.3f} "
                    f"| {r.get('tflops_per_s', 0):.0f} | {r.get('mfu', 0):.1%} "
                    f"| {r.get('peak_gpu_gib', 0):.1f} | {r['status']} |")
    (out / "forward.md").write_text(f"# forward, {meta['device']}, torch {meta['torch']}\n\n"
                                    + "\n".join(rows) + "\n")
    print("\n".join(rows), flush=True)


# --------------------------------------------------------------------------------------------------
# Command line

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--configs", default=None,
                   help="batch x side in pixels, comma-separated (default 8x1024,1x1024,1x512,"
                        "2x1024; forward-only 1x1024,1x512)")
    p.add_argument("--strategies", default="auto,stream,resident,auto+fuse,fsdp2",
                   help="resident | stream | auto | fsdp2, each optionally +fuse (flux2.fuse: "
                        "compiled elementwise glue), +recompute (checkpointed blocks keep no "
                        "MLP or attention outputs) and +refN (N reference images of the same "
                        "side per sample, as an edit LoRA trains)")
    p.add_argument("--runs", default=None,
                   help="explicit runs in this order, BxSIDE:STRATEGY comma-separated "
                        "(8x1024:auto+fuse,1x512:diffusers); replaces --configs x --strategies")
    p.add_argument("--diffusers-baseline", action="store_true",
                   help="also diffusers + PEFT, resident, batch <= 2")
    p.add_argument("--forward-only", action="store_true",
                   help="instead of training: one resident forward per config without autograd "
                        "(seconds, TFLOP/s, peak memory)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after warm-up (batch < 4)")
    p.add_argument("--big-batch-steps", type=int, default=2, help="timed steps at batch >= 4")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    p.add_argument("--time-budget", type=float, default=530,
                   help="seconds; runs that would not fit are skipped")
    p.add_argument("--compile", action="store_true",
                   help="with --forward-only: torch.compile whole blocks")
    p.add_argument("--gpu-memory-limit", type=float, default=None,
                   help="GiB the planner may use, also enforced as an allocator cap "
                        "(default: free)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="bf16 peak for MFU (default: by card name)")
    p.add_argument("--preset", default="dev", choices=sorted(flux2.PRESETS), help="DiT size")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (paper targets)")
    p.add_argument("--txt-len", type=int, default=512, help="text tokens per sample")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run")
    p.add_argument("--out", required=True, type=Path, help="folder for results.json and results.md")
    return p


def main(argv=None):
    """CLI entry point: the training runs, or --forward-only; results under --out."""
    args = _parser().parse_args(argv)
    args.dtype = torch.bfloat16
    args.configs = args.configs or ("1x1024,1x512" if args.forward_only else
                                    "8x1024,1x1024,1x512,2x1024")
    t_start = time.time()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.py: no CUDA device here; for a dry run pass --device cpu "
                         "--preset tiny")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    args.peak_tflops = args.peak_tflops or next(
        (v / 1e12 for k, v in flux2.PEAK_BF16_FLOPS.items() if k in name), None)
    wanted = args.runs or args.strategies
    if "compile" in wanted or "fuse" in wanted or args.compile:
        torch._dynamo.config.cache_size_limit = 64    # two block classes x shapes x block 0's input
    offload.cap_gpu_memory(device, args.gpu_memory_limit)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": name, "torch": torch.__version__, "preset": args.preset, "rank": args.rank,
            "peak_tflops": args.peak_tflops,
            "command": "python bench.py " + " ".join(argv or sys.argv[1:]),
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    print(json.dumps(meta), flush=True)
    try:
        if args.forward_only:
            run_forward(args, device, args.out, meta)
        else:
            run_training(args, device, args.out, meta, t_start)
    finally:
        offload.leave_process_group()
    print(f"done in {time.time() - t_start:.0f} s; results in {args.out}", flush=True)


if __name__ == "__main__":
    main()
