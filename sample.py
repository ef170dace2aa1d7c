"""The FLUX.2 [dev] / [klein] sampler and its CLI: text-to-image, editing with reference images.

Follows docs/flux2_reference.md §7 (7.1 schedule, 7.2 Euler loop, 7.3 reference images) and §11
(end-to-end), with the ids and token order of §4 and the byte conversion of §5.4. One image per
forward pass:

    prompt --tokenizer + Mistral (layers 10/20/30)--> txt [1, 512, 15360]   (encoder freed after)
    seed --CPU generator--> noise [1, 128, H/16, W/16] --pack--> x [1, L, 128]   (L = H/16 * W/16)
    refs --RGB, cap area, crop /16, [-1,1]--> ae.encode --pack--> [1, L_ref, 128], t = 10, 20, ...
    for t, t_next in schedule(steps, L): x += (t_next - t) * dit([x ; refs], t, txt, g)[:, :L]
    x --unpack--> ae.decode --clamp(-1, 1), (x + 1) * 127.5, byte--> PNG with the settings as text

klein (§6.2, §7.2) swaps in Qwen3 (layers 9/18/27, right-padded prompts) and has no guidance
embedder; its base models use true CFG (--cfg, default 4.0 for them):
v = v("") + cfg * (v(prompt) - v("")), both rows in one batch. models.py builds the models.

    python sample.py --model tiny --device cpu --prompt "a red fox" --width 256 --height 256 \\
        --steps 8 --out fox.png
    python sample.py --model-dir FLUX.2-dev --prompt "..." --lora my.safetensors --lora-scale 0.8 \\
        --ref in.png
    python sample.py --from-png fox.png --out again.png          # same settings, same pixels
"""
import argparse
import json
import math
import os
import random
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo
from safetensors import safe_open
from torch import Tensor

import flux2
import lora
import offload
import planner
import util
import vae
from data import prepare_refs
from flux2 import empirical_mu, image_ids, pack, text_ids, time_shift, unpack
from models import RANDOM_MODELS, ModelSource, Models, encode_text, model_defaults, placed_dit
from util import HelpFormatter, LoadError, default_device, free_cuda
from vae import AutoEncoder


# --------------------------------------------------------------------------------------------------
# Schedule and Euler loop (reference §7.1, §7.2)

def schedule(num_steps: int, image_seq_len: int) -> list[float]:
    """num_steps + 1 times from 1 (noise) to 0 (image): a uniform grid pushed towards t=1 by
    exp(mu). Computed in float32 like the reference, so the values are bit-identical to it."""
    t = torch.linspace(1, 0, num_steps + 1)
    return time_shift(t, empirical_mu(image_seq_len, num_steps)).tolist()


@torch.no_grad()
def denoise(model, noise_tokens: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor,
            timesteps: list[float], guidance: float, ref_tokens: Tensor | None = None,
            ref_ids: Tensor | None = None, cfg: float | None = None,
            txt_uncond: Tensor | None = None) -> Tensor:
    """Euler-integrate the predicted velocity from t=1 to t=0: noise_tokens [B, L, 128] -> image
    tokens, same shape. Reference tokens [B, L_ref, 128] (clean, never updated) are appended after
    the target at every step. With cfg (klein base, reference §7.2): uncond and cond rows in one
    batch, v = v_u + cfg (v_c - v_u)."""
    x = noise_tokens
    B, L = x.shape[:2]
    n = 2 * B if cfg is not None else B                            # rows per forward
    if cfg is not None:
        txt = torch.cat([txt_uncond.expand_as(txt), txt])          # [2B, L_txt, ctx]: uncond first
    # dev is guidance-distilled: no CFG, the guidance value only feeds the guidance embedder
    # (klein has none)
    g = torch.full((n,), guidance, dtype=x.dtype, device=x.device)
    ids = img_ids if ref_ids is None else torch.cat([img_ids, ref_ids], dim=1)   # [B, L + L_ref, 4]
    ids, txt_ids = ids.repeat(n // len(ids), 1, 1), txt_ids.repeat(n // len(txt_ids), 1, 1)
    for t_cur, t_next in zip(timesteps[:-1], timesteps[1:]):
        inp = x if ref_tokens is None else torch.cat([x, ref_tokens.expand(B, -1, -1)], dim=1)
        inp = inp.repeat(n // B, 1, 1)
        t = torch.full((n,), t_cur, dtype=x.dtype, device=x.device)   # model dtype, as reference
        v = model(inp, ids, txt, txt_ids, t, g)[:, :L]             # velocity of the target tokens
        if cfg is not None:
            v_u, v_c = v.chunk(2)
            v = v_u + cfg * (v_c - v_u)
        x = x + (t_next - t_cur) * v
    return x


def noise(seed: int, h16: int, w16: int, channels: int = 128) -> Tensor:
    """The initial latent [1, channels, h16, w16], float32, drawn directly in the packed space (not
    as 32-channel noise at /8). The generator runs on the CPU so a seed gives the same image on any
    device; the reference draws on CUDA in bf16, so its seeds map to different (equally
    distributed) noise."""
    return torch.randn(1, channels, h16, w16, generator=torch.Generator("cpu").manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# Reference images for editing (reference §7.3; data.prepare_refs prepares them as training does)

@torch.no_grad()
def encode_refs(ae: AutoEncoder, images: list[Image.Image],
                dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Reference images -> clean latent tokens [1, L_ref, 128] in `dtype` and their ids
    [1, L_ref, 4] with t = 10, 20, ... (one time slot per reference), in reference order."""
    p = next(ae.parameters())
    tokens, ids = [], []
    for r, pixels in enumerate(prepare_refs(images)):
        z = ae.encode(pixels[None].to(p.device, p.dtype))              # [1, 128, h, w]
        tokens.append(pack(z))
        ids.append(image_ids(*z.shape[-2:], t=10 + 10 * r))
    return torch.cat(tokens, dim=1).to(dtype), torch.cat(ids)[None].to(p.device)


# --------------------------------------------------------------------------------------------------
# Generation

def snap16(width: int, height: int) -> tuple[int, int]:
    """Width and height rounded down to multiples of 16 (VAE /8, then 2x2 patches), with a warning
    when that changes them."""
    w, h = width // 16 * 16, height // 16 * 16
    if w < 16 or h < 16:
        raise ValueError(f"image size {width}x{height} is too small; use at least 16x16")
    if (w, h) != (width, height):
        warnings.warn(f"image size {width}x{height} is not a multiple of 16; using {w}x{h}")
    return w, h


@torch.no_grad()
def generate_tensors(models: Models, prompts: list[str] | None = None, *, width: int, height: int,
                     steps: int, guidance: float, seeds: list[int],
                     refs: list[Image.Image] | None = None, txt: Tensor | None = None,
                     cfg: float | None = None, txt_uncond: Tensor | None = None) -> Tensor:
    """Like `generate`, but returns the decoded pixels [N, 3, H, W] clamped to [-1, 1] (in the
    autoencoder's dtype)."""
    if txt is None:
        txt = encode_text(models, [prompts] if isinstance(prompts, str) else prompts)
    cfg = cfg if cfg is not None and cfg > 1 else None             # as diffusers: CFG only above 1
    if cfg is not None and txt_uncond is None:
        txt_uncond = encode_text(models, [""])                     # klein base's negative: empty
    if len(seeds) != len(txt):
        raise ValueError(f"{len(txt)} prompts but {len(seeds)} seeds; pass one seed per prompt")
    width, height = snap16(width, height)
    h16, w16 = height // 16, width // 16
    dev, dt, dit, ae = models.device, models.dtype, models.dit, models.ae
    timesteps = schedule(steps, h16 * w16)                         # refs do not count towards L
    img_ids = image_ids(h16, w16)[None].to(dev)                    # [1, L, 4]
    txt_ids = text_ids(txt.shape[1])[None].to(dev)                 # [1, 512, 4]
    ref_tokens, ref_ids = encode_refs(ae, refs, dt) if refs else (None, None)
    ae_dtype = next(ae.parameters()).dtype
    was_training = dit.training
    dit.eval()                                                     # LoRA dropout off in previews
    out = []
    try:
        for i, seed in enumerate(seeds):
            x = pack(noise(seed, h16, w16, dit.cfg.in_channels)).to(dev, dt)          # [1, L, 128]
            x = denoise(dit, x, img_ids, txt[i:i + 1].to(dev, dt), txt_ids, timesteps, guidance,
                        ref_tokens=ref_tokens, ref_ids=ref_ids, cfg=cfg,
                        txt_uncond=None if cfg is None else txt_uncond.to(dev, dt))
            out.append(ae.decode(unpack(x, h16, w16).to(ae_dtype)).clamp(-1, 1))     # [1, 3, H, W]
    finally:
        dit.train(was_training)
    return torch.cat(out)


def generate(models: Models, prompts: list[str] | None = None, *, width: int, height: int,
             steps: int, guidance: float, seeds: list[int], refs: list[Image.Image] | None = None,
             txt: Tensor | None = None, cfg: float | None = None,
             txt_uncond: Tensor | None = None) -> list[Image.Image]:
    """One image per prompt (or per row of precomputed txt features [N, 512, ctx]) and seed; refs
    condition all. cfg > 1: true classifier-free guidance against txt_uncond (default: the empty
    prompt's features)."""
    pixels = generate_tensors(models, prompts, width=width, height=height, steps=steps,
                              guidance=guidance, seeds=seeds, refs=refs, txt=txt, cfg=cfg,
                              txt_uncond=txt_uncond)
    return [vae.to_image(x) for x in pixels]


# --------------------------------------------------------------------------------------------------
# PNG metadata: the settings that reproduce an image

META = {"prompt": str, "seed": int, "steps": int, "guidance": float, "width": int, "height": int,
        "lora": str, "lora_scale": float, "refs": json.loads, "model": str,
        "cfg": float}                                              # key -> parser of its text


def save_png(img: Image.Image, path, settings: dict) -> None:
    """Write img with each setting (None ones left out) as a PNG text chunk."""
    info = PngInfo()
    for key, value in settings.items():
        if value is not None:
            info.add_text(key, json.dumps(value) if key == "refs" else str(value))
    img.save(path, pnginfo=info)


def read_png_settings(path) -> dict:
    """The settings save_png wrote into a PNG."""
    try:
        text = Image.open(path).text
    except (OSError, UnidentifiedImageError) as e:
        raise LoadError(f"{path}: cannot read this PNG ({e})") from None
    if "prompt" not in text or "seed" not in text:
        raise LoadError(f"{path}: no sample.py settings in this PNG; "
                        f"pass an image written by sample.py")
    return {key: parse(text[key]) for key, parse in META.items() if key in text}


# --------------------------------------------------------------------------------------------------
# CLI

DEFAULTS = {"width": 1024, "height": 1024, "guidance": 4.0, "lora_scale": 1.0, "refs": []}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, description=(
        "Sample FLUX.2 [dev] / [klein] images, optionally with a LoRA and reference images."))
    p.add_argument("--prompt", help="the prompt")
    p.add_argument("--prompts", type=Path,
                   help="a text file with one prompt per line (seeds count up from --seed)")
    p.add_argument("--from-png", type=Path,
                   help="take every setting from a PNG written by this script; "
                        "flags given as well override it")
    p.add_argument("--lora",
                   help="LoRA .safetensors file "
                        "(ours, ai-toolkit, kohya/musubi or diffusers layout)")
    p.add_argument("--lora-scale", type=float, help="strength of the LoRA (default 1.0)")
    p.add_argument("--ref", nargs="+", help="reference image(s) for editing")
    p.add_argument("--width", type=int, help="default 1024 (rounded down to a multiple of 16)")
    p.add_argument("--height", type=int, help="default 1024")
    p.add_argument("--steps", type=int,
                   help="default 50 for dev and klein base (28 is a good trade-off for dev), "
                        "4 for step-distilled klein")
    p.add_argument("--guidance", type=float,
                   help="guidance-embedder value (dev only), default 4.0")
    p.add_argument("--cfg", type=float,
                   help="true classifier-free guidance scale against the empty prompt "
                        "(2 rows per DiT pass); default 4.0 for klein base, off otherwise; "
                        "<= 1 turns it off")
    p.add_argument("--seed", type=int, help="default: random (it is stored in the PNG)")
    p.add_argument("--out", type=Path, default=Path("out.png"),
                   help="output PNG; several prompts add _000, _001, ...")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model-dir",
                       help="FLUX.2-dev or -klein snapshot: transformer/ or flux2-dev.safetensors "
                            "(flux-2-klein-*.safetensors), vae/ or ae.safetensors, text_encoder/, "
                            "tokenizer/")
    model.add_argument("--model", choices=["tiny", *RANDOM_MODELS],
                       help="tiny: the random-weight demo model (CPU-friendly); "
                            f"{', '.join(RANDOM_MODELS)}: full-size random weights, to rehearse "
                            "a card's speed and memory (use --device cuda)")
    p.add_argument("--offload", default="auto", choices=planner.STRATEGIES,
                   help="how the DiT's blocks are placed on the GPU (offload.py); "
                        "auto: resident if they fit")
    p.add_argument("--gpu-memory-limit", type=float,
                   help="GiB this run may use on the GPU: the planner's budget and a hard "
                        "allocator cap, to rehearse a smaller card (default: what is free)")
    p.add_argument("--host-memory-limit", type=float,
                   help="GiB of host memory the planner may pin for streamed weights (default: "
                        "what the system reports available, less 10%% or at most 4 GiB)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile whole blocks when all are resident, else the glue between "
                        "the matmuls (flux2.fuse) (default: on with CUDA; ~30 s warm-up)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    return p


def _read_prompts(args) -> list[str]:
    """--prompt, then the lines of --prompts FILE."""
    prompts = [args.prompt] if args.prompt is not None else []
    if args.prompts is not None:
        if not args.prompts.is_file():
            raise LoadError(f"{args.prompts}: no such prompts file; "
                            f"pass a text file with one prompt per line")
        lines = util.read_text(args.prompts).splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    return prompts


def _settings(args) -> dict:
    """Defaults, then the PNG's settings, then the flags given on the command line."""
    s = dict(DEFAULTS, **(read_png_settings(args.from_png) if args.from_png else {}))
    flags = {"width": args.width, "height": args.height, "steps": args.steps,
             "guidance": args.guidance, "cfg": args.cfg, "seed": args.seed, "lora": args.lora,
             "lora_scale": args.lora_scale, "refs": args.ref,
             "model": args.model or args.model_dir}
    s.update({k: v for k, v in flags.items() if v is not None})
    s["prompts"] = _read_prompts(args) or ([s["prompt"]] if "prompt" in s else [])
    if not s["prompts"]:
        raise LoadError("no prompt; pass --prompt TEXT, --prompts FILE or --from-png FILE")
    if not s.get("model"):
        raise LoadError("no model; pass --model-dir FLUX.2-snapshot or --model tiny")
    for key, value in model_defaults(_model_source(s["model"])[1]).items():   # built in: dev's
        s.setdefault(key, value)     # a PNG's or flag's cfg (1 included: off) wins: it is stored
    if s.get("lora") and not Path(s["lora"]).is_file():
        raise LoadError(f"{s['lora']}: no such LoRA file; "
                        f"pass the .safetensors that train.py wrote")
    if "seed" not in s:
        s["seed"] = random.randrange(2 ** 31)
    _check_numbers(s)
    s["width"], s["height"] = snap16(s["width"], s["height"])
    return s


def _model_source(model: str) -> tuple[str, str | None]:
    """(ModelSource's model, its snapshot folder) for a --model name or a --model-dir path."""
    return (model, None) if model in ("tiny", *RANDOM_MODELS) else ("dev", model)


def _check_numbers(s: dict) -> None:
    """The numeric settings' ranges, from the flags or a PNG (NaN and inf fail every check)."""
    for key, low in (("width", 16), ("height", 16), ("steps", 1)):
        if s[key] < low:
            raise LoadError(f"--{key} {s[key]}: must be at least {low}")
    for key in ("lora_scale", "guidance", "cfg"):
        if s.get(key) is not None and not math.isfinite(s[key]):
            raise LoadError(f"--{key.replace('_', '-')} {s[key]}: must be a finite number")


def open_image(path) -> Image.Image:
    """An image file, read now; LoadError naming it when it is not one."""
    try:
        img = Image.open(path)
        img.load()
        return img
    except (OSError, UnidentifiedImageError) as e:
        raise LoadError(f"{path}: cannot open this image ({e}); "
                        f"pass a PNG/JPEG/WebP file") from None


def warn_if_edit_lora(path) -> None:
    """Warn that the LoRA at `path` is an edit LoRA (its metadata says so): it learned to change
    reference images, and sampling it without --ref leaves what it learned unused."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:           # an unreadable file: lora.load names it with its own error
        return
    if meta.get("edit") == "true":
        warnings.warn(f"{path} is an edit LoRA trained with {meta.get('references', '?')} "
                      f"reference image(s); pass them with --ref")


def run(args) -> list[Path]:
    """Generate every prompt with the settings of `args`; returns the PNG paths written. Running
    out of memory ends in planner.OutOfMemory naming the budget and the plan."""
    with offload.OutOfMemoryGuard(gpu_memory_limit=args.gpu_memory_limit,
                                  host_memory_limit=args.host_memory_limit) as memory:
        return _run(args, memory)


def _run(args, memory: offload.OutOfMemoryGuard) -> list[Path]:
    """run()'s three steps: text features, the placed DiT, the images."""
    s = _settings(args)
    n = len(s["prompts"])
    outs = [args.out] if n == 1 else \
        [args.out.with_name(f"{args.out.stem}_{i:03d}{args.out.suffix}") for i in range(n)]
    check_out(args.out)                     # before the work, not after it
    # the tiny demo, a random model, or a snapshot: a missing part fails here, before any loading
    source = ModelSource(*_model_source(s["model"]), default_device(args.device),
                         gpu_memory_limit=args.gpu_memory_limit)
    refs = [open_image(r) for r in s["refs"]]
    if s.get("lora") and not refs:
        warn_if_edit_lora(s["lora"])
    ref_tokens = sum(t.shape[1] * t.shape[2] // 256 for t in prepare_refs(refs, s["refs"]))
    offload.cap_gpu_memory(source.device, args.gpu_memory_limit)

    # 1. every prompt (and CFG's empty one) through the text encoder in one sweep, then free it:
    # it and the DiT do not fit on one GPU
    memory.during = "encoding the prompts"
    cfg = (s.get("cfg") or 0) > 1                                  # klein base: CFG against ""
    encode = source.load_text_encoder()
    txt = encode(s["prompts"] + [""] * cfg)                        # [N (+ 1), 512, ctx]
    txt, txt_uncond = (txt[:-1], txt[-1:]) if cfg else (txt, None)
    del encode
    free_cuda()

    # 2. the autoencoder, then the DiT with the LoRA, placed by offload.py in what is left
    ae = source.load_ae()
    tokens = (s["width"] // 16) * (s["height"] // 16) + ref_tokens + txt.shape[1]
    compile = source.device.type == "cuda" if args.compile is None else args.compile

    def with_lora(dit):            # on meta: creates the adapters; placed and filled: their values
        if s.get("lora"):
            lora.load(dit, s["lora"], scale=s["lora_scale"])

    memory.during = "placing the DiT"
    dit, plan = placed_dit(source, add_adapters=with_lora, set_adapters=with_lora,
                           strategy=args.offload, batch_size=1 if txt_uncond is None else 2,
                           tokens_per_sample=tokens, train=False,
                           gpu_memory_limit=args.gpu_memory_limit, compile=compile,
                           host_memory_limit=offload.host_budget(args.host_memory_limit),
                           reserve_bytes=ae.decode_bytes(height=s["height"], width=s["width"]))
    memory.during, memory.plan = "sampling", plan
    flux2.fuse(compile and not plan.compiled)     # streamed: compile the glue between the matmuls
    models = Models(device=source.device, dtype=source.dtype, dit=dit, ae=ae)

    # 3. sample and decode, one image at a time
    for i, (prompt, out) in enumerate(zip(s["prompts"], outs)):
        seed = s["seed"] + i
        img, = generate(models, width=s["width"], height=s["height"], steps=s["steps"],
                        guidance=s["guidance"], seeds=[seed], refs=refs, txt=txt[i:i + 1],
                        cfg=s.get("cfg"), txt_uncond=txt_uncond)
        save_or_keep(img, out, _png_settings(s, prompt=prompt, seed=seed))
        print(f"wrote {out} (seed {seed})")
    return outs


def _png_settings(s: dict, *, prompt: str, seed: int) -> dict:
    """What a PNG stores of its settings: enough for --from-png to make the same pixels."""
    return {"prompt": prompt, "seed": seed, "steps": s["steps"], "guidance": s["guidance"],
            "cfg": s.get("cfg"), "width": s["width"], "height": s["height"],
            "lora": s.get("lora"), "lora_scale": s["lora_scale"] if s.get("lora") else None,
            "refs": s["refs"], "model": s["model"]}


def check_out(path: Path) -> None:
    """Refuse an output PNG path that saving would refuse: a folder, a missing or unwritable
    parent folder."""
    if path.is_dir():
        raise LoadError(f"--out {path}: is a folder; name a .png file")
    if not path.parent.is_dir():
        raise LoadError(f"--out {path}: the folder {path.parent} does not exist; create it or "
                        f"name another")
    util.check_writable(path.parent, flag="--out")


def save_or_keep(img: Image.Image, path: Path, settings: dict) -> None:
    """save_png to `path`; when that fails after all the sampling, the image goes to a new file in
    the temp folder instead and the error (exit 2) says where."""
    try:
        save_png(img, path, settings)
    except OSError as e:
        e.filename = str(path)
        fd, kept = tempfile.mkstemp(prefix=f"{path.stem}-", suffix=".png")   # a new name
        os.close(fd)
        save_png(img, kept, settings)
        raise LoadError(f"{util.os_error_line(e)}; the image is saved as {kept}") from None


def main(argv=None) -> int:
    """CLI entry point; a user mistake, a full or read-only disk or running out of memory ends in
    one line on stderr and exit code 2."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch; use --device cpu")

    def body() -> int:
        run(args)
        return 0

    return util.guard(body, user_errors=(lora.LoRAError, planner.PlanError))


if __name__ == "__main__":
    sys.exit(main())
