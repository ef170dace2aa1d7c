"""The FLUX.2 [dev] / [klein] sampler and its CLI: text-to-image, editing with reference images, sampling with a LoRA.

Follows docs/flux2_reference.md §7 (7.1 schedule, 7.2 Euler loop, 7.3 reference images) and §11
(end-to-end), with the ids and token order of §4 and the byte conversion of §5.4. One image per forward pass:

    prompt --tokenizer + Mistral (layers 10/20/30)--> txt [1, 512, 15360]        (text encoder freed afterwards)
    seed --CPU generator--> noise [1, 128, H/16, W/16] --pack--> x [1, L, 128]     (L = H/16 * W/16)
    refs --RGB, cap area, crop /16, [-1,1]--> ae.encode --pack--> [1, L_ref, 128], ids t = 10, 20, ...
    for t, t_next in schedule(steps, L): x += (t_next - t) * dit([x ; refs], t, txt, guidance)[:, :L]
    x --unpack--> ae.decode --clamp(-1, 1), (x + 1) * 127.5, byte--> PNG with the settings as text metadata

klein (§6.2, §7.2) swaps in Qwen3 (layers 9/18/27, right-padded prompts) and has no guidance embedder; its base
models use true CFG (--cfg, default 4.0 for them): v = v("") + cfg * (v(prompt) - v("")), both rows in one batch.

    python sample.py --model tiny --device cpu --prompt "a red fox" --width 256 --height 256 --steps 8 --out fox.png
    python sample.py --model-dir FLUX.2-dev --prompt "..." --lora my.safetensors --lora-scale 0.8 --ref in.png
    python sample.py --from-png fox.png --out again.png          # same settings, same pixels
"""
import argparse
import gc
import json
import math
import random
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

import flux2
import lora
import offload
import text_encoder
import vae
from flux2 import PRESETS, Flux2, LoadError, image_ids, pack, text_ids, unpack
from text_encoder import TEXT_PRESETS, MistralEncoder, Tokenizer
from vae import AE_PRESETS, AutoEncoder


# ----------------------------------------------------------------------------------------------------------
# Schedule and Euler loop (reference §7.1, §7.2)

def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """The resolution- and step-dependent time shift: linear in L between fits at 10 and 200 steps, step-free above
    4300 tokens (so the schedule jumps there)."""
    a1, b1 = 8.73809524e-05, 1.89833333     # fit at 10 steps
    a2, b2 = 0.00016927, 0.45666666         # fit at 200 steps
    m200 = a2 * image_seq_len + b2
    if image_seq_len > 4300:
        return m200
    m10 = a1 * image_seq_len + b1
    return m10 + (m200 - m10) * (num_steps - 10) / 190


def schedule(num_steps: int, image_seq_len: int) -> list[float]:
    """num_steps + 1 times from 1 (noise) to 0 (image): a uniform grid pushed towards t=1 by exp(mu).
    Computed in float32 like the reference, so the values are bit-identical to it."""
    mu = empirical_mu(image_seq_len, num_steps)
    t = torch.linspace(1, 0, num_steps + 1)
    return (math.exp(mu) / (math.exp(mu) + (1 / t - 1))).tolist()


@torch.no_grad()
def denoise(model, noise_tokens: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: list[float],
            guidance: float, ref_tokens: Tensor | None = None, ref_ids: Tensor | None = None,
            cfg: float | None = None, txt_uncond: Tensor | None = None) -> Tensor:
    """Euler-integrate the predicted velocity from t=1 to t=0: noise_tokens [B, L, 128] -> image tokens, same shape.
    Reference tokens [B, L_ref, 128] (clean, never updated) are appended after the target at every step.
    With cfg (klein base, reference §7.2): uncond and cond rows in one batch, v = v_u + cfg (v_c - v_u)."""
    x = noise_tokens
    B, L = x.shape[:2]
    n = 2 * B if cfg is not None else B                                # rows per forward
    if cfg is not None:
        txt = torch.cat([txt_uncond.expand_as(txt), txt])              # [2B, L_txt, ctx]: uncond rows first
    # dev is guidance-distilled: no CFG, the guidance value only feeds the guidance embedder (klein has none)
    g = torch.full((n,), guidance, dtype=x.dtype, device=x.device)
    ids = img_ids if ref_ids is None else torch.cat([img_ids, ref_ids], dim=1)      # [B, L + L_ref, 4]
    ids, txt_ids = ids.repeat(n // len(ids), 1, 1), txt_ids.repeat(n // len(txt_ids), 1, 1)
    for t_cur, t_next in zip(timesteps[:-1], timesteps[1:]):
        inp = x if ref_tokens is None else torch.cat([x, ref_tokens.expand(B, -1, -1)], dim=1)
        inp = inp.repeat(n // B, 1, 1)
        t = torch.full((n,), t_cur, dtype=x.dtype, device=x.device)   # in the model dtype, as the reference
        v = model(inp, ids, txt, txt_ids, t, g)[:, :L]                 # velocity of the target tokens only
        if cfg is not None:
            v_u, v_c = v.chunk(2)
            v = v_u + cfg * (v_c - v_u)
        x = x + (t_next - t_cur) * v
    return x


def noise(seed: int, h16: int, w16: int, channels: int = 128) -> Tensor:
    """The initial latent [1, channels, h16, w16], float32, drawn directly in the packed space (not as 32-channel noise
    at /8). The generator runs on the CPU so a seed gives the same image on any device; the reference draws on
    CUDA in bf16, so its seeds map to different (equally distributed) noise."""
    return torch.randn(1, channels, h16, w16, generator=torch.Generator("cpu").manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------
# Reference images for editing (reference §7.3)

def prepare_ref(img: Image.Image, limit: int, name: str = "reference image") -> Tensor:
    """A reference image as the reference prepares it: RGB, area capped at `limit` (LANCZOS), centre-cropped to
    multiples of 16 -> pixels [3, H, W] in [-1, 1], float32."""
    img = img.convert("RGB")
    w, h = img.size
    if min(w, h) < 64 or max(w / h, h / w) > 8:
        raise LoadError(f"{name}: {w}x{h} is too small or too elongated; use sides >= 64 px and an aspect ratio <= 8")
    if w * h > limit:
        s = math.sqrt(limit / (w * h))
        img = img.resize((int(w * s), int(h * s)), Image.Resampling.LANCZOS)
        w, h = img.size
    left, top = (w - w // 16 * 16) // 2, (h - h // 16 * 16) // 2
    img = img.crop((left, top, left + w // 16 * 16, top + h // 16 * 16))
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255     # ToTensor: [3, H, W] in [0, 1]
    return 2 * x - 1


def prepare_refs(images: list[Image.Image], names: list[str] | None = None) -> list[Tensor]:
    """All reference images of one call; the area cap is 2024^2 (sic) for a single one, 1024^2 each for several."""
    limit = 2024 ** 2 if len(images) == 1 else 1024 ** 2
    return [prepare_ref(img, limit, name) for img, name in zip(images, names or ["reference image"] * len(images))]


@torch.no_grad()
def encode_refs(ae: AutoEncoder, images: list[Image.Image], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Reference images -> clean latent tokens [1, L_ref, 128] in `dtype` and their ids [1, L_ref, 4] with
    t = 10, 20, ... (one time slot per reference), in reference order."""
    p = next(ae.parameters())
    tokens, ids = [], []
    for r, pixels in enumerate(prepare_refs(images)):
        z = ae.encode(pixels[None].to(p.device, p.dtype))                  # [1, 128, h, w]
        tokens.append(pack(z))
        ids.append(image_ids(*z.shape[-2:], t=10 + 10 * r))
    return torch.cat(tokens, dim=1).to(dtype), torch.cat(ids)[None].to(p.device)


# ----------------------------------------------------------------------------------------------------------
# Models: the tiny CPU demo stack or a FLUX.2-dev snapshot

@dataclass
class Models:
    """What sampling needs. Any part may be None: the text encoder is freed once the prompts are encoded."""
    device: torch.device
    dtype: torch.dtype                        # DiT, text encoder and Euler state; the autoencoder runs in >= float32
    dit: Flux2 | None = None
    ae: AutoEncoder | None = None
    text_encoder: MistralEncoder | None = None
    tokenizer: Tokenizer | None = None


# --model NAME for full-size runs without weights (speed and memory checks): the DiT preset and its text encoder
RANDOM_MODELS = {"dev-random": ("dev", "mistral-small-3.2"), "klein-4b-random": ("klein-4b", "qwen3-4b"),
                 "klein-9b-random": ("klein-9b", "qwen3-8b")}


def snapshot_paths(model_dir) -> dict[str, Path]:
    """The parts of a FLUX.2 snapshot under the names used here; LoadError naming the first missing part."""
    p = flux2.find_snapshot(Path(model_dir).expanduser())
    return {"dit": p["transformer"], "ae": p["vae"], "text": p["text_encoder"], "tokenizer": p["tokenizer"]}


def _tiny(build, seed: int):
    """A tiny module with random weights from `seed`, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def load_models(model_dir=None, *, tiny: bool = False, device="cpu", dtype: torch.dtype = torch.bfloat16,
                parts=("text", "dit", "ae"), dit_device=None, text_layers=None, seed: int = 0) -> Models:
    """Load `parts` of a FLUX.2 dev or klein snapshot, or build the tiny stack (random weights from `seed`; the
    trainer's --model tiny gets the same weights). dit_device="cpu" (or "meta": no values read, a snapshot's only)
    leaves the DiT for offload.prepare to place. text_layers None: the encoder family's FLUX.2 layers (dev: Mistral
    10/20/30, klein: Qwen3 9/18/27)."""
    device = torch.device(device)
    ae_dtype = torch.promote_types(dtype, torch.float32)         # ae.safetensors is float32 and small
    m = Models(device=device, dtype=dtype)
    paths = None if tiny else snapshot_paths(model_dir)          # fails before anything heavy is read
    if paths is not None:
        text_encoder.check_pair(paths["dit"], paths["text"], text_layers)   # e.g. a klein DiT next to dev's Mistral
    if "text" in parts:
        if tiny:
            m.tokenizer = Tokenizer.tiny()
            m.text_encoder = _tiny(lambda: MistralEncoder(TEXT_PRESETS["tiny"]), seed + 2).to(device, dtype)
        else:
            m.tokenizer = Tokenizer(paths["tokenizer"])
            family = text_encoder.text_family(paths["text"])
            if m.tokenizer.family != family:
                raise LoadError(f"{paths['tokenizer']}: a {m.tokenizer.family} tokenizer next to a {family} text "
                                f"encoder; use the snapshot's own tokenizer/")
            m.text_encoder = text_encoder.load_text_encoder(paths["text"], text_layers, device=device, dtype=dtype)
    if "dit" in parts:
        at = dit_device or device
        m.dit = _tiny(lambda: Flux2(PRESETS["tiny"]), seed).to(at, dtype) if tiny else \
            flux2.load_flux2(paths["dit"], device=at, dtype=dtype)
    if "ae" in parts:
        m.ae = _tiny(lambda: AutoEncoder(AE_PRESETS["tiny"]), seed + 1).to(device, ae_dtype) if tiny else \
            vae.load_ae(paths["ae"], device=device, dtype=ae_dtype)
    for module in (m.dit, m.ae, m.text_encoder):
        if module is not None:
            module.eval().requires_grad_(False)
    return m


@torch.no_grad()
def encode_text(models: Models, prompts: list[str]) -> Tensor:
    """Prompts -> text features [N, 512, ctx] in the model dtype. One prompt per forward, so a prompt's features
    do not depend on the others it came with (a PNG's settings reproduce it alone)."""
    if models.text_encoder is None or models.tokenizer is None:
        raise ValueError("the text encoder is not loaded (freed after encoding?); pass precomputed txt= features")
    out = []
    for prompt in prompts:
        ids, mask = models.tokenizer.encode_prompts([prompt])
        out.append(models.text_encoder(ids.to(models.device), mask.to(models.device)).to(models.dtype))
    return torch.cat(out)


def free_text_encoder(models: Models) -> None:
    """Drop the text encoder so the DiT gets its memory (it is ~35 GB of bf16 for dev)."""
    models.text_encoder = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def fill_random(model: torch.nn.Module, device: torch.device):
    """Weights ~ N(0, 0.02), norm scales 1, LoRA as lora.py starts it (A ~ N(0, 1/r²), B = 0), generated on the
    device and copied to wherever the plan put each tensor (host copies and FSDP2 shards included); BatchNorm stats
    mean 0, variance 1. For full-size speed and memory runs without downloaded weights (RANDOM_MODELS)."""
    from torch.distributed.tensor import DTensor
    g = torch.Generator(device).manual_seed(0)
    for name, p in model.named_parameters():
        t = p.to_local() if isinstance(p, DTensor) else p.data
        if name.endswith("lora_B"):
            t.zero_()
        elif t.ndim == 1:
            t.fill_(1.0)
        else:
            std = 1 / t.shape[0] if name.endswith("lora_A") else 0.02
            t.copy_(torch.randn(t.shape, generator=g, device=device, dtype=t.dtype).mul_(std))
    for name, b in model.named_buffers():
        b.fill_(1 if name.endswith("running_var") else 0)



class ModelSource:
    """The trainer's view of a model: each part loaded on demand, plus ids that key its caches."""

    def __init__(self, model: str | None, model_dir, device, dtype: torch.dtype | None = None):
        self.tiny, self.model_dir, self.device = model == "tiny", model_dir, torch.device(device)
        self.random = RANDOM_MODELS.get(model)    # full-size shapes, random weights: speed and memory runs only
        self.name = model
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.paths = None if self.tiny or self.random else snapshot_paths(model_dir)   # a missing part fails first
        self._ae = None

    def _load(self, part: str, **kw) -> Models:
        if self.random:
            return self._random(part)
        return load_models(self.model_dir, tiny=self.tiny, device=self.device, dtype=self.dtype, parts=(part,), **kw)

    def _random(self, part: str) -> Models:
        """One part at full size with random weights; the DiT stays on meta for offload.prepare to place."""
        dit, text = self.random
        build, dtype = {"ae": (lambda: AutoEncoder(AE_PRESETS["flux2"]), torch.float32),
                        "text": (lambda: MistralEncoder(TEXT_PRESETS[text]), self.dtype),
                        "dit": (lambda: Flux2(PRESETS[dit]), self.dtype)}[part]
        with torch.device("meta"):
            module = build().to(dtype).requires_grad_(False).eval()
        if part != "dit":
            module = module.to_empty(device=self.device)
            fill_random(module, self.device)
        m = Models(device=self.device, dtype=self.dtype, tokenizer=Tokenizer.tiny())
        setattr(m, {"ae": "ae", "text": "text_encoder", "dit": "dit"}[part], module)
        return m

    @property
    def ae_id(self) -> str:
        """Names the autoencoder weights (part of the latent cache key)."""
        if self.tiny or self.random:
            return f"{self.name}-ae-seed0"
        return str(self.paths["ae"].resolve())

    @property
    def text_id(self) -> str:
        """Names the text encoder and tokenizer (part of the text cache key)."""
        if self.tiny or self.random:
            return f"{self.name}-text-seed0"
        return f"{self.paths['text'].resolve()}|{self.paths['tokenizer'].resolve()}"

    def load_ae(self) -> AutoEncoder:
        """The autoencoder on the device (loaded once, kept for previews)."""
        self._ae = self._ae or self._load("ae").ae
        return self._ae

    def load_text_encoder(self):
        """A function prompts -> text features [N, 512, ctx]; dropping it frees the encoder."""
        models = self._load("text")
        return lambda prompts: encode_text(models, prompts)

    def load_dit(self) -> Flux2:
        """The DiT in the model dtype for offload.prepare to place: built on meta for a snapshot and the random models
        (prepare allocates each tensor where the plan puts it, on the GPU, in pinned host memory or as this rank's
        FSDP2 shard; fill_dit or fill_random then writes the values), so the whole DiT never sits in host memory;
        on the CPU for the tiny model."""
        return self._load("dit", dit_device="cpu" if self.tiny else "meta").dit

    def fill_dit(self, dit: Flux2) -> None:
        """Read the snapshot's DiT values into the DiT load_dit() built and offload.prepare placed, one tensor at a
        time from the memory-mapped files; a sharded rank copies only its own rows (flux2.load_flux2_into)."""
        flux2.load_flux2_into(dit, self.paths["dit"])

    def for_preview(self, dit: Flux2) -> Models:
        """Models for `generate` with precomputed `txt` features: this DiT and the autoencoder."""
        return Models(device=self.device, dtype=self.dtype, dit=dit, ae=self.load_ae())


# ----------------------------------------------------------------------------------------------------------
# Generation

def snap16(width: int, height: int) -> tuple[int, int]:
    """Width and height rounded down to multiples of 16 (VAE /8, then 2x2 patches), warning when that changes them."""
    w, h = width // 16 * 16, height // 16 * 16
    if w < 16 or h < 16:
        raise ValueError(f"image size {width}x{height} is too small; use at least 16x16")
    if (w, h) != (width, height):
        warnings.warn(f"image size {width}x{height} is not a multiple of 16; using {w}x{h}")
    return w, h


@torch.no_grad()
def generate_tensors(models: Models, prompts: list[str] | None = None, *, width: int, height: int, steps: int,
                     guidance: float, seeds: list[int], refs: list[Image.Image] | None = None,
                     txt: Tensor | None = None, cfg: float | None = None, txt_uncond: Tensor | None = None) -> Tensor:
    """Like `generate`, but returns the decoded pixels [N, 3, H, W] clamped to [-1, 1] (the autoencoder's dtype)."""
    if txt is None:
        txt = encode_text(models, [prompts] if isinstance(prompts, str) else prompts)
    cfg = cfg if cfg is not None and cfg > 1 else None                 # as diffusers: CFG only above 1
    if cfg is not None and txt_uncond is None:
        txt_uncond = encode_text(models, [""])                         # klein base's negative prompt is empty
    if len(seeds) != len(txt):
        raise ValueError(f"{len(txt)} prompts but {len(seeds)} seeds; pass one seed per prompt")
    width, height = snap16(width, height)
    h16, w16 = height // 16, width // 16
    dev, dt, dit, ae = models.device, models.dtype, models.dit, models.ae
    timesteps = schedule(steps, h16 * w16)                             # refs do not count towards L
    img_ids = image_ids(h16, w16)[None].to(dev)                        # [1, L, 4]
    txt_ids = text_ids(txt.shape[1])[None].to(dev)                     # [1, 512, 4]
    ref_tokens, ref_ids = encode_refs(ae, refs, dt) if refs else (None, None)
    ae_dtype = next(ae.parameters()).dtype
    was_training = dit.training
    dit.eval()                                                         # e.g. LoRA dropout off during previews
    out = []
    try:
        for i, seed in enumerate(seeds):
            x = pack(noise(seed, h16, w16, dit.cfg.in_channels)).to(dev, dt)              # [1, L, 128]
            x = denoise(dit, x, img_ids, txt[i:i + 1].to(dev, dt), txt_ids, timesteps, guidance, ref_tokens, ref_ids,
                        cfg, None if cfg is None else txt_uncond.to(dev, dt))
            out.append(ae.decode(unpack(x, h16, w16).to(ae_dtype)).clamp(-1, 1))         # [1, 3, H, W]
    finally:
        dit.train(was_training)
    return torch.cat(out)


def to_pil(pixels: Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> 8-bit RGB, truncating like the reference ((x + 1) * 127.5 then byte)."""
    return Image.fromarray(((pixels.float() + 1) * 127.5).byte().permute(1, 2, 0).cpu().numpy())


def generate(models: Models, prompts: list[str] | None = None, *, width: int, height: int, steps: int,
             guidance: float, seeds: list[int], refs: list[Image.Image] | None = None,
             txt: Tensor | None = None, cfg: float | None = None,
             txt_uncond: Tensor | None = None) -> list[Image.Image]:
    """One image per prompt (or per row of precomputed txt features [N, 512, ctx]) and seed; refs condition all.
    cfg > 1: true classifier-free guidance against txt_uncond (default: the empty prompt's features)."""
    return [to_pil(x) for x in generate_tensors(models, prompts, width=width, height=height, steps=steps,
                                                guidance=guidance, seeds=seeds, refs=refs, txt=txt, cfg=cfg,
                                                txt_uncond=txt_uncond)]


# ----------------------------------------------------------------------------------------------------------
# PNG metadata: the settings that reproduce an image

META = {"prompt": str, "seed": int, "steps": int, "guidance": float, "width": int, "height": int, "lora": str,
        "lora_scale": float, "refs": json.loads, "model": str, "cfg": float}   # key -> parser of its text


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
        raise LoadError(f"{path}: no sample.py settings in this PNG; pass an image written by sample.py")
    return {key: parse(text[key]) for key, parse in META.items() if key in text}


# ----------------------------------------------------------------------------------------------------------
# CLI

DEFAULTS = {"width": 1024, "height": 1024, "guidance": 4.0, "lora_scale": 1.0, "refs": []}


def klein_kind(model_dir) -> str | None:
    """'base' or 'distilled' for a klein snapshot (no guidance embedder), None for dev. Base when the snapshot's
    model_index.json says is_distilled false, or (no such entry) when the snapshot folder's name (the repo's name
    for an HF cache snapshot, models--...--FLUX.2-klein-base-4B/snapshots/<hash>) or the DiT file's contains "base"."""
    dit = snapshot_paths(model_dir)["dit"]
    if flux2.dit_config(dit).use_guidance_embed:
        return None
    index = Path(model_dir).expanduser() / "model_index.json"
    distilled = json.loads(index.read_text()).get("is_distilled") if index.is_file() else None
    if distilled is None:
        folder = Path(model_dir).expanduser().absolute()
        names = [folder.name, dit.name] + ([folder.parent.parent.name] if folder.parent.name == "snapshots" else [])
        distilled = not any("base" in n.lower() for n in names)
    return "distilled" if distilled else "base"


def model_defaults(model_dir) -> dict:
    """Steps and CFG for a snapshot (None: the dev-shaped tiny demo), reference §1.1: dev 50 steps, no CFG (it has
    a guidance embedder); klein base 50 steps, CFG 4.0; step-distilled klein 4 steps, no CFG."""
    kind = None if model_dir is None else klein_kind(model_dir)
    return {None: {"steps": 50}, "base": {"steps": 50, "cfg": 4.0}, "distilled": {"steps": 4}}[kind]


def _open_image(path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
        return img
    except (OSError, UnidentifiedImageError) as e:
        raise LoadError(f"{path}: cannot open this image ({e}); pass a PNG/JPEG/WebP file") from None


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help lines that end with the flag's default, unless the text already states it (or there is none)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, description="Sample FLUX.2 [dev] / [klein] images, "
                                "optionally with a LoRA and reference images.")
    p.add_argument("--prompt", help="the prompt")
    p.add_argument("--prompts", type=Path, help="a text file with one prompt per line (seeds count up from --seed)")
    p.add_argument("--from-png", type=Path, help="take every setting from a PNG written by this script; "
                                                 "flags given as well override it")
    p.add_argument("--lora", help="LoRA .safetensors file (ours, ai-toolkit, kohya/musubi or diffusers layout)")
    p.add_argument("--lora-scale", type=float, help="strength of the LoRA (default 1.0)")
    p.add_argument("--ref", nargs="+", help="reference image(s) for editing")
    p.add_argument("--width", type=int, help="default 1024 (rounded down to a multiple of 16)")
    p.add_argument("--height", type=int, help="default 1024")
    p.add_argument("--steps", type=int, help="default 50 for dev and klein base (28 is a good trade-off for dev), "
                                             "4 for step-distilled klein")
    p.add_argument("--guidance", type=float, help="guidance-embedder value (dev only), default 4.0")
    p.add_argument("--cfg", type=float, help="true classifier-free guidance scale against the empty prompt, "
                                             "(2 rows per DiT pass); default 4.0 for klein base, off otherwise; "
                                             "<= 1 turns it off")
    p.add_argument("--seed", type=int, help="default: random (it is stored in the PNG)")
    p.add_argument("--out", type=Path, default=Path("out.png"), help="output PNG; several prompts add _000, _001, ...")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model-dir", help="FLUX.2-dev or -klein snapshot: transformer/ or flux2-dev.safetensors "
                                           "(flux-2-klein-*.safetensors), vae/ or ae.safetensors, text_encoder/, "
                                           "tokenizer/")
    model.add_argument("--model", choices=["tiny"], help="the tiny random-weight demo model (CPU-friendly)")
    p.add_argument("--offload", default="auto", choices=offload.STRATEGIES,
                   help="how the DiT's blocks are placed on the GPU (offload.py); auto: resident if they fit")
    p.add_argument("--gpu-memory-limit", type=float,
                   help="GiB this run may use on the GPU: the planner's budget and a hard allocator cap, to rehearse a "
                        "smaller card (default: what is free)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile whole blocks when all are resident, else the glue between the matmuls "
                        "(flux2.fuse) (default: on with CUDA; ~30 s warm-up)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    return p


def _settings(args) -> dict:
    """Defaults, then the PNG's settings, then the flags given on the command line."""
    s = dict(DEFAULTS, **(read_png_settings(args.from_png) if args.from_png else {}))
    flags = {"width": args.width, "height": args.height, "steps": args.steps, "guidance": args.guidance,
             "cfg": args.cfg,
             "seed": args.seed, "lora": args.lora, "lora_scale": args.lora_scale, "refs": args.ref,
             "model": "tiny" if args.model else args.model_dir}
    s.update({k: v for k, v in flags.items() if v is not None})
    prompts = [args.prompt] if args.prompt is not None else []
    if args.prompts is not None:
        if not args.prompts.is_file():
            raise LoadError(f"{args.prompts}: no such prompts file; pass a text file with one prompt per line")
        prompts += [line.strip() for line in args.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    s["prompts"] = prompts or ([s["prompt"]] if "prompt" in s else [])
    if not s["prompts"]:
        raise LoadError("no prompt; pass --prompt TEXT, --prompts FILE or --from-png FILE")
    if not s.get("model"):
        raise LoadError("no model; pass --model-dir FLUX.2-snapshot or --model tiny")
    for key, value in model_defaults(None if s["model"] == "tiny" else s["model"]).items():
        s.setdefault(key, value)                   # a PNG's or flag's cfg (1 included: off) wins, so it is stored
    if s.get("lora") and not Path(s["lora"]).is_file():
        raise LoadError(f"{s['lora']}: no such LoRA file; pass the .safetensors that train.py wrote")
    if "seed" not in s:
        s["seed"] = random.randrange(2 ** 31)
    s["width"], s["height"] = snap16(s["width"], s["height"])
    return s


def placed_dit(model_dir, *, tiny: bool, device, dtype, lora_file=None, lora_scale: float = 1.0, strategy="auto",
               tokens: int, rows: int = 1, gpu_memory_limit=None, compile: bool = False) -> tuple[Flux2, offload.Plan]:
    """The DiT for sampling with the LoRA, placed by offload.prepare (which prints the plan) for forwards of `rows`
    samples of `tokens` tokens (2 rows with CFG). A snapshot's DiT is built on meta, takes the LoRA's adapters
    (shapes only), is placed, and only then read from the memory-mapped files into its places, one tensor at a
    time: the whole DiT never sits in host memory. Then the adapters' values."""
    dit = load_models(model_dir, tiny=tiny, device=device, dtype=dtype, parts=("dit",),
                      dit_device="cpu" if tiny else "meta").dit
    if lora_file:
        lora.load(dit, lora_file, scale=lora_scale)        # on meta: creates the adapters, so the plan places them
    plan = offload.prepare(dit, dit.blocks, strategy=strategy, device=device, batch_size=rows, tokens_per_sample=tokens,
                           train=False, gpu_memory_limit=gpu_memory_limit, compile=compile)
    if not tiny:
        flux2.load_flux2_into(dit, snapshot_paths(model_dir)["dit"])
        if lora_file:
            lora.load(dit, lora_file, scale=lora_scale)    # fills the placed adapters in place
    return dit, plan


def run(args) -> list[Path]:
    """Generate every prompt with the settings of `args`; returns the PNG paths written."""
    s = _settings(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tiny, model_dir = s["model"] == "tiny", None if s["model"] == "tiny" else s["model"]
    if not tiny:
        snapshot_paths(model_dir)                                          # a missing part fails before loading
    refs = [_open_image(r) for r in s["refs"]]
    ref_tokens = sum(t.shape[1] * t.shape[2] // 256 for t in prepare_refs(refs, s["refs"]))

    offload.cap_gpu_memory(device, args.gpu_memory_limit)
    # 1. every prompt through the text encoder, which is then freed: it and the DiT do not fit on one GPU together
    models = load_models(model_dir, tiny=tiny, device=device, dtype=dtype, parts=("text",))
    txt = encode_text(models, s["prompts"])
    txt_uncond = encode_text(models, [""]) if (s.get("cfg") or 0) > 1 else None   # klein base: CFG vs ""
    free_text_encoder(models)

    # 2. the autoencoder, then the DiT with the LoRA, placed by offload.py (blocks resident or streamed) in what is left
    models.ae = load_models(model_dir, tiny=tiny, device=device, dtype=dtype, parts=("ae",)).ae
    tokens = (s["width"] // 16) * (s["height"] // 16) + ref_tokens + txt.shape[1]
    compile = device.type == "cuda" if args.compile is None else args.compile
    models.dit, plan = placed_dit(model_dir, tiny=tiny, device=device, dtype=dtype, lora_file=s.get("lora"),
                                  lora_scale=s["lora_scale"], strategy=args.offload, tokens=tokens,
                                  rows=1 if txt_uncond is None else 2, gpu_memory_limit=args.gpu_memory_limit,
                                  compile=compile)
    flux2.fuse(compile and not plan.compiled)      # weights streamed: compile the glue between the matmuls instead

    # 3. sample and decode, one image at a time
    outs = [args.out] if len(s["prompts"]) == 1 else \
        [args.out.with_name(f"{args.out.stem}_{i:03d}{args.out.suffix}") for i in range(len(s["prompts"]))]
    for i, (prompt, out) in enumerate(zip(s["prompts"], outs)):
        seed = s["seed"] + i
        img, = generate(models, width=s["width"], height=s["height"], steps=s["steps"], guidance=s["guidance"],
                        seeds=[seed], refs=refs, txt=txt[i:i + 1], cfg=s.get("cfg"), txt_uncond=txt_uncond)
        save_png(img, out, {"prompt": prompt, "seed": seed, "steps": s["steps"], "guidance": s["guidance"],
                            "cfg": s.get("cfg"),
                            "width": s["width"], "height": s["height"], "lora": s.get("lora"),
                            "lora_scale": s["lora_scale"] if s.get("lora") else None, "refs": s["refs"],
                            "model": s["model"]})
        print(f"wrote {out} (seed {seed})")
    return outs


def main(argv=None) -> int:
    """CLI entry point; a user mistake ends in one line on stderr and exit code 2."""
    args = _parser().parse_args(argv)
    try:
        run(args)
    except (LoadError, lora.LoRAError, offload.PlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
