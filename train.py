"""LoRA fine-tuning of FLUX.2 [dev] by flow matching: the training loop (its flags are in
train_flags.py).

Follows docs/flux2_reference.md §8 (x_t = (1 - t)·x0 + t·eps, target eps - x0, t in [0, 1] fed to
the model, constant guidance), §7.1 (the sampler's resolution-dependent shift, reused to draw
training timesteps) and §4 (position ids), and the report (docs/paper.md): AdamW at a constant lr,
rank-16 LoRA on the attention projections, gradient checkpointing before every block, bf16 autocast,
previews and checkpoints on a schedule.

    python train.py --data DIR --model-dir FLUX.2-dev/ --rank 16        # the real model, one GPU
    python train.py --data examples/toy --model tiny --steps 50          # random tiny model, CPU
    python train.py --data DIR --model-dir FLUX.2-klein-base-4B/         # klein: CFG previews
    torchrun --nproc_per_node 8 train.py --data DIR --model-dir FLUX.2-dev/ --batch-size 16

FLUX.2 [klein] snapshots work the same way (Qwen3 text features, no guidance embedder). Train on the
klein base models; a step-distilled klein gets a warning (fine-tuning undoes the 4-step
distillation).

A run goes through four phases, each a function below: the resume state (the newest checkpoint,
checked against the flags), caching (VAE latents and text features on disk, so neither encoder
shares the GPU with the DiT), building (the DiT with adapters, placed by offload.py, and AdamW) and
the loop.

Under torchrun the frozen DiT is sharded over the ranks with FSDP2 (offload.py) and the run is data
parallel: the global batch is split over the ranks, t and noise are drawn for the whole global batch
from the same seeded stream on every rank, and the LoRA gradients are summed, so N ranks train what
one process would with the same batch. Rank 0 writes every file; checkpoints hold only global state,
so a run resumes on any number of ranks.
"""
import argparse
import json
import os
import random
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

import data
import flux2
import lora
import models
import offload
import planner
import sample
import util
from flux2 import image_ids, pack, text_ids
from train_flags import build_parser, parse_args
from util import LoadError

KEEP_CHECKPOINTS = 3
# Flags that define the state being resumed (a different value cannot continue it) ...
STRUCTURAL = ("data", "model", "model_dir", "rank", "alpha", "lora_targets", "resolution",
              "buckets", "repeats", "batch_size", "seed", "default_caption", "control_dir",
              "control_resolution", "caption_dropout")
# ... and flags that may change on resume (e.g. a lower --lr after a NaN), at the price of a
# different run.
TUNABLE = ("lr", "weight_decay", "timestep_sampling", "guidance", "grad_accum", "sample_steps")


# --------------------------------------------------------------------------------------------------
# Flow matching (reference §8)

def sample_timesteps(n: int, how: str, mu: float, generator: torch.Generator) -> torch.Tensor:
    """n training times in [0, 1] (1 = pure noise): 'shift' (uniform u, shifted like the
    sampler), 'logit-normal' (sigmoid of N(0, 1), shifted) or 'uniform' (unshifted, as the
    diffusers trainer)."""
    if how == "logit-normal":
        u = torch.sigmoid(torch.randn(n, generator=generator))
    else:
        u = torch.rand(n, generator=generator)
    return u if how == "uniform" else flux2.time_shift(u, mu)


def micro_batch_loss(model, batch: dict, generator: torch.Generator, *, device: torch.device,
                     guidance: float | None, timestep_sampling: str, sample_steps: int,
                     caption_dropout: float = 0.0,
                     empty_txt: torch.Tensor | None = None) -> torch.Tensor:
    """Draw t and noise for a cached batch from `generator` (on the CPU, so a seed means the same
    run on any device) and return its flow-matching loss, under bf16 autocast on CUDA;
    `sample_steps` picks the shift's mu as the sampler does. With caption_dropout P > 0, each row
    trains on the empty prompt's features `empty_txt` [1, 512, ctx] with probability P.

    When the batch holds only this rank's rows of the global batch (data.Loader), t, noise and the
    dropout draws are still drawn for the whole global batch, so every rank consumes the
    generator as one process does, and the loss is this rank's share of the global mean."""
    x0 = batch["latents"].to(device)                                    # [m, 128, h, w]
    txt = batch["ctx"].to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    index, total = batch["index"], batch["total"]       # the rows' places in the global batch
    mu = flux2.empirical_mu(x0.shape[2] * x0.shape[3], sample_steps)    # the sampler's shift
    t = sample_timesteps(total, timestep_sampling, mu, generator)       # [total]
    noise = torch.randn((total, *x0.shape[1:]), generator=generator)    # [total, 128, h, w]
    rows = index.clamp(max=total - 1)                   # padding rows repeat the last draw
    if caption_dropout > 0:             # drawn last: P = 0 draws nothing, so old runs stay exact
        drop = torch.rand(total, generator=generator)[rows] < caption_dropout          # [m]
        txt = torch.where(drop.view(-1, 1, 1).to(device), empty_txt.to(txt), txt)
    refs = [r.to(device) for r in batch.get("refs", [])]    # one [m, 128, h_r, w_r] per slot
    weight = None if torch.equal(index, torch.arange(total)) else (index < total).float() / total
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return flow_matching_loss(model, x0, txt, t[rows].to(device), noise[rows].to(device),
                                  guidance, weight, refs=refs)


def flow_matching_loss(model, x0: torch.Tensor, txt: torch.Tensor, t: torch.Tensor,
                       noise: torch.Tensor, guidance: float | None,
                       weight: torch.Tensor | None = None,
                       refs: list[torch.Tensor] = ()) -> torch.Tensor:
    """MSE between the predicted velocity and eps - x0 at x_t = (1 - t)·x0 + t·eps.
    x0, noise [B, 128, h, w] latents; txt [B, 512, ctx]; t [B] -> scalar (float32): the mean over
    the batch, or with `weight` [B] the weighted sum of the rows' means (a rank's share).
    Reference latents refs[r] [B, 128, h_r, w_r] join as clean tokens after the target with time
    id 10 (r + 1), as at sampling (reference §7.3); the loss covers the target tokens only."""
    B, _, h, w = x0.shape
    tb = t.view(B, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * noise
    dtype = txt.dtype               # bf16 on CUDA: t is quantized in the embedding as at sampling
    g = None if guidance is None else torch.full((B,), guidance, device=x0.device)
    img, ids = pack(x_t).to(dtype), image_ids(h, w)[None]               # [B, L, 128], [1, L, 4]
    for r, ref in enumerate(refs):
        img = torch.cat([img, pack(ref).to(dtype)], dim=1)              # [B, L + L_ref, 128]
        ids = torch.cat([ids, image_ids(*ref.shape[-2:], t=10 * (r + 1))[None]], dim=1)
    pred = model(img, ids.to(x0.device), txt, text_ids(txt.shape[1])[None].to(x0.device),
                 t.to(x0.device), g)[:, :h * w]                         # [B, h*w, 128]: target
    if weight is None:
        return F.mse_loss(pred.float(), pack(noise - x0).float())
    per_row = (pred.float() - pack(noise - x0).float()).square().mean(dim=(1, 2))    # [B]
    return (per_row * weight.to(per_row.device)).sum()


# --------------------------------------------------------------------------------------------------
# State that makes a resume exact: LoRA weights, optimizer, RNGs, data position

def trainable(model) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters by name, in a fixed order (the optimizer indexes them by position)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def rng_state(generator: torch.Generator) -> dict:
    """Every random stream the run draws from."""
    np_state = np.random.get_state()
    return {"train": generator.get_state(), "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    """Restore what rng_state() captured."""
    generator.set_state(state["train"])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in out/checkpoints, oldest first (an interrupted save's temp file
    never matches)."""
    return sorted((out / "checkpoints").glob("step-*.pt"))


def checkpoint_path(out: Path, step: int) -> Path:
    """Where the checkpoint of the state after `step` steps lives."""
    return out / "checkpoints" / f"step-{step:06d}.pt"


def save_checkpoint(out: Path, step: int, model, optimizer, boundary: dict, args, *,
                    dataset: str = "", rotate: bool = True) -> Path | None:
    """Write out/checkpoints/step-N.pt atomically and, with `rotate`, keep the newest
    KEEP_CHECKPOINTS. Adapters holding NaN or inf are never written: returns None then."""
    lora_state = {n: p.detach().cpu() for n, p in trainable(model).items()}
    if not all(torch.isfinite(t).all() for t in lora_state.values()):
        return None
    state = {"step": step, "lora": lora_state, "optimizer": optimizer.state_dict(), **boundary,
             "args": vars(args), "dataset": dataset}
    path = checkpoint_path(out, step)

    def write(tmp):
        with open(tmp, "wb") as f:      # a file object: a full disk raises OSError(ENOSPC)
            torch.save(state, f)

    util.atomic_write(path, write)
    for old in checkpoints(out)[:-KEEP_CHECKPOINTS] if rotate else []:
        old.unlink()
    return path


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by save_checkpoint; LoadError when it is unreadable or its adapters
    are not finite."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's own advice (weights_only=False) would run code from a file that is no checkpoint
        reason = "not a checkpoint" if "Weights only" in str(e) else str(e).splitlines()[0]
        raise LoadError(f"{path}: unreadable checkpoint ({reason}); delete it to resume from the "
                        f"one before") from None
    if not all(torch.isfinite(t).all() for t in saved["lora"].values()):
        raise LoadError(f"{path}: the adapters hold NaN or inf; delete it to resume from the one "
                        f"before")
    return saved


def check_resume(saved: dict, args) -> None:
    """Refuse to resume with flags that change what is being resumed; warn about changed
    hyper-parameters (they make a different run). A flag the checkpoint predates had its default
    then."""
    def norm(key, v):
        return str(Path(v).resolve()) if key in ("data", "model_dir", "control_dir") and v else v

    defaults = build_parser()
    for key in STRUCTURAL + TUNABLE:
        old = saved[key] if key in saved else defaults.get_default(key)
        old, new = norm(key, old), norm(key, getattr(args, key))
        if old == new:
            continue
        flag = "--" + key.replace("_", "-")
        if key in STRUCTURAL:
            raise LoadError(f"--resume: {flag} is {new!r} but the checkpoint was trained with "
                            f"{old!r}; pass the same value or another --out")
        util.print0(f"warning: resuming with {flag} {new!r} (was {old!r}): not the run an "
                    f"uninterrupted one would give", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# What a person watches: log lines, a loss curve, preview grids

def mfu(cfg, l_img: int, samples_per_s: float, device) -> float | None:
    """Model FLOPs utilisation (flux2.train_step_flops, the same count as bench.py) over the card's
    measured bf16 matmul rate, or None on a CPU or an unknown card."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in flux2.PEAK_BF16_FLOPS.items() if k in name), None)
    if peak is None:
        return None
    return flux2.train_step_flops(cfg, 1, l_img, data.TEXT_LENGTH) * samples_per_s / peak


def read_log(out: Path) -> list[dict]:
    """The per-step records of out/log.jsonl."""
    file = out / "log.jsonl"
    if not file.is_file():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def draw_loss_curve(records: list[dict], path: Path, size=(800, 400)) -> None:
    """Loss per step (grey) and its moving average (blue), drawn with PIL."""
    W, H, pad = *size, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    steps, losses = [r["step"] for r in records], [r["loss"] for r in records]
    if len(losses) >= 2:
        ema, smooth = losses[0], []
        for v in losses:
            ema = 0.9 * ema + 0.1 * v
            smooth.append(ema)
        lo, hi = min(losses), max(losses)
        hi = hi if hi > lo else lo + 1e-12

        def xy(s, v):
            return (pad + (W - 2 * pad) * (s - steps[0]) / max(steps[-1] - steps[0], 1),
                    H - pad - (H - 2 * pad) * (v - lo) / (hi - lo))

        d.line([xy(s, v) for s, v in zip(steps, losses)], fill=(190, 190, 190))
        d.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(30, 90, 200), width=2)
        d.text((5, pad - 5), f"{hi:.4g}", fill="black")
        d.text((5, H - pad - 5), f"{lo:.4g}", fill="black")
        d.text((pad, H - pad + 10), f"step {steps[0]}", fill="black")
        d.text((W - pad - 60, H - pad + 10), f"step {steps[-1]}", fill="black")
    d.rectangle([pad, pad, W - pad, H - pad], outline="black")
    d.text((pad, 10), "training loss (grey) and moving average (blue)", fill="black")
    util.atomic_write(path, lambda f: img.save(f, format="PNG"))


def preview_grid(images: list[Image.Image], prompts: list[str], step: int,
                 refs: list[list[Image.Image]] | None = None) -> Image.Image:
    """Images side by side, each captioned with its prompt, under a 'step N' title; with `refs`
    (an edit run) each image's references as thumbnails in a strip to its right."""
    w, h = images[0].size
    thumb = w // 4 if refs and any(refs) else 0
    w += thumb                                          # w: a column, the image and its strip
    label = 44
    grid = Image.new("RGB", (w * len(images), h + label + 20), "white")
    d = ImageDraw.Draw(grid)
    d.text((4, 4), f"step {step}", fill="black")
    for i, (im, p) in enumerate(zip(images, prompts)):
        grid.paste(im, (i * w, 20))
        for k, ref in enumerate(refs[i][:h // thumb] if thumb else []):
            grid.paste(ImageOps.contain(ref.convert("RGB"), (thumb, thumb)),
                       (i * w + w - thumb, 20 + k * thumb))
        chars = max(w // 6, 8)                          # the default bitmap font is ~6 px wide
        caption = "\n".join(textwrap.wrap(p, chars)[:3])     # at word boundaries, 3 lines
        d.multiline_text((i * w + 4, h + 24), caption, fill="black")
    return grid


# --------------------------------------------------------------------------------------------------
# Preview prompts (--sample-prompts)

def read_prompts(path) -> list[str]:
    """Non-empty lines of a prompts file."""
    try:
        lines = util.read_text(path).splitlines()
    except OSError as e:
        raise LoadError(f"--sample-prompts {path}: {e.strerror}; pass a text file with one "
                        f"prompt per line") from None
    return [line.strip() for line in lines if line.strip()]


def read_prompt_refs(path) -> tuple[list[str], list[list[Image.Image]]]:
    """The prompts of a .jsonl prompts file, one {"prompt": ..., "refs": [paths relative to the
    file]} per line, and each prompt's reference images (read now, checked as sampling checks
    them)."""
    prompts, refs = [], []
    for line in read_prompts(path):
        try:
            row = json.loads(line)
            prompt, names = str(row["prompt"]), list(row.get("refs", []))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise LoadError(f"--sample-prompts {path}: {line[:60]!r} is not "
                            f"{{\"prompt\": ..., \"refs\": [...]}}; fix that line") from None
        prompts.append(prompt)
        refs.append([open_reference(Path(path).parent / name) for name in names])
    return prompts, refs


def open_reference(path: Path) -> Image.Image:
    """A preview's reference image, decoded now; LoadError naming it when sampling would refuse
    it."""
    img = sample.open_image(path)
    data.check_ref_size(*img.size, name=str(path))
    return img


# --------------------------------------------------------------------------------------------------
# The run: what its phases hand to the loop

class NonFiniteLoss(RuntimeError):
    """The loss, the gradient or the adapters became NaN or inf; the message names the newest
    good checkpoint."""


@dataclass
class Previews:
    """The same prompts and seeds sampled on a schedule, so what changes between the grids is the
    LoRA."""
    source: models.ModelSource      # its autoencoder decodes the samples
    prompts: list[str]
    txt: torch.Tensor               # [N, 512, ctx] the prompts' cached text features
    uncond: torch.Tensor | None     # [1, 512, ctx] the empty prompt: a klein base's true CFG
    cfg: float | None               # the CFG scale (klein base), or None: guidance-distilled dev
    refs: list[list[Image.Image]]   # each prompt's reference images (empty lists: text-to-image)


@dataclass
class Run:
    """The pieces of one run that the loop, its checkpoints and its previews share: one object
    rather than a dozen arguments, since they all read the same run, and `step`, `records` and
    `boundary` move together."""
    args: argparse.Namespace
    out: Path                       # rank 0 writes every file here
    device: torch.device
    model: flux2.Flux2              # the frozen DiT with trainable adapters, placed by offload
    optimizer: torch.optim.Optimizer
    loader: data.Loader
    generator: torch.Generator      # t and noise: one CPU stream on every rank, saved exactly
    previews: Previews | None       # None with --sample-every 0
    empty_txt: torch.Tensor | None = None   # [1, 512, ctx] the empty prompt: caption dropout
    step: int = 0                   # optimizer steps done
    records: list[dict] = field(default_factory=list)   # log.jsonl's records up to `step`
    boundary: dict = field(default_factory=dict)        # RNG and data position after `step` steps
    dataset: str = ""               # data.fingerprint of the items: checkpoints and LoRA record it

    def mark_boundary(self) -> None:
        """Record the state after `step` full steps: what a checkpoint saves, even mid-step."""
        self.boundary = {"rng": rng_state(self.generator), "loader": self.loader.state_dict()}


def train(args) -> dict:
    """Run (or resume) training as `args` says; returns {"steps", "losses", "out"}. Under torchrun
    every process calls it with the same flags: it joins the process group (one GPU per process)
    and leaves it at the end."""
    world = int(os.environ["WORLD_SIZE"]) if offload.launched() else 1
    if args.batch_size % world:
        raise LoadError(f"--batch-size {args.batch_size} is the global batch and does not split "
                        f"over {world} processes; pass a multiple of {world}")
    device = util.default_device(args.device)
    own_group = not dist.is_initialized()
    if offload.launched():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        offload.init_process_group(device)
    # the cap covers the text encoder and the VAE too, not only the DiT's plan
    offload.cap_gpu_memory(device, args.gpu_memory_limit)
    # running out of memory anywhere in the run ends in one line naming the budget
    memory = offload.OutOfMemoryGuard(gpu_memory_limit=args.gpu_memory_limit,
                                      host_memory_limit=args.host_memory_limit)
    try:
        with memory:
            return _train(args, device, memory)
    finally:
        if own_group:
            offload.leave_process_group()


def _train(args, device: torch.device, memory: offload.OutOfMemoryGuard) -> dict:
    """train() inside the process group: the four phases, the same on every rank; rank 0 writes
    the files. `memory` learns the phase and the plan, for out-of-memory messages."""
    out = Path(args.out)
    cache = Path(args.cache_dir or "~/.cache/flux2-lora").expanduser()
    if util.is_rank0():
        util.check_writable(out, flag="--out")                      # before anything loads
    saved = resume_state(args, out)                                 # None: a fresh run

    source = models.ModelSource(args.model, args.model_dir, device,   # tiny: sample.py's weights
                                gpu_memory_limit=args.gpu_memory_limit)
    cfg = preview_cfg(source, args.model_dir)
    memory.during = "caching latents and text features"
    items, prompts, prompt_refs = cache_features(args, source, cache=cache, cfg=cfg)
    dataset = check_data(args, items, saved)
    check_ranks_agree(items, resumed_step=saved["step"] if saved else -1, cache=cache, out=out)
    rank, world = util.rank_world()
    loader = data.Loader(items, cache_dir=cache, text_id=source.text_id, batch_size=args.batch_size,
                         repeats=args.repeats, seed=args.seed, rank=rank, world=world)

    ref_tokens = max(sum(r.size[0] * r.size[1] // 256 for r in it.refs) for it in items)
    memory.during = "placing the DiT"
    model, plan, optimizer = build_model(args, source, ref_tokens=ref_tokens)
    if util.is_rank0():             # a checkpoint: the adapters and AdamW's two moments
        util.check_free_space(out, flag="--out", needed=3 * sum(
            p.numel() * p.element_size() for p in trainable(model).values()))
    memory.during, memory.plan = "training", plan
    previews = None
    if args.sample_every:
        txt = torch.stack([data.load_text(cache, p, source.text_id) for p in prompts])
        uncond = data.load_text(cache, "", source.text_id)[None] if cfg else None
        previews = Previews(source=source, prompts=prompts, txt=txt, uncond=uncond, cfg=cfg,
                            refs=prompt_refs)
    empty = data.load_text(cache, "", source.text_id)[None] if args.caption_dropout else None
    run = Run(args=args, out=out, device=device, model=model, optimizer=optimizer, loader=loader,
              generator=torch.Generator().manual_seed(args.seed), previews=previews,
              empty_txt=empty, dataset=dataset)
    if saved is not None:
        restore(run, saved)
    run.mark_boundary()
    start_files(run, images=len(items), strategy=plan.strategy)
    if run.step == 0:
        write_preview(run)                  # the baseline every later preview is compared with
    train_loop(run)
    save_progress(run)
    if args.sample_every and run.step % args.sample_every:
        write_preview(run)                  # the final state, whatever the schedule
    if util.is_rank0():
        metadata = {"base_model": args.model, "steps": run.step, "resolution": args.resolution}
        if items[0].refs:                   # sample.py warns when such a LoRA gets no --ref
            metadata["edit"] = "true"
            metadata["references"] = str(max(len(it.refs) for it in items))
        metadata["dataset"] = dataset       # data.fingerprint: which images and captions
        lora.save(model, out / "lora.safetensors", metadata=metadata)
    return {"steps": run.step, "losses": [r["loss"] for r in run.records], "out": out}


# --------------------------------------------------------------------------------------------------
# Phase 1: the resume state

def resume_state(args, out: Path) -> dict | None:
    """The newest checkpoint in out/checkpoints when --resume asks for it (checked against the
    flags), else None; refuses to start over a folder that holds another run's checkpoints."""
    if util.is_rank0():
        for stale in (out / "checkpoints").glob("*.tmp"):      # left by a save that was killed
            stale.unlink()
    found = checkpoints(out)
    if found and not args.resume:
        raise LoadError(f"{out}: holds checkpoints of an earlier run; pass --resume to continue it "
                        f"or another --out")
    if not args.resume:
        return None
    if not found:
        raise LoadError(f"{out}: no checkpoint to resume from (looked in {out / 'checkpoints'})")
    for path in reversed(found):
        try:
            saved = load_checkpoint(path)
            break
        except LoadError as e:
            if path == found[0]:
                raise
            what = str(e).rpartition("; ")[0]           # the cause, without the advice
            util.print0(f"warning: {what}; renamed to {path.name}.bad, resuming from the one "
                        f"before", file=sys.stderr)
            if util.is_rank0():         # out of the way of the run's own save of that step
                path.rename(path.with_name(path.name + ".bad"))
    check_resume(saved["args"], args)
    return saved


# --------------------------------------------------------------------------------------------------
# Phase 2: caching, so the VAE and the text encoder are gone before the DiT arrives

def preview_cfg(source: models.ModelSource, model_dir) -> float | None:
    """The CFG scale previews use: a klein base model's default (it has no guidance embedder), else
    None. Warns about a step-distilled klein, which fine-tuning would undo."""
    klein = None if source.tiny or source.random else models.klein_kind(model_dir)
    if klein == "distilled" and util.is_rank0():
        warnings.warn(f"{model_dir} is a step-distilled FLUX.2 [klein] (4-step sampler): "
                      f"fine-tuning undoes the distillation, and users report washed-out, "
                      f"grey-blotched samples; train on the klein base model "
                      f"(FLUX.2-klein-base-4B / -9B) instead")
    return models.model_defaults(model_dir).get("cfg") if klein else None


def cache_features(args, source: models.ModelSource, *, cache: Path,
                   cfg: float | None) -> tuple[list[data.Item], list[str],
                                               list[list[Image.Image]]]:
    """Encode what the cache lacks: every image's latent (and its references'), every caption's and
    preview prompt's text features (and the empty prompt's for CFG or caption dropout); each rank
    encodes its share. Returns the items, the preview prompts and their reference images."""
    rank, world = util.rank_world()
    previews = preview_prompts(args.sample_prompts) if args.sample_prompts else None
    items = data.cache_latents(args.data, cache_dir=cache, ae_id=source.ae_id,
                               load_ae=source.load_ae, resolution=args.resolution,
                               buckets=args.buckets, default_caption=args.default_caption,
                               device=source.device, rank=rank, world=world,
                               control_dir=args.control_dir,
                               control_resolution=args.control_resolution)
    prompts, refs = previews or default_previews(items)
    empty = [""] * bool(cfg or args.caption_dropout)
    data.cache_texts([it.caption for it in items] + prompts + empty, cache_dir=cache,
                     text_id=source.text_id, load_encoder=source.load_text_encoder,
                     rank=rank, world=world)
    return items, prompts, refs


def preview_prompts(path) -> tuple[list[str], list[list[Image.Image]]]:
    """--sample-prompts: a .jsonl file's prompts with their references, or a text file's lines
    (no references)."""
    if str(path).endswith(".jsonl"):
        return read_prompt_refs(path)
    prompts = read_prompts(path)
    return prompts, [[] for _ in prompts]


def default_previews(items: list[data.Item]) -> tuple[list[str], list[list[Image.Image]]]:
    """The previews without --sample-prompts: the first two distinct captions, or in an edit run
    the first two items' captions with their references."""
    if items[0].refs:
        return ([it.caption for it in items[:2]],
                [[open_reference(r.path) for r in it.refs] for it in items[:2]])
    prompts = list(dict.fromkeys(it.caption for it in items))[:2]
    return prompts, [[] for _ in prompts]


def same_on_all_ranks(values: list[int]) -> bool:
    """Whether every rank passed the same integers (a collective: every rank must call it)."""
    t = torch.tensor(values)                            # CPU: gloo serves it in either backend
    lo, hi = t.clone(), t.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return torch.equal(lo, hi)


def check_data(args, items: list[data.Item], saved: dict | None) -> str:
    """The usable items' data.fingerprint; LoadError when one batch would need more images than
    an epoch holds, a warning when a resumed run's images or captions changed."""
    epoch = len(items) * args.repeats
    if args.batch_size > epoch:
        raise LoadError(f"--batch-size {args.batch_size} is larger than the dataset: "
                        f"{len(items)} usable image(s) x {args.repeats} repeat(s) = {epoch}; "
                        f"pass --batch-size {epoch} or less (or more --repeats)")
    dataset = data.fingerprint(items)
    if saved is not None and saved.get("dataset", dataset) != dataset:
        util.print0(f"warning: --resume: the images or captions in --data {args.data} changed "
                    f"since the checkpoint (dataset {saved['dataset']} -> {dataset}): not the run "
                    f"an uninterrupted one would give", file=sys.stderr)
    return dataset


def check_ranks_agree(items: list[data.Item], *, resumed_step: int, cache: Path,
                      out: Path) -> None:
    """With several ranks, each wrote only its share of the cache and read its own --out: all must
    see the same images and the same checkpoint."""
    if util.rank_world()[1] == 1:
        return
    seen = int(data.fingerprint(items)[:15], 16)                 # images, references, captions
    if not same_on_all_ranks([seen, resumed_step]):
        raise LoadError(f"the ranks see different images in --cache-dir {cache} or checkpoints in "
                        f"--out {out}; on several machines both must be folders every machine "
                        f"sees (a shared filesystem)")


# --------------------------------------------------------------------------------------------------
# Phase 3: building the model and the optimizer, restoring a checkpoint

def build_model(args, source: models.ModelSource, *,
                ref_tokens: int = 0) -> tuple[flux2.Flux2, planner.Plan, torch.optim.AdamW]:
    """The DiT with LoRA adapters, placed by the offload planner (sharded over the ranks when
    there are several; a sample's tokens count its most reference tokens, `ref_tokens`) and
    filled; the glue between the matmuls compiled under --compile; AdamW over the adapters."""
    world = util.rank_world()[1]

    def add_adapters(dit):
        torch.manual_seed(args.seed)                # LoRA A init (the same on every rank)
        lora.inject(dit, targets=args.lora_targets, rank=args.rank, alpha=args.alpha)

    def set_adapters(dit):                          # values for adapters made on meta, drawn as
        torch.manual_seed(args.seed)                # inject draws them on a DiT built with values
        lora.init_adapters(dit)

    l_img = (args.resolution // 16) ** 2
    # previews decode (and encode references) between steps: the plan keeps room for that
    decode = (source.load_ae().decode_bytes(height=args.resolution, width=args.resolution)
              if args.sample_every else 0)
    model, plan = models.placed_dit(
        source, add_adapters=add_adapters, set_adapters=set_adapters,
        strategy="fsdp2" if world > 1 and args.offload == "auto" else args.offload,
        batch_size=args.batch_size // world,
        tokens_per_sample=l_img + ref_tokens + data.TEXT_LENGTH,
        train=True, gpu_memory_limit=args.gpu_memory_limit,
        host_memory_limit=offload.host_budget(args.host_memory_limit), reserve_bytes=decode)
    # the glue between the matmuls; whole blocks stay eager (bench/RESULTS.md §6 says why)
    flux2.fuse(source.device.type == "cuda" if args.compile is None else args.compile)
    params = list(trainable(model).values())
    if world > 1:                                   # replicas start equal, however they were filled
        for p in params:
            dist.broadcast(p.data, src=0)
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=args.weight_decay)
    return model, plan, optimizer


def restore(run: Run, saved: dict) -> None:
    """Continue from a checkpoint: adapters, optimizer moments, RNG streams, data position, step
    and the log up to it. The flags' lr and weight decay win over the saved ones (a lower --lr
    after a NaN)."""
    with torch.no_grad():
        for name, p in trainable(run.model).items():
            p.copy_(saved["lora"][name])
    run.optimizer.load_state_dict(saved["optimizer"])
    for group in run.optimizer.param_groups:
        group.update(lr=run.args.lr, weight_decay=run.args.weight_decay)
    set_rng_state(saved["rng"], run.generator)
    run.loader.load_state_dict(saved["loader"])
    run.step = saved["step"]
    run.records = [r for r in read_log(run.out) if r["step"] <= run.step]


def start_files(run: Run, *, images: int, strategy: str) -> None:
    """Rank 0 (the one writer) starts log.jsonl from the restored records, writes config.json and
    prints what the run trains."""
    if not util.is_rank0():
        return
    args, world = run.args, util.rank_world()[1]
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run.records))
    (run.out / "config.json").write_text(json.dumps(vars(args), indent=1))
    split = f" over {world} processes ({args.batch_size // world} each)" if world > 1 else ""
    print(f"{images} images x {args.repeats} repeats, batch {args.batch_size}{split} x "
          f"{args.grad_accum} accumulated, offload {strategy}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# Phase 4: the loop, and what it writes on its schedules

def train_loop(run: Run) -> None:
    """Optimizer steps up to --steps. Each: forward and backward over --grad-accum micro-batches,
    the LoRA gradients summed over the ranks, clipped to norm 1, an AdamW step; then a log line,
    and on their schedules a checkpoint and a preview. Ctrl-C saves the state after the last
    full step."""
    args, model, optimizer = run.args, run.model, run.optimizer
    params = list(trainable(model).values())
    guidance = args.guidance if model.cfg.use_guidance_embed else None
    rank0 = util.is_rank0()
    bar = tqdm(total=args.steps, initial=run.step, desc="train", dynamic_ncols=True,
               disable=not rank0)
    log = (run.out / "log.jsonl" if rank0 else Path(os.devnull)).open("a")
    try:
        while run.step < args.steps:
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for _ in range(args.grad_accum):
                batch = next(run.loader)
                loss = micro_batch_loss(model, batch, run.generator, device=run.device,
                                        guidance=guidance, sample_steps=args.sample_steps,
                                        timestep_sampling=args.timestep_sampling,
                                        caption_dropout=args.caption_dropout,
                                        empty_txt=run.empty_txt)
                value = global_loss(loss)
                if not torch.isfinite(value):
                    raise stop_on_non_finite(run, f"the loss is {value.item()}")
                (loss / args.grad_accum).backward()
                loss_sum += value.item() / args.grad_accum
            offload.sum_gradients(params)           # LoRA is replicated: reduce before clipping
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            if not torch.isfinite(grad_norm):
                raise stop_on_non_finite(run, f"the gradient norm is {grad_norm.item()}")
            optimizer.step()
            if not all_finite(params):      # e.g. an lr so large that the update overflows
                raise stop_on_non_finite(run, "the optimizer step made the adapters NaN or inf")
            run.step += 1
            run.mark_boundary()
            log_step(run, log, bar, loss=loss_sum, grad_norm=float(grad_norm),
                     seconds=time.perf_counter() - t0, image_tokens=batch["latents"][0, 0].numel())
            if args.save_every and run.step % args.save_every == 0:
                save_progress(run)
            if args.sample_every and run.step % args.sample_every == 0:
                write_preview(run)
    except KeyboardInterrupt:
        save_progress(run)                  # `boundary` is the state after the last full step
        bar.close()
        util.print0(f"\ninterrupted: the state after step {run.step} is saved in "
                    f"{run.out / 'checkpoints'}; continue with --resume", file=sys.stderr)
        raise
    finally:
        log.close()
        bar.close()


def global_loss(loss: torch.Tensor) -> torch.Tensor:
    """The global batch's loss, the ranks' shares summed: every rank sees the same (non-)finite
    value and stops together."""
    value = loss.detach()
    if util.rank_world()[1] > 1:
        dist.all_reduce(value)
    return value


def all_finite(tensors) -> bool:
    """Whether no tensor holds NaN or inf: their total norm is finite (fused kernels, one sync)."""
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(list(tensors))))


def stop_on_non_finite(run: Run, what: str) -> NonFiniteLoss:
    """The error that stops the run at step run.step + 1 because `what` is not finite. While the
    adapters are still finite, rank 0 first saves the state before this step; a step that made
    them NaN leaves the newest checkpoint on disk as the good state. A failed run never rotates
    an older checkpoint away."""
    step = f"step {run.step + 1}: {what}"
    if all_finite(trainable(run.model).values()):
        path = checkpoint_path(run.out, run.step)
        if util.is_rank0() and not path.is_file():
            save_checkpoint(run.out, run.step, run.model, run.optimizer, run.boundary, run.args,
                            dataset=run.dataset, rotate=False)
        return NonFiniteLoss(f"{step}; the state after step {run.step} is saved in {path}; "
                             f"lower --lr or check the data, then --resume")
    found = checkpoints(run.out)
    if not found:
        return NonFiniteLoss(f"{step}; no checkpoint was saved; lower --lr or check the data and "
                             f"start again")
    return NonFiniteLoss(f"{step}; the newest good checkpoint is {found[-1]}; lower --lr or "
                         f"check the data, then --resume")


def log_step(run: Run, log, bar, *, loss: float, grad_norm: float, seconds: float,
             image_tokens: int) -> None:
    """Append the step's record to run.records and `log` (log.jsonl on rank 0), and show it on
    the progress bar."""
    args, world = run.args, util.rank_world()[1]
    samples_per_s = args.batch_size * args.grad_accum / seconds
    rec = {"step": run.step, "loss": loss, "lr": run.optimizer.param_groups[0]["lr"],
           "grad_norm": grad_norm, "s_per_step": round(seconds, 4),
           "samples_per_s": round(samples_per_s, 3)}
    shown = {}
    if run.device.type == "cuda":
        rec["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(run.device) / util.GiB, 2)
        rec["mfu"] = mfu(run.model.cfg, image_tokens, samples_per_s / world, run.device)
        shown["mem"] = f"{rec['gpu_mem_gb']}G"
    run.records.append(rec)
    log.write(json.dumps(rec) + "\n")
    log.flush()
    bar.set_postfix(loss=f"{loss:.4f}", s_step=f"{seconds:.2f}",
                    samples_s=f"{samples_per_s:.2f}", **shown)
    bar.update(1)


def save_progress(run: Run) -> None:
    """Rank 0 checkpoints the state after run.step (unless that checkpoint exists) and redraws
    the loss curve."""
    if not util.is_rank0():
        return
    if not checkpoint_path(run.out, run.step).is_file():
        save_checkpoint(run.out, run.step, run.model, run.optimizer, run.boundary, run.args,
                        dataset=run.dataset)
    draw_loss_curve(run.records, run.out / "loss.png")


def write_preview(run: Run) -> None:
    """Sample the preview prompts with the adapters as they are now; rank 0 writes
    samples/step-N.png. Every rank samples: a sharded model's forwards are collective. Each
    prompt is sampled with its own references (none in a text-to-image run)."""
    if run.previews is None:
        return
    p, args = run.previews, run.args
    models_ = p.source.for_preview(run.model)
    images = [sample.generate(models_, width=args.resolution, height=args.resolution,
                              steps=args.sample_steps, guidance=args.guidance, cfg=p.cfg,
                              txt=p.txt[i:i + 1], txt_uncond=p.uncond, seeds=[args.seed + i],
                              refs=p.refs[i])[0]
              for i in range(len(p.prompts))]
    if util.is_rank0():
        grid = preview_grid(images, p.prompts, run.step, refs=p.refs)
        util.atomic_write(run.out / "samples" / f"step-{run.step:06d}.png",
                          lambda f: grid.save(f, format="PNG"))


# --------------------------------------------------------------------------------------------------
# Entry point

def print_error(message) -> None:
    """'error: message' on stderr from the first process of each machine: every rank meets the same
    mistake, and each machine's log should say why its processes stopped."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)


def main(argv=None) -> int:
    """CLI entry point: 0 done, 1 non-finite loss, 2 user mistake, 130 interrupted (state saved)."""
    # Fewer fragmentation OOMs with large, changing activations (read at the first CUDA allocation).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    warnings.formatwarning = lambda message, *_: f"warning: {message}\n"  # not a source excerpt
    args = parse_args(argv)

    def run() -> int:
        try:
            result = train(args)
        except NonFiniteLoss as e:
            print_error(e)
            return 1
        except KeyboardInterrupt:
            return 130
        util.print0(f"done: {result['out'] / 'lora.safetensors'} after {result['steps']} steps",
                    file=sys.stderr)
        return 0

    # user mistakes, a full or read-only disk, out of memory: one line and exit 2
    return util.guard(run, user_errors=(lora.LoRAError, planner.PlanError), say=print_error)


if __name__ == "__main__":
    sys.exit(main())
