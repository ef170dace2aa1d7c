"""LoRA fine-tuning of FLUX.2 [dev] by flow matching: the training loop and its command line.

Follows docs/flux2_reference.md §8 (x_t = (1 - t)·x0 + t·eps, target eps - x0, t in [0, 1] fed to the
model, constant guidance), §7.1 (the sampler's resolution-dependent shift, reused to draw training timesteps) and
§4 (position ids), and the report (docs/paper.md): AdamW at a constant lr, rank-16 LoRA on the attention
projections, gradient checkpointing before every block, bf16 autocast, previews and checkpoints on a schedule.

    python train.py --data DIR --model-dir FLUX.2-dev/ --rank 16          # the real model, one GPU
    python train.py --data examples/toy --model tiny --steps 50            # random tiny model, CPU, seconds
    torchrun --nproc_per_node 8 train.py --data DIR --model-dir FLUX.2-dev/ --batch-size 16   # 8 GPUs, 2 each
    python train.py --data DIR --model-dir FLUX.2-klein-base-4B/           # klein: no guidance, CFG previews

FLUX.2 [klein] snapshots work the same way (Qwen3 text features, no guidance embedder). Train on the klein base
models; a step-distilled klein gets a warning (fine-tuning undoes the 4-step distillation).

Under torchrun the frozen DiT is sharded over the ranks with FSDP2 (offload.py) and the run is data parallel: the
global batch is split over the ranks, t and noise are drawn for the whole global batch from the same seeded stream
on every rank, and the LoRA gradients are summed, so N ranks train what one process would with the same batch.
Rank 0 writes every file; checkpoints hold only global state, so a run resumes on any number of ranks.
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
import sample
import util
from flux2 import image_ids, pack, text_ids
from util import LoadError

KEEP_CHECKPOINTS = 3
# Flags that define the state being resumed (a different value cannot continue it) ...
STRUCTURAL = ("data", "model", "model_dir", "rank", "alpha", "lora_targets", "resolution", "buckets", "repeats",
              "batch_size", "seed", "default_caption")
# ... and flags that may change on resume (e.g. a lower --lr after a NaN), at the price of a different run.
TUNABLE = ("lr", "weight_decay", "timestep_sampling", "guidance", "grad_accum", "sample_steps")


# ----------------------------------------------------------------------------------------------------------
# Flow matching (reference §8)

def sample_timesteps(n: int, how: str, mu: float, generator: torch.Generator) -> torch.Tensor:
    """n training times in [0, 1] (1 = pure noise): 'shift' (uniform u, shifted like the sampler),
    'logit-normal' (sigmoid of N(0, 1), shifted) or 'uniform' (unshifted, as the diffusers trainer)."""
    if how == "logit-normal":
        u = torch.sigmoid(torch.randn(n, generator=generator))
    else:
        u = torch.rand(n, generator=generator)
    return u if how == "uniform" else flux2.time_shift(u, mu)


def micro_batch_loss(model, batch: dict, args, generator: torch.Generator, device, guidance) -> torch.Tensor:
    """Draw t and noise for a cached batch from `generator` (on the CPU, so a seed means the same run on any
    device) and return its flow-matching loss, under bf16 autocast on CUDA. When the batch holds only this rank's
    rows of the global batch (data.Loader), t and noise are still drawn for the whole global batch, so every rank
    consumes the generator as one process does, and the loss is this rank's share of the global mean."""
    x0 = batch["latents"].to(device)                                            # [m, 128, h, w]
    txt = batch["ctx"].to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    index, total = batch["index"], batch["total"]                               # rows' positions in the global batch
    mu = flux2.empirical_mu(x0.shape[2] * x0.shape[3], args.sample_steps)       # the sampler's shift at this size
    t = sample_timesteps(total, args.timestep_sampling, mu, generator)          # [total]
    noise = torch.randn((total, *x0.shape[1:]), generator=generator)           # [total, 128, h, w]
    rows = index.clamp(max=total - 1)                                           # padding rows repeat the last draw
    weight = None if torch.equal(index, torch.arange(total)) else (index < total).float() / total
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return flow_matching_loss(model, x0, txt, t[rows].to(device), noise[rows].to(device), guidance, weight)


def flow_matching_loss(model, x0: torch.Tensor, txt: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                       guidance: float | None, weight: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between the predicted velocity and eps - x0 at x_t = (1 - t)·x0 + t·eps.
    x0, noise [B, 128, h, w] latents; txt [B, 512, ctx]; t [B] -> scalar (float32): the mean over the batch, or
    with `weight` [B] the weighted sum of the rows' means (a rank's share of a global batch)."""
    B, _, h, w = x0.shape
    tb = t.view(B, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * noise
    dtype = txt.dtype                           # bf16 on CUDA: t is quantized in the embedding as at sampling
    g = None if guidance is None else torch.full((B,), guidance, device=x0.device)
    pred = model(pack(x_t).to(dtype), image_ids(h, w)[None].to(x0.device), txt,
                 text_ids(txt.shape[1])[None].to(x0.device), t.to(x0.device), g)        # [B, h*w, 128]
    if weight is None:
        return F.mse_loss(pred.float(), pack(noise - x0).float())
    per_row = (pred.float() - pack(noise - x0).float()).square().mean(dim=(1, 2))    # [B]
    return (per_row * weight.to(per_row.device)).sum()


# ----------------------------------------------------------------------------------------------------------
# State that makes a resume exact: LoRA weights, optimizer, RNGs, data position

def trainable(model) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters by name, in a fixed order (the optimizer indexes them by position)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def rng_state(generator: torch.Generator) -> dict:
    """Every random stream the run draws from."""
    np_state = np.random.get_state()
    return {"train": generator.get_state(), "torch": torch.get_rng_state(), "python": random.getstate(),
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
    """Complete checkpoints in out/checkpoints, oldest first (temp files of an interrupted save never match)."""
    return sorted((out / "checkpoints").glob("step-*.pt"))


def save_checkpoint(out: Path, step: int, model, optimizer, boundary: dict, args) -> Path:
    """Write out/checkpoints/step-N.pt atomically and keep the newest KEEP_CHECKPOINTS."""
    state = {"step": step, "lora": {n: p.detach().cpu() for n, p in trainable(model).items()},
             "optimizer": optimizer.state_dict(), **boundary, "args": vars(args)}
    path = out / "checkpoints" / f"step-{step:06d}.pt"
    util.atomic_write(path, lambda f: torch.save(state, f))
    for old in checkpoints(out)[:-KEEP_CHECKPOINTS]:
        old.unlink()
    return path


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by save_checkpoint."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LoadError(f"{path}: unreadable checkpoint ({e}); delete it to resume from the one before") from None


def check_resume(saved: dict, args) -> None:
    """Refuse to resume with flags that change what is being resumed; warn about changed hyper-parameters."""
    def norm(key, v):
        return str(Path(v).resolve()) if key in ("data", "model_dir") and v else v

    for key in STRUCTURAL + TUNABLE:
        old, new = norm(key, saved.get(key)), norm(key, getattr(args, key))
        if old == new:
            continue
        flag = "--" + key.replace("_", "-")
        if key in STRUCTURAL:
            raise LoadError(f"--resume: {flag} is {new!r} but the checkpoint was trained with {old!r}; "
                            f"pass the same value or another --out")
        if util.rank_world()[0] == 0:
            print(f"warning: resuming with {flag} {new!r} (was {old!r}): not the run an uninterrupted one would give",
                  file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------
# What a person watches: log lines, a loss curve, preview grids

def mfu(cfg, l_img: int, samples_per_s: float, device) -> float | None:
    """Model FLOPs utilisation (flux2.train_step_flops, the same count as bench.py) over the card's measured bf16
    matmul rate, or None on a CPU or an unknown card."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in flux2.PEAK_BF16_FLOPS.items() if k in name), None)
    return None if peak is None else flux2.train_step_flops(cfg, 1, l_img, data.TEXT_LENGTH) * samples_per_s / peak


def read_log(out: Path) -> list[dict]:
    """The per-step records of out/log.jsonl."""
    file = out / "log.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()] if file.is_file() else []


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
        chars = max(w // 6, 8)                                     # the default bitmap font is ~6 px wide
        d.multiline_text((i * w + 4, h + 24), "\n".join(p[k:k + chars] for k in range(0, 3 * chars, chars)),
                         fill="black")
    return grid


# ----------------------------------------------------------------------------------------------------------
# Command line

def read_prompts(path) -> list[str]:
    """Non-empty lines of a prompts file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise LoadError(f"--sample-prompts {path}: {e.strerror}; pass a text file with one prompt per line") from None
    return [line.strip() for line in lines if line.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The flags; every one can also be given as a key of --config FILE.toml."""
    p = argparse.ArgumentParser(formatter_class=util.HelpFormatter,
                                description="Train a FLUX.2 [dev] / [klein] LoRA on a folder of captioned images.")
    a = p.add_argument
    a("--config", help="TOML file with the same keys as the flags (flags given on the command line win)")
    a("--data", help="folder of images with same-stem .txt captions or a metadata.jsonl")
    a("--model", choices=["dev", "tiny", *models.RANDOM_MODELS], default="dev",
      help="dev (needs --model-dir: a dev or klein snapshot), tiny (random, CPU demo), or a full-size model with "
           "random weights for speed/memory runs: " + ", ".join(models.RANDOM_MODELS))
    a("--model-dir", help="a FLUX.2-dev or FLUX.2-klein(-base) snapshot folder (DiT file or transformer/, ae, "
                          "text_encoder, tokenizer); for klein train on the base model")
    a("--out", default="out", help="output folder: lora.safetensors, checkpoints/, log.jsonl, loss.png, samples/")
    a("--cache-dir", help="latent/text cache (default ~/.cache/flux2-lora); entries are keyed by content hash")
    a("--steps", type=int, default=1000, help="optimizer steps in total (a resumed run counts from its start)")
    a("--batch-size", type=int, default=1, help="images per micro-batch over all processes (torchrun: split evenly)")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--resolution", type=int, help="training side in pixels, multiple of 16 (default 1024; 128 for tiny)")
    a("--buckets", action="store_true", help="aspect-ratio buckets of about resolution^2 pixels instead of squares")
    a("--repeats", type=int, default=1, help="times each image appears per epoch")
    a("--default-caption", help="caption for images without one")
    a("--rank", type=int, default=16, help="LoRA rank r of every adapter")
    a("--alpha", type=float, help="LoRA alpha (scale alpha/rank); default = rank, i.e. scale 1")
    a("--lora-targets", default="paper", help="lora.py preset (paper, attn+mlp, all) or a regex over module names")
    a("--lr", type=float, default=1e-4, help="AdamW learning rate, constant (the report: no scheduler)")
    a("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay")
    a("--timestep-sampling", choices=["shift", "logit-normal", "uniform"], default="shift",
      help="how training t is drawn: shift = the sampler's time shift applied to U(0,1) (matches sampling), "
           "logit-normal = the same shift on sigmoid(N(0,1)), uniform = U(0,1) as the diffusers trainer")
    a("--guidance", type=float, default=4.0, help="guidance value fed to the guidance embedder while training")
    a("--offload", choices=offload.STRATEGIES, default="auto",
      help="block placement (offload.py): auto = resident if everything fits, else stream the fewest blocks (more "
           "when the batch hides the copies); spare memory keeps MLP and attention outputs, then skips checkpoints")
    a("--gpu-memory-limit", type=float,
      help="GiB this run may use on the GPU: the planner's budget and a hard allocator cap, to rehearse a "
           "smaller card (default: what is free)")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile the elementwise glue between the matmuls (flux2.fuse), with any plan (default: on with "
           "CUDA)")
    a("--device", help="cuda or cpu (default: cuda when available)")
    a("--seed", type=int, default=0, help="data order, noise, timesteps, LoRA init; preview seeds are seed + i")
    a("--save-every", type=int, default=250, help="checkpoint every N steps (0: only at the end)")
    a("--sample-every", type=int, default=200, help="preview grid every N steps, also at step 0 (0: never)")
    a("--sample-prompts", help="text file, one preview prompt per line (default: the first two captions)")
    a("--sample-steps", type=int, default=50, help="sampling steps for previews; also picks the shift's mu")
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
            parser.error(f"--config {args.config}: unknown key {unknown[0]!r}; use the flag names, e.g. batch-size")
        parser.set_defaults(**config)
        args = parser.parse_args(argv)
    if not args.data:
        parser.error("--data is required (a folder of images with .txt captions)")
    if args.model == "dev" and not args.model_dir:
        parser.error("--model-dir is required for --model dev (or pass --model tiny for the CPU demo)")
    args.resolution = args.resolution or (128 if args.model == "tiny" else 1024)
    for flag in ("steps", "batch_size", "grad_accum", "repeats", "rank", "resolution"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.resolution % 16:
        parser.error(f"--resolution {args.resolution}: must be a multiple of 16")
    if (args.device or "").startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU is visible to torch; use --device cpu")
    return args


# ----------------------------------------------------------------------------------------------------------
# The run

def same_on_all_ranks(values: list[int]) -> bool:
    """Whether every rank passed the same integers (a collective: every rank must call it)."""
    t = torch.tensor(values)                                    # CPU: gloo serves it in either backend
    lo, hi = t.clone(), t.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return torch.equal(lo, hi)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the last good state was saved."""


def train(args) -> dict:
    """Run (or resume) training as `args` says; returns {"steps", "losses", "out"}. Under torchrun every process
    calls it with the same flags: it joins the process group (one GPU per process) and leaves it at the end."""
    world = int(os.environ["WORLD_SIZE"]) if offload.launched() else 1
    if args.batch_size % world:
        raise LoadError(f"--batch-size {args.batch_size} is the global batch and does not split over {world} "
                        f"processes; pass a multiple of {world}")
    device = util.default_device(args.device)
    own_group = not dist.is_initialized()
    if offload.launched():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        offload.init_process_group(device)
    offload.cap_gpu_memory(device, args.gpu_memory_limit)        # text encoder and VAE included, not only the plan
    try:
        return _train(args, device)
    finally:
        if own_group:
            offload.leave_process_group()


def _train(args, device: torch.device) -> dict:
    """train() inside the process group: the same steps on every rank, files from rank 0."""
    rank, world = util.rank_world()
    out = Path(args.out)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else Path("~/.cache/flux2-lora").expanduser()
    if rank == 0:
        for stale in (out / "checkpoints").glob("*.tmp"):      # left by a save that was killed
            stale.unlink()
    found = checkpoints(out)
    if found and not args.resume:
        raise LoadError(f"{out}: holds checkpoints of an earlier run; pass --resume to continue it or another --out")
    saved = None
    if args.resume:
        if not found:
            raise LoadError(f"{out}: no checkpoint to resume from (looked in {out / 'checkpoints'})")
        saved = load_checkpoint(found[-1])
        check_resume(saved["args"], args)

    # 1. Data: latents and text features cached first, so the VAE and the text encoder are gone before the DiT.
    #    With several ranks each encodes its share into the one cache; all then read all of it.
    source = models.ModelSource(args.model, args.model_dir, device)     # the same tiny weights as sample.py's
    ae_id, text_id = source.ae_id, source.text_id
    klein = None if source.tiny or source.random else models.klein_kind(args.model_dir)
    if klein == "distilled" and rank == 0:
        warnings.warn(f"{args.model_dir} is a step-distilled FLUX.2 [klein] (4-step sampler): fine-tuning undoes the "
                      f"distillation, and users report washed-out, grey-blotched samples; train on the klein base "
                      f"model (FLUX.2-klein-base-4B / -9B) instead")
    cfg = models.model_defaults(args.model_dir).get("cfg") if klein else None   # klein base previews: true CFG
    prompts = read_prompts(args.sample_prompts) if args.sample_prompts else None
    items = data.cache_latents(args.data, cache_dir=cache, ae_id=ae_id, load_ae=source.load_ae,
                               resolution=args.resolution, buckets=args.buckets,
                               default_caption=args.default_caption, device=device, rank=rank, world=world)
    prompts = prompts or list(dict.fromkeys(it.caption for it in items))[:2]
    data.cache_texts([it.caption for it in items] + prompts + [""] * bool(cfg), cache_dir=cache, text_id=text_id,
                     load_encoder=source.load_text_encoder, rank=rank, world=world)
    if world > 1:                                  # each rank wrote only its share: all must see all of it
        seen = int(hashlib.sha256("".join(it.digest for it in items).encode()).hexdigest()[:15], 16)
        if not same_on_all_ranks([seen, saved["step"] if saved else -1]):
            raise LoadError(f"the ranks see different images in --cache-dir {cache} or checkpoints in --out {out}; "
                            f"on several machines both must be folders every machine sees (a shared filesystem)")
    loader = data.Loader(items, cache_dir=cache, text_id=text_id, batch_size=args.batch_size,
                         repeats=args.repeats, seed=args.seed, rank=rank, world=world)

    # 2. The DiT with LoRA adapters, placed by the offload planner (sharded over the ranks when there are several).
    strategy = "fsdp2" if world > 1 and args.offload == "auto" else args.offload
    def add_adapters(dit):
        torch.manual_seed(args.seed)                            # LoRA A init (the same on every rank); or resumed
        lora.inject(dit, targets=args.lora_targets, rank=args.rank, alpha=args.alpha)

    def set_adapters(dit):                                      # values for adapters made on meta, drawn as
        torch.manual_seed(args.seed)                            # inject draws them on a DiT built with values
        lora.init_adapters(dit)

    l_img = (args.resolution // 16) ** 2
    compile = device.type == "cuda" if args.compile is None else args.compile
    model, plan = models.placed_dit(source, add_adapters=add_adapters, set_adapters=set_adapters, strategy=strategy,
                                    batch_size=args.batch_size // world, tokens_per_sample=l_img + data.TEXT_LENGTH,
                                    train=True, gpu_memory_limit=args.gpu_memory_limit)
    flux2.fuse(compile)      # the glue between the matmuls; whole blocks stay eager (bench/RESULTS.md §6 says why)
    params = list(trainable(model).values())
    if world > 1:                                               # replicas start equal, however they were filled
        for p in params:
            dist.broadcast(p.data, src=0)
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)       # noise and timesteps: one stream, saved exactly
    guidance = args.guidance if model.cfg.use_guidance_embed else None
    step = 0
    if saved is not None:
        with torch.no_grad():
            for name, p in trainable(model).items():
                p.copy_(saved["lora"][name])
        optimizer.load_state_dict(saved["optimizer"])
        for group in optimizer.param_groups:                   # the flags win over the saved values (a lower --lr)
            group.update(lr=args.lr, weight_decay=args.weight_decay)
        set_rng_state(saved["rng"], generator)
        loader.load_state_dict(saved["loader"])
        step = saved["step"]
    boundary = {"rng": rng_state(generator), "loader": loader.state_dict()}   # the state after `step` steps

    records = [r for r in read_log(out) if r["step"] <= step] if saved else []
    if rank == 0:                                               # one writer for every file
        out.mkdir(parents=True, exist_ok=True)
        (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (out / "config.json").write_text(json.dumps(vars(args), indent=1))
        split = f" over {world} processes ({args.batch_size // world} each)" if world > 1 else ""
        print(f"{len(items)} images x {args.repeats} repeats, batch {args.batch_size}{split} x {args.grad_accum} "
              f"accumulated, offload {plan.strategy}", file=sys.stderr)

    def previews(at: int):
        if not args.sample_every or not prompts:
            return
        txt = torch.stack([data.load_text(cache, p, text_id) for p in prompts])          # [N, 512, ctx]
        uncond = data.load_text(cache, "", text_id)[None] if cfg else None              # [1, 512, ctx]
        # every rank samples: a sharded model's forwards are collective; rank 0 keeps the grid
        images = sample.generate(source.for_preview(model), width=args.resolution, height=args.resolution,
                                 steps=args.sample_steps, guidance=args.guidance,
                                 seeds=[args.seed + i for i in range(len(prompts))], txt=txt, cfg=cfg,
                                 txt_uncond=uncond)
        if rank == 0:
            grid = preview_grid(images, prompts, at)
            util.atomic_write(out / "samples" / f"step-{at:06d}.png", lambda f: grid.save(f, format="PNG"))

    def save(at: int):
        if rank != 0:
            return
        if not any(c.name == f"step-{at:06d}.pt" for c in checkpoints(out)):
            save_checkpoint(out, at, model, optimizer, boundary, args)
        draw_loss_curve(records, out / "loss.png")

    if step == 0:
        previews(0)                                             # the baseline every later preview is compared with
    bar = tqdm(total=args.steps, initial=step, dynamic_ncols=True, desc="train", disable=rank != 0)
    log = (out / "log.jsonl" if rank == 0 else Path(os.devnull)).open("a")
    try:
        while step < args.steps:
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for _ in range(args.grad_accum):
                batch = next(loader)
                loss = micro_batch_loss(model, batch, args, generator, device, guidance)
                value = loss.detach()
                if world > 1:                                   # the shares sum to the global batch's loss, so
                    dist.all_reduce(value)                      # every rank sees the same (non-)finite value
                if not torch.isfinite(value):
                    path = save_checkpoint(out, step, model, optimizer, boundary, args) if rank == 0 else \
                        out / "checkpoints" / f"step-{step:06d}.pt"
                    raise NonFiniteLoss(f"step {step + 1}: the loss is {value.item()}; the state after step {step} "
                                        f"is saved in {path}; lower --lr or check the data, then --resume")
                (loss / args.grad_accum).backward()
                loss_sum += value.item() / args.grad_accum
            offload.sum_gradients(params)                       # LoRA is replicated: reduce before clipping
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            boundary = {"rng": rng_state(generator), "loader": loader.state_dict()}
            dt = time.perf_counter() - t0
            sps = args.batch_size * args.grad_accum / dt
            rec = {"step": step, "loss": loss_sum, "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm),
                   "s_per_step": round(dt, 4), "samples_per_s": round(sps, 3)}
            if device.type == "cuda":
                rec["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                rec["mfu"] = mfu(model.cfg, batch["latents"][0, 0].numel(), sps / world, device)
            records.append(rec)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss_sum:.4f}", s_step=f"{dt:.2f}", samples_s=f"{sps:.2f}",
                            **({"mem": f"{rec['gpu_mem_gb']}G"} if "gpu_mem_gb" in rec else {}))
            bar.update(1)
            if args.save_every and step % args.save_every == 0:
                save(step)
            if args.sample_every and step % args.sample_every == 0:
                previews(step)
    except KeyboardInterrupt:
        save(step)                                              # `boundary` is the state after the last full step
        bar.close()
        if rank == 0:
            print(f"\ninterrupted: the state after step {step} is saved in {out / 'checkpoints'}; continue with "
                  f"--resume", file=sys.stderr)
        raise
    finally:
        log.close()
        bar.close()
    save(step)
    if args.sample_every and step % args.sample_every:
        previews(step)                                          # the final state, whatever the schedule
    if rank == 0:
        lora.save(model, out / "lora.safetensors", metadata={"base_model": args.model, "steps": step,
                                                               "resolution": args.resolution})
    return {"steps": step, "losses": [r["loss"] for r in records], "out": out}


def main(argv=None) -> int:
    """CLI entry point: 0 done, 1 non-finite loss, 2 user mistake, 130 interrupted (state saved)."""
    # Fewer fragmentation OOMs with large, changing activations (read at the first CUDA allocation).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    warnings.formatwarning = lambda message, *_: f"warning: {message}\n"   # one line, not a source excerpt
    args = parse_args(argv)

    def say(line: str):         # under torchrun the first process of each machine speaks for it (same mistakes)
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(line, file=sys.stderr)

    try:
        result = train(args)
    except (LoadError, lora.LoRAError, offload.PlanError) as e:
        say(f"error: {e}")
        return 2
    except NonFiniteLoss as e:
        say(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        return 130
    if os.environ.get("RANK", "0") == "0":
        say(f"done: {result['out'] / 'lora.safetensors'} after {result['steps']} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
