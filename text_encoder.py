"""The FLUX.2 text side: the text encoders (Mistral-Small-3.2 for [dev], Qwen3-4B/8B for [klein]:
one decoder class, Qwen3 adds per-head q/k norms), loaded from HF transformers checkpoints, and the
tokenizer with both prompt templates (dev: system message, left padding; klein: ChatML with
thinking off, right padding). Tokenizers are read from their JSON files by the `tokenizers`
library: an HF tokenizer.json as it is, a Mistral tekken.json converted to a byte-level BPE.

Follows docs/flux2_reference.md §6 (§6.1 dev, §6.2 klein) and docs/oracle.md §4. The encoder
returns the hidden states FLUX.2 reads (dev: layers 10/20/30, klein: 9/18/27), stacked into the
DiT's context [B, 512, 3 x hidden]; only the layers up to the deepest one are built and read from
disk. An encoder too big for the GPU (dev's 24B Mistral on a 24 GB card) runs one layer at a time
(`encode_by_layers`): each layer is read, every pending prompt passes through it, it is dropped.
"""
import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import tokenizers
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux2 import preset_name
from util import LoadError
from weights import assign_weights, dit_config, iter_tensors, read_keys, safetensors_files


# --------------------------------------------------------------------------------------------------
# Text encoder configuration (reference §6.1 table)

@dataclass(frozen=True)
class MistralConfig:
    vocab_size: int = 131072
    hidden_size: int = 5120
    intermediate_size: int = 32768
    num_layers: int = 40                # in the checkpoint; only max(output_layers) are built
    num_heads: int = 32
    num_kv_heads: int = 8               # GQA: 4 query heads share one key/value head
    head_dim: int = 128                 # 32 x 128 = 4096 != hidden_size
    rope_theta: float = 1e9
    rms_norm_eps: float = 1e-5
    output_layers: tuple[int, ...] = (10, 20, 30)   # hidden_states read: 3 x 5120 = 15360 = context
    qk_norm: bool = False               # Qwen3 (klein): RMSNorm of each head's q and k before RoPE


TEXT_PRESETS = {
    "mistral-small-3.2": MistralConfig(),
    # klein's encoders (reference §6.2): layers 9/18/27 -> 3 x 2560 = 7680 (klein 4B),
    # 3 x 4096 = 12288 (klein 9B)
    "qwen3-4b": MistralConfig(vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                              num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                              rope_theta=1e6, rms_norm_eps=1e-6, output_layers=(9, 18, 27),
                              qk_norm=True),
    "qwen3-8b": MistralConfig(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                              num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                              rope_theta=1e6, rms_norm_eps=1e-6, output_layers=(9, 18, 27),
                              qk_norm=True),
    # For the CPU demo and tests: ids of Tokenizer.tiny() (< 1256), context 3 x 64 = 192 (the
    # "tiny" DiT preset).
    "tiny": MistralConfig(vocab_size=1280, hidden_size=64, intermediate_size=128, num_layers=4,
                          num_heads=4, num_kv_heads=2, head_dim=16, output_layers=(1, 2, 3)),
}


# --------------------------------------------------------------------------------------------------
# Mistral / Qwen3 decoder (HF `modeling_mistral.py` / `modeling_qwen3.py` semantics, attention
# through SDPA)

def rotate_half(x: Tensor) -> Tensor:
    """[x1 | x2] -> [-x2 | x1]: HF's non-interleaved RoPE pairing (channel p with p + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def mistral_rope(length: int, head_dim: int, theta: float, like: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin [L, D] for positions 0..L-1 (pads included), computed in fp32 as HF does, cast to
    like's dtype."""
    j2 = torch.arange(0, head_dim, 2, dtype=torch.float32, device=like.device)
    inv_freq = 1.0 / theta ** (j2 / head_dim)
    angles = torch.arange(length, dtype=torch.float32, device=like.device)[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)                                      # [L, D]
    return angles.cos().to(like.dtype), angles.sin().to(like.dtype)


class MistralRMSNorm(nn.Module):
    """RMS norm with a learned `weight`, in HF's order of casts."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # HF order: normalise in fp32 (even for float64 input), cast back, scale in the model dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class MistralAttention(nn.Module):
    """Causal grouped-query attention with RoPE (and Qwen3's per-head q/k norms)."""

    def __init__(self, cfg: MistralConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = MistralRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = MistralRMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        """x [B, L, H], cos/sin [L, D], mask [B, 1, L, L] (True = may attend) -> [B, L, H]."""
        B, L, _ = x.shape
        q, k, v = (proj(x).view(B, L, -1, self.head_dim).transpose(1, 2)       # [B, heads, L, D]
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        if hasattr(self, "q_norm"):                                                # Qwen3
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim ** -0.5,
                                           enable_gqa=True)
        # A left pad's query sees only earlier pads, all masked out. SDPA's math and efficient
        # kernels (CPU, and CUDA float32) return 0 for such a row, and the reference features at
        # pad positions are built on that; CUDA's cuDNN kernel (chosen for bf16) returns arbitrary
        # values there, so pin the 0 down.
        o = o.masked_fill(~mask.any(dim=-1, keepdim=True), 0)             # [B, heads, L, D]
        return self.o_proj(o.transpose(1, 2).reshape(B, L, -1))


class MistralMLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: MistralConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MistralLayer(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: MistralConfig):
        super().__init__()
        self.input_layernorm = MistralRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MistralAttention(cfg)
        self.post_attention_layernorm = MistralRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MistralMLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class MistralEncoder(nn.Module):
    """Token embeddings and the first max(output_layers) decoder layers (no final norm, lm_head)."""

    def __init__(self, cfg: MistralConfig = MistralConfig()):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MistralLayer(cfg) for _ in range(max(cfg.output_layers)))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids [B, L], attention_mask [B, L] (1 = real token) ->
        [B, L, len(output_layers) * H], per token [hs[k1] | hs[k2] | ...] where hs[k] is the
        residual stream after k layers."""
        x = self.embed_tokens(input_ids)                                              # [B, L, H]
        positions = self.positions(x, attention_mask)
        hidden = {}
        for k, layer in enumerate(self.layers, start=1):
            x = layer(x, *positions)
            hidden[k] = x
        return torch.cat([hidden[k] for k in self.cfg.output_layers], dim=-1)

    def positions(self, x: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """What every layer reads besides x [B, L, H]: RoPE cos, sin [L, D] in x's dtype and the
        causal mask [B, 1, L, L] that also hides the pads (True = may attend)."""
        L = x.shape[1]
        cos, sin = mistral_rope(L, self.cfg.head_dim, self.cfg.rope_theta, x)
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        return cos, sin, (causal & attention_mask.bool()[:, None, :])[:, None]


@torch.no_grad()
def encode_by_layers(encoder: MistralEncoder, input_ids: Tensor, attention_mask: Tensor, *,
                     load: Callable[[str, nn.Module], None], device, store) -> Tensor:
    """MistralEncoder.forward one part at a time, for an encoder built on meta that does not fit
    the GPU: `load(name, part)` gives a part its weights on `device` ("embed_tokens", "layers.0",
    ...); every prompt passes through it, one per forward as in models.encode_text (so the features
    equal the resident encoder's bit for bit), then it goes back to meta. The residual streams and
    the kept hidden states wait on `store` (the device, or the CPU when they do not fit there).
    input_ids, attention_mask [N, L] -> [N, L, len(output_layers) x H] on store."""
    N, out = len(input_ids), encoder.cfg.output_layers
    load("embed_tokens", encoder.embed_tokens)
    xs = [encoder.embed_tokens(input_ids[i:i + 1].to(device)).to(store)               # [1, L, H]
          for i in range(N)]
    encoder.embed_tokens.to("meta")
    hidden = {}
    for k, layer in enumerate(encoder.layers, start=1):
        load(f"layers.{k - 1}", layer)
        for i in range(N):      # RoPE and the mask are cheap to remake; kept, N masks would not be
            x = xs[i].to(device)
            xs[i] = layer(x, *encoder.positions(x, attention_mask[i:i + 1].to(device))).to(store)
        layer.to("meta")
        if k in out:
            hidden[k] = list(xs)
    return torch.cat([torch.cat([hidden[k][i] for k in out], dim=-1) for i in range(N)])


# --------------------------------------------------------------------------------------------------
# Loading HF transformers checkpoints (reference §6.1 key table; oracle §4.1)

# Mistral3 (old and new layouts), MistralForCausalLM / Qwen3ForCausalLM
_TEXT_PREFIXES = ("language_model.model.", "model.language_model.", "model.")
_NOT_TEXT = ("lm_head.", "language_model.lm_head.", "vision_tower.", "model.vision_tower.",
             "multi_modal_projector.", "model.multi_modal_projector.")


# Fields a config.json leaves out take the transformers config class defaults (save_pretrained
# drops those).
_TEXT_DEFAULTS = {
    "mistral": MistralConfig(),
    "qwen3": MistralConfig(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                           num_layers=32, num_heads=32, num_kv_heads=32, rope_theta=10000.0,
                           rms_norm_eps=1e-6, output_layers=(9, 18, 27), qk_norm=True),
}
_TEXT_MODELS = {"mistral": "Mistral-Small-3.2-24B-Instruct-2506 (FLUX.2 dev)",
                "qwen3": "Qwen3-4B / Qwen3-8B (klein)"}


def text_family(folder) -> str:
    """'mistral' or 'qwen3': the text model a checkpoint folder's config.json describes ('' when
    unreadable)."""
    try:
        raw = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    return raw.get("text_config", raw).get("model_type", "mistral")


def _text_config(folder: Path, layers: tuple[int, ...] | None) -> MistralConfig:
    """Encoder config from a Mistral3 (`text_config`), Mistral or Qwen3 config.json; layers None =
    the family's FLUX.2 layers ((10, 20, 30) for Mistral, (9, 18, 27) for Qwen3)."""
    file = folder / "config.json"
    if not file.is_file():
        hint = "; pass the text encoder checkpoint folder (or a FLUX.2 snapshot's text_encoder/)"
        if (folder / "text_encoder" / "config.json").is_file():
            hint = f"; pass {folder / 'text_encoder'}"
        raise LoadError(f"{folder}: no config.json{hint}")
    raw = json.loads(file.read_text())
    c = raw.get("text_config", raw)
    family = c.get("model_type", "mistral")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if family not in _TEXT_DEFAULTS or c.get("hidden_act", "silu") != "silu" \
            or rope.get("rope_type", "default") != "default" or c.get("attention_bias", False):
        raise LoadError(f"{file}: not a Mistral/Qwen3 text model with plain RoPE (model_type "
                        f"{family!r}, rope {rope.get('rope_type')!r}); pass "
                        f"{' or '.join(_TEXT_MODELS.values())}")
    d = _TEXT_DEFAULTS[family]
    heads = c.get("num_attention_heads", d.num_heads)
    cfg = MistralConfig(
        vocab_size=c.get("vocab_size", d.vocab_size),
        hidden_size=c.get("hidden_size", d.hidden_size),
        intermediate_size=c.get("intermediate_size", d.intermediate_size),
        num_layers=c.get("num_hidden_layers", d.num_layers), num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads", d.num_kv_heads),
        # Qwen3Config's head_dim defaults to 128, not hidden / heads (Qwen3-4B: 32 heads of 128 on
        # hidden 2560)
        head_dim=c.get("head_dim") or (d.head_dim if family == "qwen3" else
                                       c.get("hidden_size", d.hidden_size) // heads),
        rope_theta=float(c.get("rope_theta") or rope.get("rope_theta") or d.rope_theta),
        rms_norm_eps=c.get("rms_norm_eps", d.rms_norm_eps),
        output_layers=tuple(layers or d.output_layers), qk_norm=d.qk_norm)
    out = cfg.output_layers
    if not out or min(out) < 1 or max(out) >= cfg.num_layers:
        # HF returns hs[num_layers] after the final norm, which this encoder does not model.
        raise LoadError(f"{file}: layers {out} must lie in 1..{cfg.num_layers - 1} (hidden state "
                        f"k = output of decoder layer k); FLUX.2 uses {d.output_layers}")
    window = c.get("sliding_window") if family == "mistral" or c.get("use_sliding_window") else None
    if window is not None and window < 512:
        raise LoadError(f"{file}: sliding_window {window} < 512 is not supported; "
                        f"FLUX.2 needs full attention")
    return cfg


def _our_name(key: str, num_layers: int) -> str | None:
    """Our name for a checkpoint key; None for tensors text conditioning never reads; the key
    itself if foreign."""
    if key.startswith(_NOT_TEXT):
        return None
    prefix = next((p for p in _TEXT_PREFIXES if key.startswith(p)), None)
    if prefix is None:
        return key
    name = key[len(prefix):]
    unbuilt_layer = name.startswith("layers.") and int(name.split(".")[1]) >= num_layers
    return None if name.startswith("norm.") or unbuilt_layer else name


class TextWeights:
    """The text-encoder tensors of an HF Mistral3 / Mistral / Qwen3 checkpoint folder (one file or
    index + shards) under our names, checked from the headers and read part by part from the
    memory-mapped files; layers None = the family's FLUX.2 layers."""

    def __init__(self, path, layers=None):
        self.path = Path(path)
        self.cfg = _text_config(self.path, layers)
        with torch.device("meta"):
            names = set(MistralEncoder(self.cfg).state_dict())
        # Decide from the headers alone which tensors to read: the skipped ones (vision tower,
        # lm_head, final norm, layers 30-39 of dev) are a third of the 48 GB and never touch host
        # memory.
        self.file_of, self.name_of = {}, {}
        for file in safetensors_files(self.path):
            for key in read_keys([file]):
                name = _our_name(key, max(self.cfg.output_layers))
                if name is not None:
                    self.file_of[key], self.name_of[key] = file, name
        foreign = [k for k, name in self.name_of.items() if k == name]
        if foreign:
            raise LoadError(f"{self.path}: unexpected key {foreign[0]!r}; pass the "
                            f"transformers-format shards (model-*.safetensors + index), not "
                            f"Mistral's consolidated.safetensors")
        missing = sorted(names - set(self.name_of.values()))
        if missing:
            raise LoadError(f"{self.path}: {len(missing)} text-encoder tensors missing, e.g. "
                            f"{missing[:3]}; is the download complete?")

    def load(self, part: nn.Module, prefix: str, *, device, dtype):
        """Give `part`, the submodule `prefix` of a MistralEncoder on meta ("" = all of it, else
        e.g. "layers.3"), its tensors on `device` in `dtype`."""
        start = prefix + "." if prefix else ""
        names = {k: n[len(start):] for k, n in self.name_of.items() if n.startswith(start)}
        files = sorted({self.file_of[k] for k in names})
        tensors = ((names[k], t) for k, t in iter_tensors(files, keep=names.__contains__))
        what = f"{'Qwen3' if self.cfg.qk_norm else 'Mistral'} text encoder {prefix}".rstrip()
        assign_weights(part, tensors, device=device, dtype=dtype, source=self.path, what=what)


def load_text_encoder(path, layers=None, device="cpu", dtype=torch.bfloat16) -> MistralEncoder:
    """Load the language model of an HF Mistral3 / Mistral / Qwen3 checkpoint folder (one file or
    index + shards), reading only embeddings and layers below max(layers) from disk; layers None =
    the family's FLUX.2 layers."""
    weights = TextWeights(path, layers)
    with torch.device("meta"):
        model = MistralEncoder(weights.cfg)
    weights.load(model, "", device=device, dtype=dtype)
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# Tokenizer (reference §6.1 prompt format; oracle §4.3, §4.6)

SYSTEM_MESSAGE = ("You are an AI that reasons about image descriptions. You give structured "
                  "responses focusing on object relationships, object\nattribution and actions "
                  "without speculation.")
# Tekken control ids (mistral-common's defaults for tekken files without a special-token list).
SPECIAL_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4, "[IMG]": 10, "<pad>": 11,
               "[SYSTEM_PROMPT]": 17, "[/SYSTEM_PROMPT]": 18}
_NUM_SPECIAL = 1000  # ordinary token id = tekken rank + 1000
# Qwen3's chat-template control tokens (klein, reference §6.2); their ids are read from the
# tokenizer.json (151643-151645, 151667-151668 in Qwen3's). <|endoftext|> is the pad.
QWEN_CONTROLS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


def _byte_chars() -> str:
    """GPT-2's printable stand-in character for each byte 0..255: the alphabet of byte-level
    `tokenizers` BPE."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    others = iter(range(256, 512))
    return "".join(chr(b) if b in printable else chr(next(others)) for b in range(256))


def _byte_bpe(tokens: list[bytes], pattern: str | None) -> tokenizers.Tokenizer:
    """A byte-level BPE that reproduces tiktoken's encoding with `tokens` (list index = rank;
    id = rank + 1000).

    tiktoken repeatedly merges the adjacent pair whose concatenation has the lowest rank. A BPE
    merge list gives the same result when it holds every split of every token into two tokens,
    ordered by the rank of the result; `ignore_merges` mirrors tiktoken's shortcut of emitting a
    whole pre-token that is itself in the vocabulary."""
    to_chars = str.maketrans({chr(b): c for b, c in enumerate(_byte_chars())})
    text = [t.decode("latin-1").translate(to_chars) for t in tokens]   # bytes -> BPE's spelling
    rank = {t: r for r, t in enumerate(tokens)}
    merges = []
    for t in tokens:                                                   # rank order = merge priority
        splits = sorted((rank[t[:i]], rank[t[i:]]) for i in range(1, len(t))
                        if t[:i] in rank and t[i:] in rank)
        merges += [(text[a], text[b]) for a, b in splits]
    vocab = {s: r + _NUM_SPECIAL for r, s in enumerate(text)}
    pre = tokenizers.pre_tokenizers
    steps = [pre.ByteLevel(add_prefix_space=False, use_regex=False)]
    if pattern:
        steps.insert(0, pre.Split(tokenizers.Regex(pattern), behavior="isolated"))
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, fuse_unk=False,
                                                     ignore_merges=True))
    tok.pre_tokenizer = pre.Sequence(steps)
    tok.decoder = tokenizers.decoders.ByteLevel()
    return tok


def _from_tekken(file: Path, raw: dict) -> tokenizers.Tokenizer:
    """Convert a Mistral tekken.json (base64 token bytes by rank) to a `tokenizers` BPE."""
    config = raw["config"]
    num_special = config.get("default_num_special_tokens", _NUM_SPECIAL)
    declared = {s["token_str"]: s["rank"] for s in raw.get("special_tokens") or []}
    if num_special != _NUM_SPECIAL or any(declared.get(n, i) != i for n, i in SPECIAL_IDS.items()):
        raise LoadError(f"{file}: special tokens differ from Mistral-Small-3.x's Tekken layout; "
                        f"pass the Mistral-Small-3.1/3.2 tekken.json")
    size = config.get("default_vocab_size", 131072) - num_special
    vocab = sorted(raw["vocab"], key=lambda v: v["rank"])[:size]
    return _byte_bpe([base64.b64decode(v["token_bytes"]) for v in vocab], config["pattern"])


def _from_hf_json(file: Path, raw: dict) -> tuple[tokenizers.Tokenizer, dict[str, int]]:
    """An HF tokenizer.json with its added (control) tokens removed, so prompt text never turns
    into control ids, and the control ids the prompt template needs: Mistral's Tekken layout, or
    Qwen3's chat tokens."""
    added = {t["content"]: t["id"] for t in raw.get("added_tokens", [])}
    vocab = raw["model"].get("vocab") or {}
    if "<|im_start|>" in added:
        controls = {n: added.get(n) for n in QWEN_CONTROLS}
        if None in controls.values():
            absent = [n for n, i in controls.items() if i is None]
            raise LoadError(f"{file}: a ChatML tokenizer without {absent}; "
                            f"pass Qwen3-4B's / Qwen3-8B's tokenizer.json")
    elif any(added.get(n, vocab.get(n)) != i for n, i in SPECIAL_IDS.items()):
        raise LoadError(f"{file}: control-token ids differ from Mistral's Tekken layout (<s>=1, "
                        f"<pad>=11, ...); pass Mistral-Small-3.1's tokenizer.json (dev) or "
                        f"Qwen3's (klein)")
    else:
        controls = SPECIAL_IDS
    # Padding and truncation stored by a previous padded call would turn every token into <pad>;
    # we pad ourselves.
    raw = {**raw, "added_tokens": [], "post_processor": None, "padding": None, "truncation": None}
    return tokenizers.Tokenizer.from_str(json.dumps(raw)), controls


class Tokenizer:
    """Tekken BPE plus the FLUX.2 [dev] prompt template (left-padded), or Qwen3's BPE plus the
    klein template (right-padded): prompts -> ids and mask."""

    def __init__(self, path):
        path = Path(path)
        if path.is_dir():
            path = next((path / n for n in ("tokenizer.json", "tekken.json")
                         if (path / n).is_file()), path)
        if not path.is_file():
            raise LoadError(f"{path}: no tokenizer.json or tekken.json here; "
                            f"pass the snapshot's tokenizer/ folder")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise LoadError(f"{path}: not a JSON tokenizer file ({e}); "
                            f"the download may be truncated") from None
        self.controls = SPECIAL_IDS
        if "vocab" in raw and "config" in raw:
            self.bpe = _from_tekken(path, raw)
        elif "model" in raw:
            self.bpe, self.controls = _from_hf_json(path, raw)
        else:
            raise LoadError(f"{path}: neither an HF tokenizer.json nor a Mistral tekken.json")

    @classmethod
    def tiny(cls) -> "Tokenizer":
        """A byte-level tokenizer built in code (bytes at ids 1000..1255, no merges) for the tiny
        demo model."""
        self = cls.__new__(cls)
        self.bpe = _byte_bpe([bytes([b]) for b in range(256)], pattern=None)
        self.controls = SPECIAL_IDS
        return self

    @property
    def family(self) -> str:
        """'qwen3' (klein template) or 'mistral' (dev template)."""
        return "qwen3" if "<|im_start|>" in self.controls else "mistral"

    def encode(self, text: str) -> list[int]:
        """Ordinary token ids of text; control-token spellings in text stay plain text."""
        return self.bpe.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Text of the ordinary tokens in ids (control tokens and pads dropped)."""
        if self.family == "qwen3":
            first, last = 0, min(self.controls.values())
        else:
            first, last = _NUM_SPECIAL, 1 << 62
        return self.bpe.decode([int(i) for i in ids if first <= i < last])

    def encode_prompts(self, prompts: list[str], max_length: int = 512) -> tuple[Tensor, Tensor]:
        """Render each prompt in the family's chat format and truncate on the right; dev left-pads
        with <pad>, klein right-pads with <|endoftext|>: -> ids int64 [B, max_length], mask bool
        [B, max_length] (True = real)."""
        if self.family == "qwen3":
            return self._encode_klein(prompts, max_length)
        s = SPECIAL_IDS
        system = self.encode(SYSTEM_MESSAGE)
        # as BFL: an image token in the text would break the processor
        texts = [p.replace("[IMG]", "") for p in prompts]
        ids = torch.full((len(prompts), max_length), s["<pad>"], dtype=torch.int64)
        mask = torch.zeros(len(prompts), max_length, dtype=torch.bool)
        for i, enc in enumerate(self.bpe.encode_batch(texts, add_special_tokens=False)):
            row = [s["<s>"], s["[SYSTEM_PROMPT]"], *system, s["[/SYSTEM_PROMPT]"],
                   s["[INST]"], *enc.ids, s["[/INST]"]][:max_length]
            ids[i, max_length - len(row):] = torch.tensor(row)
            mask[i, max_length - len(row):] = True
        return ids, mask

    def _encode_klein(self, prompts: list[str], max_length: int) -> tuple[Tensor, Tensor]:
        """Qwen3's chat template with thinking off and no system message (reference §6.2):
        <|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n,
        right-padded.
        HF splits the rendered text at control tokens and encodes each piece alone, as done here."""
        c = self.controls
        nl, nl2, assistant = self.encode("\n"), self.encode("\n\n"), self.encode("assistant\n")
        ids = torch.full((len(prompts), max_length), c["<|endoftext|>"], dtype=torch.int64)
        mask = torch.zeros(len(prompts), max_length, dtype=torch.bool)
        encoded = self.bpe.encode_batch(["user\n" + p for p in prompts], add_special_tokens=False)
        for i, enc in enumerate(encoded):
            row = [c["<|im_start|>"], *enc.ids, c["<|im_end|>"], *nl, c["<|im_start|>"], *assistant,
                   c["<think>"], *nl2, c["</think>"], *nl2][:max_length]
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = True
        return ids, mask


# --------------------------------------------------------------------------------------------------
# Which DiT an encoder feeds (reference §1.1, §6)

def check_pair(dit_path, text_path, layers=None) -> None:
    """Refuse a DiT and text encoder that do not belong together: dev (guidance embedder) takes
    Mistral features, klein Qwen3 features, and the DiT's context width must be len(layers) x the
    encoder's hidden size."""
    dit, text = dit_config(dit_path), _text_config(Path(text_path), layers)
    family = "qwen3" if text.qk_norm else "mistral"
    want = "mistral" if dit.use_guidance_embed else "qwen3"
    width = len(text.output_layers) * text.hidden_size
    if family != want or width != dit.context_in_dim:
        raise LoadError(f"{text_path}: a {family} encoder giving {width}-wide features, but the "
                        f"transformer {dit_path} ({preset_name(dit)}) takes "
                        f"{dit.context_in_dim}-wide {want} features; "
                        f"use the text encoder of the same snapshot ({_TEXT_MODELS[want]})")
