"""LoRA for FLUX.2: adapters injected into a built model, target presets, and one file that
diffusers and ComfyUI load.

Follows docs/paper.md ("Where LoRA goes": h = W0 x + B A x, A ~ N(0, 1/r^2), B = 0, r = 16), the BFL
module names of docs/flux2_reference.md §3.1 and the diffusers names of §3.4, and the LoRA formats
of docs/oracle.md §5 (ΔW = (alpha / r) · B · A with A = down [r, in] and B = up [out, r]). It works
on any nn.Module by module names and nn.Linear types; from the model side it takes only weights.py's
diffusers <-> BFL name table, to read diffusers and PEFT files.

Our file: ONE .safetensors, keys `diffusion_model.<BFL module>.lora_A.weight` [r, in] /
`.lora_B.weight` [out, r] in float32, alpha / r baked into B and no `.alpha` tensors (oracle §5.2:
diffusers 0.42 rejects them there). `load` also reads kohya/musubi (`lora_unet_*`), diffusers/PEFT
(`transformer.*`) and ai-toolkit files.
"""
import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from util import atomic_write, print0
from weights import bfl_module


class LoRAError(ValueError):
    """A LoRA file or target spec that does not fit the model; the message names the file and the
    fix."""


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus a trainable low-rank update: y = W0 x + (alpha / r) B A x on rows
    out_slice.

    It adopts the base layer's own `weight` (and `bias`) Parameter, so `<module>.weight` keeps its
    BFL key and stays loadable; the adapter lives in `<module>.lora_A` [r, in] and
    `<module>.lora_B` [rows, r]."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 out_slice: tuple[int, int] | None = None):
        nn.Module.__init__(self)        # not nn.Linear.__init__, which allocates a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight.requires_grad_(False)
        bias = base.bias if base.bias is None else base.bias.requires_grad_(False)
        self.register_parameter("bias", bias)
        self.rank, self.alpha = rank, float(rank if alpha is None else alpha)
        self.out_slice = tuple(out_slice or (0, base.out_features))   # e.g. q|k|v rows of linear1
        rows = self.out_slice[1] - self.out_slice[0]
        # fp32 whatever the base dtype: bf16 would round away small updates to A and B
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))     # [r, in]
        self.lora_B = nn.Parameter(torch.empty(rows, rank, **kw))                 # [rows, r]
        self.init_adapter()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.merged = False

    @torch.no_grad()
    def init_adapter(self, device=None):
        """The start values: A ~ N(0, 1/r²) (std 1/r, the paper's), drawn on `device` (default:
        where A is), and B = 0, so the layer starts as W0. Nothing is drawn on meta."""
        self.lora_A.copy_(torch.randn(self.lora_A.shape, device=device or self.lora_A.device,
                                      dtype=torch.float32) / self.rank)
        self.lora_B.zero_()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)                          # [..., out]
        if self.merged:
            return y
        # [..., r]: the scale goes on the small tensor
        h = F.linear(self.dropout(x), self.lora_A.to(x.dtype)) * self.scale
        # y + h Bᵀ as one matmul with beta = 1 (cuBLAS adds y in its epilogue, one rounding), so
        # h Bᵀ is never written out
        y2, h2 = y.view(-1, y.shape[-1]), h.view(-1, h.shape[-1]).to(y.dtype)
        Bt = self.lora_B.to(y.dtype).t()
        s0, s1 = self.out_slice
        if (s0, s1) == (0, self.out_features):
            return torch.addmm(y2, h2, Bt).view(y.shape)
        y2[:, s0:s1].addmm_(h2, Bt)   # in place is safe: a linear's backward never needs its output
        return y

    @torch.no_grad()
    def _add_delta(self, sign: int):
        w = self.weight[self.out_slice[0]:self.out_slice[1]]              # [rows, in], a view
        ct = torch.promote_types(w.dtype, torch.float32)                   # one rounding for bf16
        w.copy_(w.to(ct) + sign * (self.lora_B.to(ct) * self.scale) @ self.lora_A.to(ct))

    def merge(self):
        """Fold the update into the weight for inference (forward then skips the adapter)."""
        if not self.merged:
            self._add_delta(+1)
            self.merged = True

    def unmerge(self):
        """Subtract the update again (exact up to one rounding of W0 + ΔW per element)."""
        if self.merged:
            self._add_delta(-1)
            self.merged = False

    def factors(self) -> tuple[Tensor, Tensor]:
        """(A [r, in], B [out, r]) in fp32 with alpha / r baked into B and zero rows outside
        out_slice."""
        B = torch.zeros(self.out_features, self.rank, dtype=torch.float32,
                        device=self.lora_B.device)
        B[self.out_slice[0]:self.out_slice[1]] = self.lora_B.detach().double() * self.scale
        return self.lora_A.detach().float(), B

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha:g}, "
                f"rows={self.out_slice}")


# --------------------------------------------------------------------------------------------------
# Which layers (paper.md "Where LoRA goes"; oracle §5.2-5.3)

PRESETS = {  # name -> regex over nn.Linear module names (re.fullmatch)
    # the report: attention in/out projections of both streams, and single blocks' qkv rows + output
    "paper": r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)|single_blocks\.\d+\.linear[12]",
    # every linear inside the blocks (musubi-tuner's choice)
    "attn+mlp": r"(double|single)_blocks\..+",
    # also the embedders, the shared modulations and final_layer.linear. Not
    # final_layer.adaLN_modulation.1: diffusers stores its rows as (scale; shift) and does not swap
    # a LoRA's B rows, so it would load wrong there.
    "all": r"(?!final_layer\.adaLN_modulation\.1$).+",
}
# adapters writing only the first 3H rows (q|k|v) of linear1
_QKV_ONLY = {"paper": r"single_blocks\.\d+\.linear1"}


def select(model: nn.Module, targets: str = "paper") -> dict[str, tuple[int, int] | None]:
    """Module names a preset or regex picks, each with its out_slice (None = all rows)."""
    pattern = PRESETS.get(targets, targets)
    try:
        picked = {n: m for n, m in model.named_modules()
                  if isinstance(m, nn.Linear) and re.fullmatch(pattern, n)}
    except re.error as e:
        raise LoRAError(f"LoRA targets {targets!r}: neither a preset ({', '.join(PRESETS)}) "
                        f"nor a regex ({e})")
    if not picked:
        raise LoRAError(f"LoRA targets {targets!r} match no nn.Linear of this model; use a preset "
                        f"({', '.join(PRESETS)}) or a regex over names like "
                        f"double_blocks.0.img_attn.qkv")
    qkv_only = _QKV_ONLY.get(targets)
    return {n: (0, 3 * m.in_features) if qkv_only and re.fullmatch(qkv_only, n) else None
            for n, m in picked.items()}


def adapters(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of the model by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _wrap(model: nn.Module, name: str, **kw) -> LoRALinear:
    parent, _, child = name.rpartition(".")
    layer = LoRALinear(model.get_submodule(name), **kw)
    setattr(model.get_submodule(parent) if parent else model, child, layer)
    return layer


def _params(layers) -> list[nn.Parameter]:
    return [p for m in layers for p in (m.lora_A, m.lora_B)]


def inject(model: nn.Module, targets: str = "paper", rank: int = 16, alpha: float | None = None,
           dropout: float = 0.0) -> list[nn.Parameter]:
    """Freeze the model, wrap the target linears in LoRALinear and return the trainable adapter
    parameters."""
    picked = select(model, targets)
    taken = [n for n in picked if isinstance(model.get_submodule(n), LoRALinear)]
    if taken:
        raise LoRAError(f"{taken[0]} already has a LoRA adapter ({len(taken)} layers do); "
                        f"inject once, or load() a file into the existing adapters")
    model.requires_grad_(False)
    layers = [_wrap(model, n, rank=rank, alpha=alpha, dropout=dropout, out_slice=s)
              for n, s in picked.items()]
    params = _params(layers)
    print0(f"LoRA {targets!r} rank {rank} alpha {rank if alpha is None else alpha:g}: "
           f"{len(layers)} layers, {sum(p.numel() for p in params):,} trainable parameters")
    return params


def init_adapters(model: nn.Module):
    """Draw every adapter's start values again, on the CPU and in inject's order: for a model
    injected on meta, whose adapters offload.prepare allocated without values. Seeded as before
    inject, it gives what a CPU model got."""
    for m in adapters(model).values():
        m.init_adapter("cpu")


def merge(model: nn.Module):
    """Fold every adapter into its base weight (inference speed)."""
    for m in adapters(model).values():
        m.merge()


def unmerge(model: nn.Module):
    """Undo merge()."""
    for m in adapters(model).values():
        m.unmerge()


# --------------------------------------------------------------------------------------------------
# Our file: BFL names under diffusion_model., alpha baked in (oracle §5.2, §5.4)

def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters in our file layout: `diffusion_model.<module>.lora_A.weight` /
    `.lora_B.weight`, fp32 on CPU."""
    out = {}
    for name, m in adapters(model).items():
        A, B = m.factors()
        out[f"diffusion_model.{name}.lora_A.weight"] = A.cpu().contiguous()
        out[f"diffusion_model.{name}.lora_B.weight"] = B.cpu().contiguous()
    return out


def _describe(model: nn.Module) -> dict[str, str]:
    """rank, alpha ('mixed' when adapters differ) and targets (the preset that gives these layers,
    or 'custom')."""
    layers = adapters(model)
    have = {n: None if m.out_slice == (0, m.out_features) else m.out_slice
            for n, m in layers.items()}
    targets = "custom"
    for name in PRESETS:
        try:
            if select(model, name) == have:
                targets = name
                break
        except LoRAError:
            pass
    ranks = {str(m.rank) for m in layers.values()}
    alphas = {f"{m.alpha:g}" for m in layers.values()}
    return {"rank": ranks.pop() if len(ranks) == 1 else "mixed",
            "alpha": alphas.pop() if len(alphas) == 1 else "mixed", "targets": targets}


def _trained_with(meta: dict) -> tuple[int, float] | None:
    """(rank, alpha) from our header when every adapter shared them, else None."""
    try:
        return int(meta["rank"]), float(meta["alpha"])
    except (KeyError, ValueError):
        return None


def save(model: nn.Module, path, metadata: dict | None = None):
    """Write the adapters to ONE .safetensors file (atomically), with string metadata in the
    header."""
    path = Path(path)
    if not adapters(model):
        raise LoRAError(f"{path}: the model has no LoRA adapters to save; "
                        f"call inject() or load() first")
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta.update(_describe(model), format="pt")    # ours last: load() relies on them being true
    raw = _sorted_header(safetensors_bytes(lora_state_dict(model), metadata=meta))
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(raw))     # mode 0666 less the umask


def _sorted_header(raw: bytes) -> bytes:
    """safetensors bytes with the header's metadata in key order: safetensors writes a hash map
    in an order that changes from run to run, and the same adapters should give the same file."""
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)                 # the tensors start 8-byte aligned
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]


# --------------------------------------------------------------------------------------------------
# Reading every common FLUX.2 layout (oracle §5.1-5.3)

_SUFFIXES = {".lora_A.weight": "A", ".lora_down.weight": "A", ".lora_B.weight": "B",
             ".lora_up.weight": "B", ".alpha": "alpha"}


def _target(stem: str, kohya: dict):
    """A file's module stem -> (BFL module, rows, is_diffusers), or None when no layout knows it."""
    if stem.startswith("lora_unet_"):                       # kohya / musubi: dots became "_"
        name = kohya.get(stem[len("lora_unet_"):])
        return name and (name, None, False)
    for prefix in ("diffusion_model.", "base_model.model."):  # ours, ai-toolkit, PEFT on BFL names
        if stem.startswith(prefix):
            return stem[len(prefix):], None, False
    hit = bfl_module(stem.removeprefix("transformer."))     # diffusers / PEFT, or bare diffusers
    return hit and (*hit, True)


def _peft_scale(cfg: dict, module: str, r: int) -> float:
    """The PEFT scaling of one diffusers module from the `lora_adapter_metadata` LoraConfig
    (default alpha = r)."""
    alpha = cfg.get("lora_alpha", r)
    for pattern, a in (cfg.get("alpha_pattern") or {}).items():   # PEFT matches name suffixes
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = a
            break
    return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:   # safetensors has its own error types for missing or corrupt files
        raise LoRAError(f"{path}: not a readable .safetensors LoRA file ({e})") from None


def _group(tensors: dict[str, Tensor], linears: dict[str, nn.Linear]) -> tuple[dict, list[str]]:
    """The file's tensors by module stem, stem -> {"to": (BFL module, rows, is_diffusers),
    "A": down, "B": up, "alpha": ...}, and the keys that name no linear of the model in any
    layout."""
    kohya = {n.replace(".", "_"): n for n in linears}
    stems, unknown = {}, []
    for key, t in tensors.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        hit = suffix and _target(key[:-len(suffix)], kohya)
        if not hit or hit[0] not in linears:
            unknown.append(key)
            continue
        stems.setdefault(key[:-len(suffix)], {"to": hit})[_SUFFIXES[suffix]] = t
    return stems, unknown


def _check_shapes(path: Path, stem: str, A: Tensor, B: Tensor, name: str, linear: nn.Linear,
                  rows_out: int):
    """A dev LoRA on klein (or the reverse) ends here, with a message saying just that."""
    if A.shape[1] != linear.in_features or B.shape[0] != rows_out or B.shape[1] != A.shape[0]:
        raise LoRAError(f"{path}: {stem} has down {tuple(A.shape)} / up {tuple(B.shape)} but "
                        f"{name} of this model is [{linear.out_features}, {linear.in_features}]: "
                        f"the LoRA was made for another FLUX.2 size (dev vs klein); load it into "
                        f"the model it was trained for")


def _scale_and_alpha(d: dict, stem: str, r: int, peft: dict, trained) -> tuple[float, float]:
    """By the file's convention: the factor its B still needs, and the alpha of a new adapter."""
    if "alpha" in d:                    # kohya and ComfyUI: scale alpha / rank, rank = down rows
        alpha = float(d["alpha"])
        return alpha / r, alpha
    if d["to"][2]:                      # diffusers / PEFT: the LoraConfig in the header
        scale = _peft_scale(peft, stem.removeprefix("transformer."), r)
        return scale, scale * r
    # ai-toolkit and ours: alpha baked into B; our header keeps the training alpha
    return 1.0, trained[1] if trained and trained[0] == r else float(r)


def _joined(parts: list[tuple[Tensor, Tensor, int, float]], out_features: int
            ) -> tuple[Tensor, Tensor, float]:
    """One (A, B, alpha) per layer from its (A, B, first row, alpha) parts. Separate q/k/v adapters
    on one fused qkv are exactly one adapter of rank sum(r) with a block-diagonal B."""
    if len(parts) == 1 and parts[0][1].shape[0] == out_features:
        A, B, _, alpha = parts[0]
        return A, B, alpha
    A = torch.cat([p[0] for p in parts])                                # [sum r, in]
    B = torch.zeros(out_features, A.shape[0], dtype=torch.float64)      # [out, sum r]
    col = 0
    for a, b, first, _ in parts:
        B[first:first + b.shape[0], col:col + a.shape[0]] = b
        col += a.shape[0]
    return A, B, float(A.shape[0])


def _deltas(path: Path, tensors: dict, meta: dict, model: nn.Module
            ) -> dict[str, tuple[Tensor, Tensor, float]]:
    """Every adapter in the file as BFL module -> (A [r, in], B [out, r] float64 with its scale
    baked in, alpha). Shapes are checked before unknown keys are reported."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    peft = {k.removeprefix("transformer."): v
            for k, v in json.loads(meta.get("lora_adapter_metadata", "{}")).items()}
    trained = _trained_with(meta)
    stems, unknown = _group(tensors, linears)
    parts = {}  # BFL module -> [(A, B, first row, alpha)]
    for stem, d in stems.items():
        if "A" not in d or "B" not in d:
            unknown.append(f"{stem} (lora_A and lora_B come in pairs)")
            continue
        name, rows, _ = d["to"]
        linear, r = linears[name], d["A"].shape[0]
        rows_out = linear.out_features // 3 if isinstance(rows, int) else linear.out_features
        _check_shapes(path, stem, d["A"], d["B"], name, linear, rows_out)
        scale, alpha = _scale_and_alpha(d, stem, r, peft, trained)
        B = d["B"].double() * scale
        if rows == "swap":
            B = torch.cat(B.chunk(2)[::-1])
        first = rows * rows_out if isinstance(rows, int) else 0
        parts.setdefault(name, []).append((d["A"].float(), B, first, alpha))
    if unknown:
        raise LoRAError(f"{path}: not a LoRA for this FLUX.2 model's linear layers: "
                        f"{len(unknown)} unknown keys, e.g. {unknown[:3]}; expected "
                        f"diffusion_model.*.lora_A/B.weight, lora_unet_*.lora_down/up.weight or "
                        f"transformer.*.lora_A/B.weight (a FLUX.2 LoRA with as many blocks as "
                        f"this model)")
    return {name: _joined(ps, linears[name].out_features) for name, ps in parts.items()}


def load(model: nn.Module, path, scale: float = 1.0) -> list[nn.Parameter]:
    """Apply a LoRA file (ours, ai-toolkit, kohya/musubi or diffusers) at strength `scale`; returns
    its parameters.

    Adapters the model already has (e.g. from inject() before resuming) are filled in place and
    must have the file's rank; other layers the file names get new adapters. Our files re-create
    their preset's layers first."""
    path = Path(path)
    tensors, meta = _read(path)
    deltas = _deltas(path, tensors, meta, model)   # checks names and shapes before changing model
    trained = _trained_with(meta)
    if not adapters(model) and meta.get("targets") in PRESETS and trained:
        inject(model, meta["targets"], *trained)    # ours: the preset again, qkv-only slices too
    layers = []
    for name, (A, B, alpha) in deltas.items():
        m = model.get_submodule(name)
        if not isinstance(m, LoRALinear):
            m = _wrap(model, name, rank=A.shape[0], alpha=alpha)
        s0, s1 = m.out_slice
        if m.rank != A.shape[0] or m.merged:
            raise LoRAError(f"{path}: {name} has rank {A.shape[0]} but the model's adapter there "
                            f"has rank {m.rank}{' and is merged' if m.merged else ''}; "
                            f"load into a model without adapters")
        if B[:s0].any() or B[s1:].any():
            raise LoRAError(f"{path}: {name} changes rows outside the adapter's rows "
                            f"{m.out_slice}; load into a model without adapters")
        with torch.no_grad():
            m.lora_A.copy_(A)
            m.lora_B.copy_(B[s0:s1] * (scale / m.scale))
        layers.append(m)
    return _params(layers)
