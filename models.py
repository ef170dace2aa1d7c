"""Assembling FLUX.2 models for a run, in one place: the parts of a snapshot folder (dev or klein), the tiny CPU
model, and full-size models with random weights for speed and memory runs. The DiT is built on the meta device,
given its adapters, placed by offload.py (resident, streamed or FSDP2-sharded) and only then filled from the
memory-mapped files, so the whole DiT never sits in host memory. train.py, sample.py and bench.py all build
their models here.

Follows docs/flux2_reference.md §1.1 (snapshot layout, dev and klein) and §11 (end to end).
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

import offload
import text_encoder
import vae
import weights
from flux2 import PRESETS, Flux2
from text_encoder import TEXT_PRESETS, MistralEncoder, Tokenizer
from util import LoadError, free_cuda
from vae import AE_PRESETS, AutoEncoder


# ----------------------------------------------------------------------------------------------------------
# A whole FLUX.2 snapshot (dev, or klein: reference §1.1)

SNAPSHOT_PARTS = {  # part -> accepted locations inside a FLUX.2 snapshot directory, first match wins
    "transformer": ["flux2-dev.safetensors", "transformer", *(f"flux-2-klein-{v}.safetensors" for v in
                    ("4b", "9b", "base-4b", "base-9b"))],
    "vae": ["ae.safetensors", "vae"],
    "text_encoder": ["text_encoder"],
    "tokenizer": ["tokenizer/tokenizer.json", "tokenizer/tekken.json", "tokenizer.json", "tekken.json"],
}


def find_snapshot(model_dir) -> dict[str, Path]:
    """Locate the DiT, VAE, text encoder and tokenizer in a FLUX.2 snapshot; say exactly what is missing."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise LoadError(f"{model_dir}: not a folder; --model-dir takes a FLUX.2 (dev or klein) snapshot directory")
    found = {}
    for part, candidates in SNAPSHOT_PARTS.items():
        hit = next((model_dir / c for c in candidates if (model_dir / c).exists()), None)
        if hit is None:
            raise LoadError(f"{model_dir}: no {part} found (looked for {', '.join(candidates)}); "
                            f"download that part of black-forest-labs/FLUX.2-dev (or -klein-*) into this folder")
        found[part] = hit
    return found


# --model NAME for full-size runs without weights (speed and memory checks): the DiT preset and its text encoder
RANDOM_MODELS = {"dev-random": ("dev", "mistral-small-3.2"), "klein-4b-random": ("klein-4b", "qwen3-4b"),
                 "klein-9b-random": ("klein-9b", "qwen3-8b")}


@dataclass
class Models:
    """What sampling needs. Any part may be None: the text encoder is freed once the prompts are encoded."""
    device: torch.device
    dtype: torch.dtype                        # DiT, text encoder and Euler state; the autoencoder runs in >= float32
    dit: Flux2 | None = None
    ae: AutoEncoder | None = None
    text_encoder: MistralEncoder | None = None
    tokenizer: Tokenizer | None = None


def snapshot_paths(model_dir) -> dict[str, Path]:
    """The parts of a FLUX.2 snapshot under the names used here; LoadError naming the first missing part."""
    p = find_snapshot(Path(model_dir).expanduser())
    return {"dit": p["transformer"], "ae": p["vae"], "text": p["text_encoder"], "tokenizer": p["tokenizer"]}


def klein_kind(model_dir) -> str | None:
    """'base' or 'distilled' for a klein snapshot (no guidance embedder), None for dev. Base when the snapshot's
    model_index.json says is_distilled false, or (no such entry) when the snapshot folder's name (the repo's name
    for an HF cache snapshot, models--...--FLUX.2-klein-base-4B/snapshots/<hash>) or the DiT file's contains "base"."""
    dit = snapshot_paths(model_dir)["dit"]
    if weights.dit_config(dit).use_guidance_embed:
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
            weights.load_flux2(paths["dit"], device=at, dtype=dtype)
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
    free_cuda()


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

    def build_dit(self) -> Flux2:
        """The DiT in the model dtype, for offload.prepare to place: on meta for a snapshot and the random models
        (prepare allocates each tensor where the plan puts it; fill_dit then writes the values), on the CPU with
        its values for the tiny model."""
        return self._load("dit", dit_device="cpu" if self.tiny else "meta").dit

    def fill_dit(self, dit: Flux2) -> bool:
        """Write the values of a DiT that build_dit() made on meta and offload.prepare placed: a snapshot's, read one
        tensor at a time from the memory-mapped files (a sharded rank copies only its rows), or random ones. False
        for the tiny model, whose DiT was built with its values."""
        if self.tiny:
            return False
        if self.random:
            fill_random(dit, self.device)
        else:
            weights.load_flux2_into(dit, self.paths["dit"])
        return True

    def for_preview(self, dit: Flux2) -> Models:
        """Models for `generate` with precomputed `txt` features: this DiT and the autoencoder."""
        return Models(device=self.device, dtype=self.dtype, dit=dit, ae=self.load_ae())


def placed_dit(source: ModelSource, *, add_adapters: Callable[[Flux2], object],
               set_adapters: Callable[[Flux2], object], strategy: str = "auto", batch_size: int,
               tokens_per_sample: int, train: bool, gpu_memory_limit: float | None = None, compile: bool = False,
               keep_host_copy: bool = False) -> tuple[Flux2, offload.Plan]:
    """The DiT of `source` with adapters, placed for a run and filled: built on meta, given its adapters
    (`add_adapters`: shapes, so the plan places them too), placed by offload.prepare (which prints the plan) for
    forwards of `batch_size` samples of `tokens_per_sample` tokens, then filled with its values, one tensor at a time
    (the whole DiT never sits in host memory), and `set_adapters` gives the adapters theirs. The tiny model is built
    with its values, so `add_adapters` alone serves it."""
    dit = source.build_dit()
    add_adapters(dit)
    plan = offload.prepare(dit, dit.blocks, strategy=strategy, device=source.device, batch_size=batch_size,
                           tokens_per_sample=tokens_per_sample, train=train, gpu_memory_limit=gpu_memory_limit,
                           compile=compile, keep_host_copy=keep_host_copy)
    if source.fill_dit(dit):
        set_adapters(dit)
    return dit, plan
