"""Assembling FLUX.2 models, in one place: train.py, sample.py and bench.py build theirs here.

A model comes from one of three sources, and each part (text encoder with its tokenizer,
autoencoder, DiT) has one method that builds it from any of them:
  - a snapshot folder of FLUX.2 [dev] or [klein], as black-forest-labs publishes it;
  - `tiny`: a small dev-shaped model with seeded random weights, for the CPU demo and the tests;
  - `dev-random`, `klein-4b-random`, `klein-9b-random`: full-size shapes with random weights, for
    speed and memory runs.

The DiT of a run is built on the meta device (no memory), given its adapters, placed by offload.py
(resident, streamed or FSDP2-sharded) and only then filled, one tensor at a time from the
memory-mapped files, so the whole DiT never sits in host memory (`placed_dit`). The text encoder
sits on the GPU whole when it fits the budget, else it runs one layer at a time
(`ModelSource.load_text_encoder`).

Read top to bottom: where a snapshot keeps its parts; how random weights are made; `ModelSource`,
one method per part; `load_models`, the whole stack at once (sampling in-process, tests);
`placed_dit`.
Follows docs/flux2_reference.md §1.1 (snapshot layout, dev and klein) and §11 (end to end).
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

import offload
import planner
import text_encoder
import vae
import weights
from flux2 import PRESETS, Flux2
from text_encoder import TEXT_PRESETS, MistralEncoder, Tokenizer, encode_by_layers
from util import GiB, LoadError
from vae import AE_PRESETS, AutoEncoder


# --------------------------------------------------------------------------------------------------
# A snapshot folder (dev, or klein: reference §1.1)

SNAPSHOT_PARTS = {  # part -> accepted locations inside a snapshot folder, first match wins
    "transformer": ["flux2-dev.safetensors", "transformer",
                    *(f"flux-2-klein-{v}.safetensors" for v in ("4b", "9b", "base-4b", "base-9b"))],
    "vae": ["ae.safetensors", "vae"],
    "text_encoder": ["text_encoder"],
    "tokenizer": ["tokenizer/tokenizer.json", "tokenizer/tekken.json", "tokenizer.json",
                  "tekken.json"],
}


def find_snapshot(model_dir) -> dict[str, Path]:
    """Locate the DiT, VAE, text encoder and tokenizer of a snapshot; say what is missing."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise LoadError(f"{model_dir}: not a folder; --model-dir takes a FLUX.2 (dev or klein) "
                        f"snapshot directory")
    found = {}
    for part, candidates in SNAPSHOT_PARTS.items():
        hit = next((model_dir / c for c in candidates if (model_dir / c).exists()), None)
        if hit is None:
            raise LoadError(f"{model_dir}: no {part} found (looked for {', '.join(candidates)}); "
                            f"download that part of black-forest-labs/FLUX.2-dev (or -klein-*) "
                            f"into this folder")
        found[part] = hit
    return found


def snapshot_paths(model_dir) -> dict[str, Path]:
    """The parts of a snapshot under the names used here; LoadError names the first missing one."""
    p = find_snapshot(Path(model_dir).expanduser())
    return {"dit": p["transformer"], "ae": p["vae"], "text": p["text_encoder"],
            "tokenizer": p["tokenizer"]}


def klein_kind(model_dir) -> str | None:
    """'base' or 'distilled' for a klein snapshot (no guidance embedder), None for dev.

    Base when the snapshot's model_index.json says is_distilled false, or (no such entry) when the
    folder's name, the DiT file's, or the repo's name of an HF cache snapshot
    (models--...--FLUX.2-klein-base-4B/snapshots/<hash>) contains "base"."""
    dit = snapshot_paths(model_dir)["dit"]
    if weights.dit_config(dit).use_guidance_embed:
        return None
    index = Path(model_dir).expanduser() / "model_index.json"
    distilled = json.loads(index.read_text()).get("is_distilled") if index.is_file() else None
    if distilled is None:
        folder = Path(model_dir).expanduser().absolute()
        names = [folder.name, dit.name]
        if folder.parent.name == "snapshots":
            names.append(folder.parent.parent.name)
        distilled = not any("base" in n.lower() for n in names)
    return "distilled" if distilled else "base"


def model_defaults(model_dir) -> dict:
    """Steps and CFG for a snapshot (None: the dev-shaped tiny demo), reference §1.1: dev 50 steps,
    no CFG (it has a guidance embedder); klein base 50 steps, CFG 4.0; step-distilled klein 4 steps,
    no CFG."""
    kind = None if model_dir is None else klein_kind(model_dir)
    return {None: {"steps": 50}, "base": {"steps": 50, "cfg": 4.0}, "distilled": {"steps": 4}}[kind]


# --------------------------------------------------------------------------------------------------
# Building a part: the tiny model's seeded weights, the full-size models' random ones

# --model NAME for full-size runs without weights (speed, memory): DiT preset, text encoder preset
RANDOM_MODELS = {"dev-random": ("dev", "mistral-small-3.2"),
                 "klein-4b-random": ("klein-4b", "qwen3-4b"),
                 "klein-9b-random": ("klein-9b", "qwen3-8b")}


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """A module built on the CPU with random weights from `seed`; the global RNG stays untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _frozen(module: nn.Module) -> nn.Module:
    """The module in eval mode, no parameter requiring a gradient (adapters come later)."""
    return module.eval().requires_grad_(False)


@torch.no_grad()
def fill_random(model: nn.Module, device: torch.device):
    """Weights ~ N(0, 0.02), norm scales 1, LoRA as lora.py starts it (A ~ N(0, 1/r²), B = 0),
    BatchNorm stats mean 0 and variance 1: for speed and memory runs, whose numbers do not depend on
    the values. Drawn on the device and copied to wherever the plan put each tensor (host copies and
    FSDP2 shards included)."""
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


def _random(build: Callable[[], nn.Module], dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A full-size module with random values on `device`; on "meta" with none, to be placed."""
    with torch.device("meta"):
        module = build().to(dtype)
    if device.type != "meta":
        module = module.to_empty(device=device)
        fill_random(module, device)
    return module


# --------------------------------------------------------------------------------------------------
# A model's parts, each built or loaded on demand

@dataclass
class Models:
    """What sampling needs. Any part may be None: the text encoder is freed after encoding."""
    device: torch.device
    dtype: torch.dtype              # DiT, text encoder and Euler state; the autoencoder: >= float32
    dit: Flux2 | None = None
    ae: AutoEncoder | None = None
    text_encoder: MistralEncoder | None = None
    tokenizer: Tokenizer | None = None


@torch.no_grad()
def encode_text(models: Models, prompts: list[str], store=None) -> Tensor:
    """Prompts -> text features [N, 512, ctx] in the model dtype, on `store` (default: the
    device). One prompt per forward, so a prompt's features do not depend on the others it came
    with (a PNG's settings reproduce it)."""
    if models.text_encoder is None or models.tokenizer is None:
        raise ValueError("the text encoder is not loaded (freed after encoding?); "
                         "pass precomputed txt= features")
    out = []
    for prompt in prompts:
        ids, mask = models.tokenizer.encode_prompts([prompt])
        features = models.text_encoder(ids.to(models.device), mask.to(models.device))
        out.append(features.to(store or models.device, models.dtype))   # [1, 512, ctx]
    return torch.cat(out)


def _gpu_free(device: torch.device, gpu_memory_limit: float | None) -> int | None:
    """Bytes a new model may take on `device`: what is free, and under --gpu-memory-limit no more
    than the limit less what this process holds; None on the CPU without a limit (no need to
    fit)."""
    if device.type != "cuda":
        return None if gpu_memory_limit is None else int(gpu_memory_limit * GiB)
    free = torch.cuda.mem_get_info(device)[0]
    if gpu_memory_limit is not None:
        free = min(free, int(gpu_memory_limit * GiB) - torch.cuda.memory_reserved(device))
    return free


class ModelSource:
    """One model's parts, each built or loaded on demand (frozen, in eval mode), and the ids that
    key the trainer's caches.

    model: "tiny", a RANDOM_MODELS name, or any other name for the snapshot in `model_dir`.
    dtype: the DiT's and the text encoder's (default bfloat16 on CUDA, else float32); the
    autoencoder runs in float32 or wider. text_layers: the encoder layers whose outputs are the
    features (None: the family's FLUX.2 layers, dev Mistral 10/20/30, klein Qwen3 9/18/27). seed:
    the tiny model's weights (train.py and sample.py use seed 0: `--model tiny` is one model).
    gpu_memory_limit: GiB (--gpu-memory-limit) the text encoder must fit in to sit on the GPU
    whole; text_by_layers: True / False forces layer by layer / whole (None: decide by size)."""

    def __init__(self, model: str | None, model_dir, device, dtype: torch.dtype | None = None, *,
                 text_layers: tuple[int, ...] | None = None, seed: int = 0,
                 gpu_memory_limit: float | None = None, text_by_layers: bool | None = None):
        self.name, self.model_dir, self.device = model, model_dir, torch.device(device)
        self.tiny = model == "tiny"
        self.random = RANDOM_MODELS.get(model)       # (DiT preset, text encoder preset) or None
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.text_layers, self.seed = text_layers, seed
        self.gpu_memory_limit, self.text_by_layers = gpu_memory_limit, text_by_layers
        self.paths = None
        if not (self.tiny or self.random):           # a missing part or mismatched pair fails here
            self.paths = snapshot_paths(model_dir)
            text_encoder.check_pair(self.paths["dit"], self.paths["text"], text_layers)
        self._ae = None

    @property
    def ae_id(self) -> str:
        """Names the autoencoder weights (part of the latent cache key)."""
        if self.paths is None:
            return f"{self.name}-ae-seed{self.seed}"
        return str(self.paths["ae"].resolve())

    @property
    def text_id(self) -> str:
        """Names the text encoder and tokenizer (part of the text cache key)."""
        if self.paths is None:
            return f"{self.name}-text-seed{self.seed}"
        return f"{self.paths['text'].resolve()}|{self.paths['tokenizer'].resolve()}"

    def load_tokenizer(self) -> Tokenizer:
        """The tokenizer (the tiny byte-level one for the tiny and random models)."""
        if self.paths is None:
            return Tokenizer.tiny()
        tokenizer = Tokenizer(self.paths["tokenizer"])
        family = text_encoder.text_family(self.paths["text"])
        if tokenizer.family != family:
            raise LoadError(f"{self.paths['tokenizer']}: a {tokenizer.family} tokenizer next to a "
                            f"{family} text encoder; use the snapshot's own tokenizer/")
        return tokenizer

    def whole_text_encoder(self) -> MistralEncoder:
        """The text encoder on the device in the model dtype."""
        if self.tiny:
            encoder = _seeded(lambda: MistralEncoder(TEXT_PRESETS["tiny"]), self.seed + 2)
            return _frozen(encoder.to(self.device, self.dtype))
        if self.random:
            build = lambda: MistralEncoder(TEXT_PRESETS[self.random[1]])   # noqa: E731
            return _frozen(_random(build, self.dtype, self.device))
        return _frozen(text_encoder.load_text_encoder(self.paths["text"], self.text_layers,
                                                      device=self.device, dtype=self.dtype))

    def _text_parts(self) -> tuple[MistralEncoder, Callable[[str, nn.Module], None]]:
        """The text encoder on meta and a function that gives one of its parts ("layers.3") its
        weights on the device: read from the snapshot's files, copied from the tiny model's seeded
        encoder, or (random models) drawn by fill_random, every part from the same seed, so these
        features differ from those of the whole random encoder (which draws one stream)."""
        weights = None if self.paths is None else text_encoder.TextWeights(self.paths["text"],
                                                                           self.text_layers)
        cfg = weights.cfg if weights else TEXT_PRESETS["tiny" if self.tiny else self.random[1]]
        seeded = _seeded(lambda: MistralEncoder(cfg), self.seed + 2) if self.tiny else None
        with torch.device("meta"):
            encoder = _frozen(MistralEncoder(cfg).to(self.dtype))

        def load(name: str, part: nn.Module):
            if weights is not None:
                weights.load(part, name, device=self.device, dtype=self.dtype)
                return
            part.to_empty(device=self.device)
            if seeded is not None:
                part.load_state_dict(seeded.get_submodule(name).state_dict())
            else:
                fill_random(part, self.device)
        return encoder, load

    def load_text_encoder(self) -> Callable[[list[str]], Tensor]:
        """A function prompts -> text features [N, 512, ctx] (on the device when they fit there,
        else on the CPU); dropping it frees the encoder. The encoder sits on the device whole when
        it fits the GPU budget with a margin of min(3 GiB, 5%), else every call runs it one layer
        at a time for all its prompts (text_encoder.encode_by_layers); text_by_layers forces
        either."""
        tokenizer, (encoder, load) = self.load_tokenizer(), self._text_parts()
        itemsize, cfg = encoder.embed_tokens.weight.itemsize, encoder.cfg
        by_layers = self.text_by_layers
        if by_layers is None:
            free = _gpu_free(self.device, self.gpu_memory_limit)
            need = sum(p.numel() for p in encoder.parameters()) * itemsize
            by_layers = free is not None and need + min(3 * GiB, free // 20) > free

        def store(prompts: list[str]):          # the features and residual streams of a sweep
            free = _gpu_free(self.device, self.gpu_memory_limit)
            per_prompt = (1 + 2 * len(cfg.output_layers)) * 512 * cfg.hidden_size * itemsize
            return self.device if free is None or len(prompts) * per_prompt < free // 2 else "cpu"
        if not by_layers:
            stack = Models(device=self.device, dtype=self.dtype, tokenizer=tokenizer,
                           text_encoder=self.whole_text_encoder())
            return lambda prompts: encode_text(stack, prompts, store=store(prompts))

        def encode(prompts: list[str]) -> Tensor:
            ids, mask = tokenizer.encode_prompts(prompts)                  # [N, 512]
            return encode_by_layers(encoder, ids, mask, load=load, device=self.device,
                                    store=store(prompts))
        return encode

    def load_ae(self) -> AutoEncoder:
        """The autoencoder on the device, float32 or wider (loaded once, kept for previews)."""
        if self._ae is None:
            dtype = torch.promote_types(self.dtype, torch.float32)   # its file: float32, small
            if self.tiny:
                ae = _seeded(lambda: AutoEncoder(AE_PRESETS["tiny"]), self.seed + 1)
                ae = ae.to(self.device, dtype)
            elif self.random:
                ae = _random(lambda: AutoEncoder(AE_PRESETS["flux2"]), dtype, self.device)
            else:
                ae = vae.load_ae(self.paths["ae"], device=self.device, dtype=dtype)
            self._ae = _frozen(ae)
        return self._ae

    def load_dit(self, device=None) -> Flux2:
        """The DiT in the model dtype on `device` (default: the source's) with its values; on
        "meta", a snapshot's or a random model's DiT has none yet (fill_dit writes them once it is
        placed)."""
        device = torch.device(device or self.device)
        if self.tiny:
            dit = _seeded(lambda: Flux2(PRESETS["tiny"]), self.seed).to(device, self.dtype)
        elif self.random:
            dit = _random(lambda: Flux2(PRESETS[self.random[0]]), self.dtype, device)
        else:
            dit = weights.load_flux2(self.paths["dit"], device=device, dtype=self.dtype)
        return _frozen(dit)

    def build_dit(self) -> Flux2:
        """The DiT for offload.prepare to place: on meta for a snapshot and the random models
        (prepare allocates each tensor where the plan puts it, fill_dit then writes the values); on
        the CPU with its values for the tiny model."""
        return self.load_dit("cpu" if self.tiny else "meta")

    def fill_dit(self, dit: Flux2) -> bool:
        """Write the values of a DiT that build_dit() made on meta and offload.prepare placed: a
        snapshot's, one tensor at a time from the memory-mapped files (a sharded rank copies only
        its rows), or random ones. False for the tiny model, whose DiT was built with its values."""
        if self.tiny:
            return False
        if self.random:
            fill_random(dit, self.device)
        else:
            weights.load_flux2_into(dit, self.paths["dit"])
        return True

    def for_preview(self, dit: Flux2) -> Models:
        """Models for sample.generate with precomputed `txt` features: this DiT, the autoencoder."""
        return Models(device=self.device, dtype=self.dtype, dit=dit, ae=self.load_ae())


def load_models(model_dir=None, *, tiny: bool = False, device="cpu",
                dtype: torch.dtype = torch.bfloat16, parts=("text", "dit", "ae"), text_layers=None,
                seed: int = 0) -> Models:
    """The `parts` of a FLUX.2 dev or klein snapshot, or of the tiny model (random weights from
    `seed`), loaded at once onto `device`: the stack for sampling in-process and for the tests.
    ModelSource describes the arguments."""
    source = ModelSource("tiny" if tiny else "dev", model_dir, device, dtype,
                         text_layers=text_layers, seed=seed)
    stack = Models(device=source.device, dtype=dtype)
    if "text" in parts:
        stack.tokenizer, stack.text_encoder = source.load_tokenizer(), source.whole_text_encoder()
    if "dit" in parts:
        stack.dit = source.load_dit()
    if "ae" in parts:
        stack.ae = source.load_ae()
    return stack


# --------------------------------------------------------------------------------------------------
# The DiT of a run: built on meta, given adapters, placed, filled

def placed_dit(source: ModelSource, *, add_adapters: Callable[[Flux2], object],
               set_adapters: Callable[[Flux2], object], strategy: str = "auto", batch_size: int,
               tokens_per_sample: int, train: bool, gpu_memory_limit: float | None = None,
               host_memory_limit: float | None = None, compile: bool = False,
               keep_host_copy: bool = False, reserve_bytes: int = 0) -> tuple[Flux2, planner.Plan]:
    """The DiT of `source` with adapters, placed for a run and filled, and its plan.

    Built on meta; `add_adapters` gives it its adapters (their shapes, so the plan places them too);
    offload.prepare places it (and prints the plan) for forwards of `batch_size` samples of
    `tokens_per_sample` tokens, within gpu_memory_limit and host_memory_limit (GiB), keeping
    reserve_bytes free between forwards (see planner.plan); the values are written one tensor at a
    time, so the whole DiT never sits in host memory; `set_adapters` then gives the adapters
    theirs. The tiny model is built with its values, so `add_adapters` alone serves it."""
    dit = source.build_dit()
    add_adapters(dit)
    plan = offload.prepare(dit, dit.blocks, strategy=strategy, device=source.device,
                           batch_size=batch_size, tokens_per_sample=tokens_per_sample, train=train,
                           gpu_memory_limit=gpu_memory_limit, compile=compile,
                           keep_host_copy=keep_host_copy, host_memory_limit=host_memory_limit,
                           reserve_bytes=reserve_bytes)
    if source.fill_dit(dit):
        set_adapters(dit)
    return dit, plan
