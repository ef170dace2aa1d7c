"""LoRA fine-tuning of FLUX.2 [dev] by flow matching: the training loop and its command line.

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
import hashlib
import json
import os
import random
import sys
import time
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
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
from util import LoadError

KEEP_CHECKPOINTS = 3
# Flags that define the state being resumed (a different value cannot continue it) ...
STRUCTURAL = ("data", "model", "model_dir", "rank", "alpha", "lora_targets", "resolution",
              "buckets", "repeats", "batch_size", "seed", "default_caption")
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
                     guidance: float | None, timestep_sampling: str,
                     sample_steps: int) -> torch.Tensor:
    """Draw t and noise for a cached batch from `generator` (on the CPU, so a seed means the same
    run on any device) and return its flow-matching loss, under bf16 autocast on CUDA;
    `sample_steps` picks the shift's mu as the sampler does.

    When the batch holds only this rank's rows of the global batch (data.Loader), t and noise are
    still drawn for the whole global batch, so every rank consumes the generator as one process
    does, and the loss is this rank's share of the global mean."""
    x0 = batch["latents"].to(device)                                    # [m, 128, h, w]
    txt = batch["ctx"].to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    index, total = batch["index"], batch["total"]       # the rows' places in the global batch
    mu = flux2.empirical_mu(x0.shape[2] * x0.shape[3], sample_steps)    # the sampler's shift
    t = sample_timesteps(total, timestep_sampling, mu, generator)       # [total]
    noise = torch.randn((total, *x0.shape[1:]), generator=generator)    # [total, 128, h, w]
    rows = index.clamp(max=total - 1)                   # padding rows repeat the last draw
    weight = None if torch.equal(index, torch.arange(total)) else (index < total).float() / total
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return flow_matching_loss(model, x0, txt, t[rows].to(device), noise[rows].to(device),
                                  guidance, weight)


def flow_matching_loss(model, x0: torch.Tensor, txt: torch.Tensor, t: torch.Tensor,
                       noise: torch.Tensor, guidance: float | None,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between the predicted velocity and eps - x0 at x_t = (1 - t)·x0 + t·eps.
    x0, noise [B, 128, h, w] latents; txt [B, 512, ctx]; t [B] -> scalar (float32): the mean over
    the batch, or with `weight` [B] the weighted sum of the rows' means (a rank's share)."""
    B, _, h, w = x0.shape
    tb = t.view(B, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * noise
    dtype = txt.dtype               # bf16 on CUDA: t is quantized in the embedding as at sampling
    g = None if guidance is None else torch.full((B,), guidance, device=x0.device)
    pred = model(pack(x_t).to(dtype), image_ids(h, w)[None].to(x0.device), txt,
                 text_ids(txt.shape[1])[None].to(x0.device), t.to(x0.device), g)    # [B, h*w, 128]
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


def save_checkpoint(out: Path, step: int, model, optimizer, boundary: dict, args) -> Path:
    """Write out/checkpoints/step-N.pt atomically and keep the newest KEEP_CHECKPOINTS."""
    state = {"step": step, "lora": {n: p.detach().cpu() for n, p in trainable(model).items()},
             "optimizer": optimizer.state_dict(), **boundary, "args": vars(args)}
    path = checkpoint_path(out, step)
    util.atomic_write(path, lambda f: torch.save(state, f))
    for old in checkpoints(out)[:-KEEP_CHECKPOINTS]:
        old.unlink()
    return path


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by save_checkpoint."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LoadError(f"{path}: unreadable checkpoint ({e}); delete it to resume from the one "
                        f"before") from None


def check_resume(saved: dict, args) -> None:
    """Refuse to resume with flags that change what is being resumed; warn about changed
    hyper-parameters (they make a different run)."""
    def norm(key, v):
        return str(Path(v).resolve()) if key in ("data", "model_dir") and v else v

    for key in STRUCTURAL + TUNABLE:
        old, new = norm(key, saved.get(key)), norm(key, getattr(args, key))
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


def preview_grid(images: list[Image.Image], prompts: list[str], step: int) -> Image.Image:
    """Images side by side, each captioned with its prompt, under a 'step N' title."""
    w, h = images[0].size
    label = 44
    grid = Image.new("RGB", (w * len(images), h + label + 20), "white")
    d = ImageDraw.Draw(grid)
    d.text((4, 4), f"step {step}", fill="black")
    for i, (im, p) in enumerate(zip(images, prompts)):
        grid.paste(im, (i * w, 20))
        chars = max(w // 6, 8)                          # the default bitmap font is ~6 px wide
        caption = "\n".join(p[k:k + chars] for k in range(0, 3 * chars, chars))
        d.multiline_text((i * w + 4, h + 24), caption, fill="black")
    return grid


# --------------------------------------------------------------------------------------------------
# Command line

def read_prompts(path) -> list[str]:
    """Non-empty lines of a prompts file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise LoadError(f"--sample-prompts {path}: {e.strerror}; pass a text file with one "
                        f"prompt per line") from None
    return [line.strip() for line in lines if line.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The flags; every one can also be given as a key of --config FILE.toml."""
    p = argparse.ArgumentParser(
        formatter_class=util.HelpFormatter,
        description="Train a FLUX.2 [dev] / [klein] LoRA on a folder of captioned images.")
    a = p.add_argument
    a("--config",
      help="TOML file with the same keys as the flags (flags given on the command line win)")
    a("--data", help="folder of images with same-stem .txt captions or a metadata.jsonl")
    a("--model", choices=["dev", "tiny", *models.RANDOM_MODELS], default="dev",
      help="dev (needs --model-dir: a dev or klein snapshot), tiny (random, CPU demo), or a "
           "full-size model with random weights for speed/memory runs: "
           + ", ".join(models.RANDOM_MODELS))
    a("--model-dir",
      help="a FLUX.2-dev or FLUX.2-klein(-base) snapshot folder (DiT file or transformer/, ae, "
           "text_encoder, tokenizer); for klein train on the base model")
    a("--out", default="out",
      help="output folder: lora.safetensors, checkpoints/, log.jsonl, loss.png, samples/")
    a("--cache-dir",
      help="latent/text cache (default ~/.cache/flux2-lora); entries are keyed by content hash")
    a("--steps", type=int, default=1000,
      help="optimizer steps in total (a resumed run counts from its start)")
    a("--batch-size", type=int, default=1,
      help="images per micro-batch over all processes (torchrun: split evenly)")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--resolution", type=int,
      help="training side in pixels, multiple of 16 (default 1024; 128 for tiny)")
    a("--buckets", action="store_true",
      help="aspect-ratio buckets of about resolution^2 pixels instead of squares")
    a("--repeats", type=int, default=1, help="times each image appears per epoch")
    a("--default-caption", help="caption for images without one")
    a("--rank", type=int, default=16, help="LoRA rank r of every adapter")
    a("--alpha", type=float, help="LoRA alpha (scale alpha/rank); default = rank, i.e. scale 1")
    a("--lora-targets", default="paper",
      help="lora.py preset (paper, attn+mlp, all) or a regex over module names")
    a("--lr", type=float, default=1e-4,
      help="AdamW learning rate, constant (the report: no scheduler)")
    a("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay")
    a("--timestep-sampling", choices=["shift", "logit-normal", "uniform"], default="shift",
      help="how training t is drawn: shift = the sampler's time shift applied to U(0,1) "
           "(matches sampling), logit-normal = the same shift on sigmoid(N(0,1)), "
           "uniform = U(0,1) as the diffusers trainer")
    a("--guidance", type=float, default=4.0,
      help="guidance value fed to the guidance embedder while training")
    a("--offload", choices=planner.STRATEGIES, default="auto",
      help="block placement (offload.py): auto = resident if everything fits, else stream the "
           "fewest blocks (more when the batch hides the copies); spare memory keeps MLP and "
           "attention outputs, then skips checkpoints")
    a("--gpu-memory-limit", type=float,
      help="GiB this run may use on the GPU: the planner's budget and a hard allocator cap, to "
           "rehearse a smaller card (default: what is free)")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile the elementwise glue between the matmuls (flux2.fuse), with any plan "
           "(default: on with CUDA)")
    a("--device", help="cuda or cpu (default: cuda when available)")
    a("--seed", type=int, default=0,
      help="data order, noise, timesteps, LoRA init; preview seeds are seed + i")
    a("--save-every", type=int, default=250, help="checkpoint every N steps (0: only at the end)")
    a("--sample-every", type=int, default=200,
      help="preview grid every N steps, also at step 0 (0: never)")
    a("--sample-prompts",
      help="text file, one preview prompt per line (default: the first two captions)")
    a("--sample-steps", type=int, default=50,
      help="sampling steps for previews; also picks the shift's mu")
    a("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Flags, with --config TOML values as defaults; a mistake exits 2 with one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        try:
            config = tomllib.loads(Path(args.config).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            parser.error(f"--config {args.config}: {e}")
        known = {a.dest for a in parser._actions}
        config = {k.replace("-", "_"): v for k, v in config.items()}
        unknown = sorted(set(config) - known - {"config"})
        if unknown:
            parser.error(f"--config {args.config}: unknown key {unknown[0]!r}; use the flag names, "
                         f"e.g. batch-size")
        parser.set_defaults(**config)
        args = parser.parse_args(argv)
    if not args.data:
        parser.error("--data is required (a folder of images with .txt captions)")
    if args.model == "dev" and not args.model_dir:
        parser.error("--model-dir is required for --model dev (or pass --model tiny for the CPU "
                     "demo)")
    args.resolution = args.resolution or (128 if args.model == "tiny" else 1024)
    for flag in ("steps", "batch_size", "grad_accum", "repeats", "rank", "resolution"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.resolution % 16:
        parser.error(f"--resolution {args.resolution}: must be a multiple of 16")
    if (args.device or "").startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU is visible to torch; use --device cpu")
    return args


# --------------------------------------------------------------------------------------------------
# The run: what its phases hand to the loop

class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the last good state was saved."""


@dataclass
class Previews:
    """The same prompts and seeds sampled on a schedule, so what changes between the grids is the
    LoRA."""
    source: models.ModelSource      # its autoencoder decodes the samples
    prompts: list[str]
    txt: torch.Tensor               # [N, 512, ctx] the prompts' cached text features
    uncond: torch.Tensor | None     # [1, 512, ctx] the empty prompt: a klein base's true CFG
    cfg: float | None               # the CFG scale (klein base), or None: guidance-distilled dev


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
    step: int = 0                   # optimizer steps done
    records: list[dict] = field(default_factory=list)   # log.jsonl's records up to `step`
    boundary: dict = field(default_factory=dict)        # RNG and data position after `step` steps

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
    try:
        return _train(args, device)
    finally:
        if own_group:
            offload.leave_process_group()


def _train(args, device: torch.device) -> dict:
    """train() inside the process group: the four phases, the same on every rank; rank 0 writes
    the files."""
    out = Path(args.out)
    cache = Path(args.cache_dir or "~/.cache/flux2-lora").expanduser()
    saved = resume_state(args, out)                                 # None: a fresh run

    source = models.ModelSource(args.model, args.model_dir, device)   # tiny: sample.py's weights
    cfg = preview_cfg(source, args.model_dir)
    items, prompts = cache_features(args, source, cache=cache, cfg=cfg)
    check_ranks_agree(items, resumed_step=saved["step"] if saved else -1, cache=cache, out=out)
    rank, world = util.rank_world()
    loader = data.Loader(items, cache_dir=cache, text_id=source.text_id, batch_size=args.batch_size,
                         repeats=args.repeats, seed=args.seed, rank=rank, world=world)

    model, plan, optimizer = build_model(args, source)
    previews = None
    if args.sample_every:
        txt = torch.stack([data.load_text(cache, p, source.text_id) for p in prompts])
        uncond = data.load_text(cache, "", source.text_id)[None] if cfg else None
        previews = Previews(source=source, prompts=prompts, txt=txt, uncond=uncond, cfg=cfg)
    run = Run(args=args, out=out, device=device, model=model, optimizer=optimizer, loader=loader,
              generator=torch.Generator().manual_seed(args.seed), previews=previews)
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
    saved = load_checkpoint(found[-1])
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
                   cfg: float | None) -> tuple[list[data.Item], list[str]]:
    """Encode what the cache lacks: every image's latent, every caption's and preview prompt's text
    features (and the empty prompt's for CFG); each rank encodes its share. Returns the items and
    the preview prompts."""
    rank, world = util.rank_world()
    prompts = read_prompts(args.sample_prompts) if args.sample_prompts else None
    items = data.cache_latents(args.data, cache_dir=cache, ae_id=source.ae_id,
                               load_ae=source.load_ae, resolution=args.resolution,
                               buckets=args.buckets, default_caption=args.default_caption,
                               device=source.device, rank=rank, world=world)
    prompts = prompts or list(dict.fromkeys(it.caption for it in items))[:2]
    data.cache_texts([it.caption for it in items] + prompts + [""] * bool(cfg), cache_dir=cache,
                     text_id=source.text_id, load_encoder=source.load_text_encoder,
                     rank=rank, world=world)
    return items, prompts


def same_on_all_ranks(values: list[int]) -> bool:
    """Whether every rank passed the same integers (a collective: every rank must call it)."""
    t = torch.tensor(values)                            # CPU: gloo serves it in either backend
    lo, hi = t.clone(), t.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return torch.equal(lo, hi)


def check_ranks_agree(items: list[data.Item], *, resumed_step: int, cache: Path,
                      out: Path) -> None:
    """With several ranks, each wrote only its share of the cache and read its own --out: all must
    see the same images and the same checkpoint."""
    if util.rank_world()[1] == 1:
        return
    seen = int(hashlib.sha256("".join(it.digest for it in items).encode()).hexdigest()[:15], 16)
    if not same_on_all_ranks([seen, resumed_step]):
        raise LoadError(f"the ranks see different images in --cache-dir {cache} or checkpoints in "
                        f"--out {out}; on several machines both must be folders every machine "
                        f"sees (a shared filesystem)")


# --------------------------------------------------------------------------------------------------
# Phase 3: building the model and the optimizer, restoring a checkpoint

def build_model(args, source: models.ModelSource) -> tuple[flux2.Flux2, planner.Plan,
                                                          torch.optim.AdamW]:
    """The DiT with LoRA adapters, placed by the offload planner (sharded over the ranks when
    there are several) and filled; the glue between the matmuls compiled under --compile; AdamW
    over the adapters."""
    world = util.rank_world()[1]

    def add_adapters(dit):
        torch.manual_seed(args.seed)                # LoRA A init (the same on every rank)
        lora.inject(dit, targets=args.lora_targets, rank=args.rank, alpha=args.alpha)

    def set_adapters(dit):                          # values for adapters made on meta, drawn as
        torch.manual_seed(args.seed)                # inject draws them on a DiT built with values
        lora.init_adapters(dit)

    l_img = (args.resolution // 16) ** 2
    model, plan = models.placed_dit(
        source, add_adapters=add_adapters, set_adapters=set_adapters,
        strategy="fsdp2" if world > 1 and args.offload == "auto" else args.offload,
        batch_size=args.batch_size // world, tokens_per_sample=l_img + data.TEXT_LENGTH,
        train=True, gpu_memory_limit=args.gpu_memory_limit)
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
                                        timestep_sampling=args.timestep_sampling)
                value = global_loss(loss)
                if not torch.isfinite(value):
                    raise stop_on_non_finite(run, value)
                (loss / args.grad_accum).backward()
                loss_sum += value.item() / args.grad_accum
            offload.sum_gradients(params)           # LoRA is replicated: reduce before clipping
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
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


def stop_on_non_finite(run: Run, value: torch.Tensor) -> NonFiniteLoss:
    """Rank 0 saves the state before this step; the error that says where it is."""
    path = checkpoint_path(run.out, run.step)
    if util.is_rank0():
        save_checkpoint(run.out, run.step, run.model, run.optimizer, run.boundary, run.args)
    return NonFiniteLoss(f"step {run.step + 1}: the loss is {value.item()}; the state after step "
                         f"{run.step} is saved in {path}; lower --lr or check the data, then "
                         f"--resume")


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
        save_checkpoint(run.out, run.step, run.model, run.optimizer, run.boundary, run.args)
    draw_loss_curve(run.records, run.out / "loss.png")


def write_preview(run: Run) -> None:
    """Sample the preview prompts with the adapters as they are now; rank 0 writes
    samples/step-N.png. Every rank samples: a sharded model's forwards are collective."""
    if run.previews is None:
        return
    p, args = run.previews, run.args
    images = sample.generate(p.source.for_preview(run.model), width=args.resolution,
                             height=args.resolution, steps=args.sample_steps,
                             guidance=args.guidance, cfg=p.cfg, txt=p.txt, txt_uncond=p.uncond,
                             seeds=[args.seed + i for i in range(len(p.prompts))])
    if util.is_rank0():
        grid = preview_grid(images, p.prompts, run.step)
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
    try:
        result = train(args)
    except (LoadError, lora.LoRAError, planner.PlanError) as e:
        print_error(e)
        return 2
    except NonFiniteLoss as e:
        print_error(e)
        return 1
    except KeyboardInterrupt:
        return 130
    util.print0(f"done: {result['out'] / 'lora.safetensors'} after {result['steps']} steps",
                file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
