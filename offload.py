"""Fitting a FLUX.2 LoRA run on one GPU or several: activation checkpointing, FSDP2 sharding (with CPU offload when
the shards do not fit), our H2D-only block streamer, and the planner that picks between them (`prepare`).

Follows docs/offload.md: §4 (non-reentrant checkpointing before every block), §1-2 and §7 (FSDP2 with
CPUOffloadPolicy, LoRA kept on the GPU and out of FSDP with ignored_params, a "cpu:gloo,cuda:nccl" process group),
§5 and §8C (a ring-buffer streamer in the style of musubi-tuner's LoRAStreamOffloader, written anew) and §6 (bytes
moved per step). It knows only "a root module plus a list of blocks in execution order": frozen parameters are those
with requires_grad=False, trainable ones (LoRA) the rest. It imports neither flux2 nor lora.

Several processes (torchrun). fsdp2 shards every frozen block and the root over all ranks; each rank keeps 1/N of
the weights, on its GPU when they fit the smallest rank's budget, else in host memory. The LoRA parameters stay
replicated outside FSDP, so `sum_gradients` reduces them explicitly, once per optimizer step.

The streamer. Each streamed block's frozen weights live in one flat host buffer (`_HostCopy`), pinned in place with
cudaHostRegister, so pinned memory is exactly the streamed bytes (the caching host allocator would round every
tensor up to a power of two, offload.md §2). The GPU holds a ring of R flat slots; streamed block number r always
uses slot r % R, and its parameters are repointed (`p.data = view`) at the slot while it is there and at its host
copy otherwise. A block's forward is replaced by `_BlockForward`, which asks the streamer for the weights and then
runs the block's own forward inside torch.utils.checkpoint. The checkpoint's recompute calls it again during
backward, so the streamer sees the visiting order  0, 1, .., n-1 (forward), n-1, .., 0 (recompute)  and prefetches
the next R-1 blocks of that order on a copy stream while the current block computes. Copies only go host -> GPU:
evicting a block is just repointing its parameters. A slot is overwritten only after an event recorded on the
compute stream, i.e. after every kernel that read its previous block; compute waits for the copy's event.
Streaming requires checkpointing when autograd records: the backward then reads weights the recompute bound.

Selective checkpointing. A checkpointed block may also keep the few outputs that cost most to recompute per byte
kept (torch's selective activation checkpointing, at op level as in torchtitan): the outputs of the MLP
down-projections (a matmul reducing over 3-4x the width: 2K FLOPs per element kept) and of the attention kernel
(4L FLOPs per element, L = tokens). Each is one block input's worth of memory per sample; the recompute then skips
those ops. The planner gives spare memory to them first (the better one first), then to blocks that skip
checkpointing altogether; and when a plan streams anyway and the step is big enough that copies hide behind
compute, it streams more blocks to make room for them.
"""
import functools
import gc
import os
import socket
import warnings
import weakref
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from util import GiB, ceil_div, print0, rank_world

STRATEGIES = ("auto", "none", "checkpoint", "stream", "fsdp2")

# Activation memory in units of one block input: tokens x width x element size (width = the blocks' hidden size).
# Calibrated on FLUX.2 [dev] shapes: bench/RESULTS.md (H200 probe, checkpointing every block) measured 4.8 GiB per
# sample at 1024² (4608 tokens) and 1.7 GiB at 512², i.e. 56 saved inputs plus a working set of 35-40 units; the
# 64-block proxy of offload.md §4 (65.6 / 70.5 / 75.4 GiB at micro-batch 1 / 2 / 3) gives 29 units for a simpler block.
SAVED_UNITS = 1    # a checkpointed block keeps only its input until backward
WORK_UNITS = 44    # the one block being recomputed and differentiated (35-40 measured, plus headroom)
KEEP_UNITS = 30    # an un-checkpointed block keeps all its saved tensors (26.3 counted for a single block + paper LoRA)
INFER_UNITS = 28   # one block's forward without autograd (22-27 measured, same probe)
# What a checkpointed block may keep so that its recompute skips the op (selective checkpointing):
MLP_K = 3          # "mlp": outputs of matmuls reducing over >= MLP_K x width: FLUX.2's MLP down-projections
MLP_UNITS = 1      #   (img_mlp.2 and txt_mlp.2 over 3x, linear2 over 4x the width; the LoRA's r-wide ones are tiny)
ATTN_UNITS = 1.05  # "attention": the attention kernel's output [B, heads, L, D] (1 unit) + its fp32 log-sum-exp

# A streamed block's copy (2 bytes per weight) hides behind its forward (2 FLOPs per weight and token) when the step
# has at least  matmul rate / copy rate  tokens: ~730 TFLOP/s / ~50 GB/s (H100/H200, pinned, offload.md) = 14,600.
# Measured on the H100 (bench/RESULTS.md §1): streaming every block costs 33% at 4,608 tokens per step (batch 1 at
# 1024²), 4% at 9,216 (batch 2) and nothing at 36,864 (batch 8).
HIDE_TOKENS = 16384


class PlanError(ValueError):
    """The run does not fit the GPU even with every block streamed; the message names the knob to turn."""


# ----------------------------------------------------------------------------------------------------------
# The plan: pure arithmetic over byte counts

@dataclass
class Plan:
    """Where every block lives and which blocks are checkpointed, with the memory and traffic that implies."""
    strategy: str                # as asked: auto | none | checkpoint | stream | fsdp2
    block_bytes: list[int]       # frozen bytes per block
    root_bytes: int              # frozen bytes outside the blocks (always on the GPU)
    resident: list[int]          # block indices kept on the GPU
    streamed: list[int]          # block indices copied in per use (by our ring, or by FSDP2)
    checkpointed: list[int]      # block indices under activation checkpointing
    ring_size: int
    peak_bytes: int              # estimated peak GPU allocation, margin excluded
    budget_bytes: int | None     # None: no GPU to fit (CPU run)
    train: bool
    batch_size: int
    tokens_per_sample: int | None = None
    world_size: int = 1          # fsdp2: ranks the blocks are sharded over
    cpu_offload: bool = True     # fsdp2: the shards live in host memory (else on the GPUs)
    compiled: bool = False       # prepare() compiled whole blocks (inference with every block resident)
    kept: dict[str, list[int]] = field(default_factory=dict)   # "mlp" / "attention": the checkpointed blocks
                                                               # keeping those outputs (selective checkpointing)
    width: int | None = None     # the blocks' hidden size (what "mlp" outputs are recognised by)

    @property
    def slot_bytes(self) -> int:
        """Size of one ring slot: the largest streamed block (0 when FSDP2 does the moving)."""
        return max((self.block_bytes[i] for i in self.streamed), default=0) if self.strategy != "fsdp2" else 0

    @property
    def h2d_bytes_per_step(self) -> int:
        """Host-to-GPU bytes per step in steady state (forward + backward recompute when training)."""
        b = [self.block_bytes[i] for i in self.streamed]
        if self.strategy == "fsdp2":     # every block twice (forward, pre-backward), the root once; each rank its shard
            return ((2 if self.train else 1) * sum(b) + self.root_bytes) // self.world_size if self.cpu_offload else 0
        R = self.ring_size
        if len(b) <= R:                  # the ring holds them all
            return 0
        if not self.train:
            return sum(b)
        # the first R blocks are still in the ring from the previous backward, the last R from this forward
        return sum(b[R:]) + sum(b[:-R])

    def describe(self) -> str:
        """A few lines for the log: resident / streamed / checkpointed blocks, memory, traffic."""
        n, size = len(self.block_bytes), _size
        res_b, str_b = (sum(self.block_bytes[i] for i in s) for s in (self.resident, self.streamed))
        tok = f" x {self.tokens_per_sample} tokens" if self.tokens_per_sample else ""
        blocks = lambda idx: f"{len(idx)} of {n} blocks" + (f" [{_ranges(idx)}]" if idx else "")
        lines = [f"offload plan '{self.strategy}' for {'training' if self.train else 'inference'}, "
                 f"batch {self.batch_size}{tok}:",
                 f"  resident: {blocks(self.resident)} ({size(res_b)}) + root {size(self.root_bytes)}"]
        W = self.world_size
        if self.strategy == "fsdp2":
            where = ("in host memory (CPUOffloadPolicy)" if self.cpu_offload else "on the GPU") + \
                (f", 1/{W} per rank" if W > 1 else "")
            lines.append(f"  streamed: {blocks(self.streamed)} ({size(str_b)}) by FSDP2 over {W} rank"
                         f"{'s' * (W > 1)}, shards {where}")
        elif self.streamed:
            lines.append(f"  streamed: {blocks(self.streamed)} ({size(str_b)} in host memory) through a "
                         f"{self.ring_size}-slot GPU ring of {size(self.slot_bytes)} slots")
        plain = [i for i in range(n) if i not in set(self.checkpointed)]
        kept = " and ".join(f"{o} output {len(k)}" for o, k in self.kept.items() if k)
        lines.append(f"  checkpointed: {len(self.checkpointed)} of {n} blocks"
                     + (f"; kept instead of recomputed: {kept}" if kept else "")
                     + (f"; blocks [{_ranges(plain)}] keep their activations" if plain and self.checkpointed else ""))
        budget = "" if self.budget_bytes is None else f" of a {size(self.budget_bytes)} budget"
        over = self.budget_bytes is not None and self.peak_bytes > self.budget_bytes
        over = " -- OVER BUDGET, expect out-of-memory" if over else ""
        where = "GPU " if self.budget_bytes is not None else ""      # no budget: a CPU run, nothing to fit
        lines.append(f"  estimated peak {where}memory {size(self.peak_bytes)}{budget}{over}")
        if self.streamed and (self.strategy != "fsdp2" or self.cpu_offload):
            lines.append(f"  host -> GPU per step: {size(self.h2d_bytes_per_step)}" + " per rank" * (W > 1))
        if self.strategy == "fsdp2" and W > 1:     # every use gathers the other ranks' (W-1)/W of the weights
            gathered = ((2 if self.train else 1) * str_b + self.root_bytes) * (W - 1) // W
            lines.append(f"  all-gathered per step: {size(gathered)} per rank")
        return "\n".join(lines)


def _size(b: int) -> str:
    return f"{b / GiB:.1f} GiB" if b >= GiB // 10 else f"{b / 2**20:.1f} MiB"


def _ranges(idx: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    out, idx = [], sorted(idx)
    for i in idx:
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)


def _stream_set(block_bytes: list[int], k: int) -> list[int]:
    """The k blocks to stream: smallest first (small ring slots, short copies), evenly spread among equal sizes so
    resident blocks sit between streamed ones and give their copies time."""
    groups = {}
    for i, b in enumerate(block_bytes):
        groups.setdefault(b, []).append(i)
    picked = []
    for size in sorted(groups):
        g, j = groups[size], min(k - len(picked), len(groups[size]))
        picked += [g[(2 * t + 1) * len(g) // (2 * j)] for t in range(j)]
    return sorted(picked)


def plan(block_bytes: list[int], root_bytes: int, budget_bytes: int | None, act_bytes_per_block_sample: int,
         batch_size: int, *, work_bytes_per_sample: int, keep_bytes_per_block_sample: int | None = None,
         kept_bytes_per_block_sample: dict[str, int] | None = None, copies_hidden: bool = False,
         trainable_bytes: int = 0, strategy: str = "auto", train: bool = True, ring_size: int = 2,
         margin_bytes: int | None = None, world_size: int = 1) -> Plan:
    """Decide resident / streamed / checkpointed blocks, and which outputs checkpointed blocks keep, from byte
    counts (a pure function); batch_size is per rank.

    Estimated peak = root + resident blocks + ring (R x largest streamed block) + trainable x 4 (AdamW: parameter,
    gradient, two moments) + B x (n_blocks x act + work) [+ B x kept[o] per block keeping output o]
    [+ B x (keep - act - sum(kept)) per block left un-checkpointed].
    `auto` keeps every block resident when that fits budget - margin (margin = min(3 GiB, 5% of the budget));
    otherwise it streams the fewest blocks that make it fit, and when copies hide behind compute (copies_hidden) as
    many more as it takes for every block to keep the outputs of `kept` (in its order, as far as it goes).
    What is left of the budget buys back recompute, in this order: checkpointed blocks keeping each output of
    `kept` (ordered best value first; every strategy but none), then the last blocks skipping checkpointing
    altogether (auto without streaming, fsdp2). Without a budget every checkpointed block keeps every output.
    Without autograd (train=False) nothing is saved and the optimizer holds no state.
    fsdp2 gathers every block per use (two blocks at a time: the current one and the prefetched one); its shards
    (blocks + root over world_size ranks) stay on the GPU when they fit as well, else in host memory. At world
    size 1 that means sharding nothing, so there it always offloads: what asking for fsdp2 on one GPU is for."""
    if strategy not in STRATEGIES:
        raise ValueError(f"offload strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    n, B = len(block_bytes), batch_size
    everything = list(range(n))
    fits = budget_bytes is None
    margin = 0 if fits else (min(3 * GiB, budget_bytes // 20) if margin_bytes is None else margin_bytes)
    fixed = root_bytes + (4 if train else 1) * trainable_bytes + B * work_bytes_per_sample
    if train:
        fixed += B * n * act_bytes_per_block_sample
    # per block keeping that output, for the whole batch
    tiers = {o: B * b for o, b in (kept_bytes_per_block_sample or {}).items()} if train and strategy != "none" else {}

    def need(streamed: list[int], kept_bytes: int = 0) -> int:   # estimated peak when these blocks stream
        ring = 0 if not streamed else (2 if strategy == "fsdp2" else ring_size) * max(block_bytes[i] for i in streamed)
        return fixed + sum(block_bytes) - sum(block_bytes[i] for i in streamed) + ring + kept_bytes

    def fewest(kept_bytes: int) -> list[int] | None:              # the smallest stream set that fits, if any
        return next((s for s in (_stream_set(block_bytes, k) for k in range(n + 1))
                     if need(s, kept_bytes) <= budget_bytes - margin), None)

    streamed, checkpointed = [], everything if train and strategy != "none" else []
    if strategy in ("stream", "fsdp2"):
        streamed = everything
    elif strategy == "auto" and not fits and need([]) > budget_bytes - margin:
        streamed = fewest(0)
        if streamed is None:
            raise PlanError(f"batch {B} does not fit a {_size(budget_bytes)} GPU even with every block streamed "
                            f"(needs ~{_size(need(everything) + margin)}): lower the batch size or resolution, or "
                            f"raise --gpu-memory-limit")
        if copies_hidden:                   # more streaming costs nothing here; recomputing does
            full = 0
            for per_block in tiers.values():
                more = fewest(full + n * per_block)
                if more is None:
                    break
                streamed, full = more, full + n * per_block
    peak, cpu_offload = need(streamed), True
    if strategy == "fsdp2" and world_size > 1:
        shards = (sum(block_bytes) + root_bytes) // world_size
        cpu_offload = not fits and peak + shards > budget_bytes - margin
        peak += 0 if cpu_offload else shards
    # spare memory buys back recompute: first the outputs worth most per byte, block by block...
    kept, everyone = {}, True
    for o, per_block in tiers.items():
        k = len(checkpointed) if fits else max(0, min(len(checkpointed), (budget_bytes - margin - peak) // per_block))
        kept[o], peak, everyone = k, peak + k * per_block, everyone and k == len(checkpointed)
        if not everyone:
            break
    # ...then whole blocks that keep all their activations instead of only their input and kept outputs.
    # FSDP2 re-gathers a block for its backward either way, so its blocks may skip checkpointing too; our own ring
    # needs the checkpoint (the backward reads the weights the recompute bound)
    extra = B * (keep_bytes_per_block_sample - act_bytes_per_block_sample) - sum(tiers.values()) \
        if keep_bytes_per_block_sample else 0
    if (strategy == "fsdp2" or strategy == "auto" and not streamed) and train and not fits and extra > 0 \
            and everyone:
        plain = max(0, min(n, (budget_bytes - margin - peak) // extra))
        checkpointed, peak = everything[:n - plain], peak + plain * extra
        kept = {o: n - plain for o in kept}
    if strategy == "none" and train:
        peak += n * extra
    return Plan(strategy, list(block_bytes), root_bytes, [i for i in everything if i not in set(streamed)], streamed,
                checkpointed, ring_size, peak, budget_bytes, train, batch_size, world_size=world_size,
                cpu_offload=cpu_offload, kept={o: checkpointed[:k] for o, k in kept.items()})


# ----------------------------------------------------------------------------------------------------------
# Host copies and the GPU ring

def _layout(tensors: list[Tensor]) -> tuple[list[int], int]:
    """Byte offsets (256-aligned, as cuBLAS likes) of tensors packed into one flat buffer, and its size."""
    offsets, end = [], 0
    for t in tensors:
        offsets.append(end)
        end += ceil_div(t.numel() * t.element_size(), 256) * 256
    return offsets, end


def _views(buf: Tensor, offsets: list[int], like: list[Tensor]) -> list[Tensor]:
    """Typed views into a flat uint8 buffer, shaped like `like`."""
    return [buf[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape) for o, t in zip(offsets, like)]


def _pin(t: Tensor, owner) -> bool:
    """Page-lock a host tensor's memory where it is (exact size, no copy) until `owner` is collected; False if the
    driver refuses (the tensor then stays pageable: correct, ~8x slower to copy)."""
    err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), _nbytes(t), 0))
    if err:
        warnings.warn(f"cudaHostRegister failed (cudaError {err}): host copies stay pageable, H2D ~8x slower")
        return False
    # owner dies before its tensors are freed (weakref callbacks run first), so the memory is unpinned while alive
    weakref.finalize(owner, torch.cuda.cudart().cudaHostUnregister, t.data_ptr()).atexit = False
    return True


class _HostCopy:
    """One block's frozen weights in one flat host buffer, page-locked on CUDA machines."""

    def __init__(self, params: list[nn.Parameter], pin: bool):
        self.params = params
        self.offsets, self.nbytes = _layout(params)
        self.buf = torch.empty(self.nbytes, dtype=torch.uint8)
        self.views = _views(self.buf, self.offsets, params)
        self.pinned = False
        sources = [p.data for p in params]
        if pin and any(s.device.type != "cpu" for s in sources):
            self.buf.zero_()            # touch the pages on all cores, pin, then copy from the GPU at DMA speed
            self.pinned = _pin(self.buf, self)
        with torch.no_grad():
            for v, s in zip(self.views, sources):
                if not s.is_meta:       # a meta model gets storage here; its values are loaded afterwards
                    v.copy_(s)
        del sources
        self.bind()                     # the old CPU tensors are freed here, one block at a time
        if pin and not self.pinned:
            self.pinned = _pin(self.buf, self)

    def bind(self):
        """Point the block's parameters at this host copy."""
        for p, v in zip(self.params, self.views):
            _assign(p, v)


class _Streamer:
    """A ring of GPU slots; streamed block r (its rank among streamed blocks) always uses slot r % R."""

    def __init__(self, hosts: list[_HostCopy], device: torch.device, ring_size: int):
        self.hosts, self.device = hosts, device
        R = min(ring_size, len(hosts))
        self.ring = [torch.empty(max(h.nbytes for h in hosts), dtype=torch.uint8, device=device) for _ in range(R)]
        self.gpu_views = [_views(self.ring[r % R], h.offsets, h.params) for r, h in enumerate(hosts)]
        self.holder = [None] * R       # rank of the block in each slot
        self.ready = [None] * R        # copy-done event of each slot
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.bytes_moved = 0

    def acquire(self, r: int, backward: bool, train: bool):
        """Make block r's weights current (compute waits for their copy) and prefetch the next R-1 blocks."""
        R = len(self.ring)
        if self.holder[r % R] != r:
            self._load(r)               # not prefetched: the first step, or the wrap-around of an odd inference loop
        if self.ready[r % R] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[r % R])
        needed = {r}
        for _ in range(R - 1):
            r, backward = self._next(r, backward, train)
            if self.holder[r % R] != r:
                if self.holder[r % R] in needed:   # that slot's block runs before this one
                    break
                self._load(r)
            needed.add(r)

    def _next(self, r: int, backward: bool, train: bool) -> tuple[int, bool]:
        """The block visited after r: forward 0..n-1, then (training) recompute n-1..0, then forward again."""
        if backward:
            return (r - 1, True) if r > 0 else (0, False)
        if r + 1 < len(self.hosts):
            return r + 1, False
        return (r, True) if train else (0, False)

    def _load(self, r: int):
        """Copy block r into its slot on the copy stream and point its parameters there."""
        k = r % len(self.ring)
        if self.holder[k] is not None:
            self.hosts[self.holder[k]].bind()     # evicted: no copy back, the host copy is the master
        h = self.hosts[r]
        dst = self.ring[k][:h.nbytes]
        if self.copy_stream is None:
            dst.copy_(h.buf)
        else:
            gate = torch.cuda.current_stream(self.device).record_event()   # after every reader of the old block
            self.copy_stream.wait_event(gate)
            with torch.cuda.stream(self.copy_stream):
                dst.copy_(h.buf, non_blocking=True)
            self.ready[k] = self.copy_stream.record_event()
        for p, v in zip(h.params, self.gpu_views[r]):
            p.data = v
        self.holder[k] = r
        self.bytes_moved += h.nbytes


# ----------------------------------------------------------------------------------------------------------
# Block forwards: checkpointing and weight binding

_COMPILED = {}   # one torch.compile per block class, shared by its blocks

# The attention kernels F.scaled_dot_product_attention dispatches to (whichever exist in this torch build)
_ATTENTION_OPS = {getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name)}
_MATMUL_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}   # what F.linear runs: mm(x, W^T), addmm


def _keep(kept: frozenset[str], min_k: int, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpoint policy: save what the kept ops return ("attention": the attention kernel; "mlp":
    matmuls reducing over at least min_k), recompute everything else."""
    save = "attention" in kept and op in _ATTENTION_OPS or \
        "mlp" in kept and op in _MATMUL_OPS and args[-2].shape[-1] >= min_k     # mm(a, b), addmm(c, a, b): a [.., K]
    return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE


class _BlockForward:
    """Stands in for `block.forward`: binds streamed weights, then runs the block's own forward, checkpointed when
    asked and autograd records (keeping the outputs named in `kept`, see _keep). Module hooks (FSDP2's) stay
    outside, as with torchtitan's checkpoint_wrapper."""

    def __init__(self, block: nn.Module, checkpointed: bool, streamer: _Streamer | None = None, rank: int = 0,
                 compile: bool = False, kept: frozenset[str] = frozenset(), min_k: int = 0):
        self.block, self.checkpointed, self.streamer, self.rank = block, checkpointed, streamer, rank
        fn = type(block).forward
        if compile and fn not in _COMPILED:
            _COMPILED[fn] = torch.compile(fn)
        self.fn = _COMPILED[fn] if compile else fn
        self.context = functools.partial(create_selective_checkpoint_contexts,
                                         functools.partial(_keep, kept, min_k)) if kept else None
        self.in_forward = self.train = False

    def __call__(self, *args, **kwargs):
        grad = torch.is_grad_enabled()
        if self.streamer is not None and grad and not self.checkpointed:
            raise RuntimeError("a streamed block ran with autograd on but without checkpointing: prepare the model "
                               "with train=True, or run it under torch.no_grad()")
        self.in_forward, self.train = True, grad and self.checkpointed
        try:
            if self.train:     # non-reentrant: block 0's LoRA gets gradients although its input does not need any
                selective = {"context_fn": self.context} if self.context else {}
                return checkpoint(self._run, *args, use_reentrant=False, **selective, **kwargs)
            return self._run(*args, **kwargs)
        finally:
            self.in_forward = False

    def _run(self, *args, **kwargs):
        if self.streamer is not None:
            backward = not self.in_forward        # the checkpoint's recompute calls us from autograd's backward
            self.streamer.acquire(self.rank, backward, train=backward or self.train)
        return self.fn(self.block, *args, **kwargs)


def apply_checkpointing(blocks: list[nn.Module]):
    """Non-reentrant activation checkpointing around every block (weights stay where they are)."""
    for b in blocks:
        b.forward = _BlockForward(b, checkpointed=True)


# ----------------------------------------------------------------------------------------------------------
# Placing a plan

class _State:
    """What prepare() did to a model: host copies per block, the ring, FSDP2's pinned shards."""

    def __init__(self):
        self.hosts: dict[nn.Module, _HostCopy] = {}
        self.streamer: _Streamer | None = None
        self.blocks: list[nn.Module] = []
        self.fsdp = False
        self.fsdp_pinned = 0


def _state(model: nn.Module) -> _State:
    if "_offload" not in model.__dict__:
        model.__dict__["_offload"] = _State()
    return model.__dict__["_offload"]


def _frozen(block: nn.Module) -> list[nn.Parameter]:
    return [p for p in block.parameters() if not p.requires_grad]


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _assign(p: Tensor, t: Tensor):
    """Point p at t's storage, keeping the Parameter object (an optimizer may already hold it)."""
    if p.is_meta:       # set_data refuses to turn meta into a real tensor; swapping the contents does it
        torch.utils.swap_tensors(p, nn.Parameter(t, requires_grad=p.requires_grad))
    else:
        p.data = t


def _move(p: Tensor, device: torch.device):
    """Give p storage on `device` (uninitialised when p is on meta)."""
    if p.device != device:
        _assign(p, torch.empty_like(p, device=device) if p.is_meta else p.data.to(device))


def _move_buffers(model: nn.Module, device: torch.device):
    for m in model.modules():
        for k, b in m._buffers.items():
            if b is not None and b.device != device:
                m._buffers[k] = torch.empty_like(b, device=device) if b.is_meta else b.to(device)


def _device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _kept_by(p: Plan, i: int) -> tuple[frozenset[str], int]:
    """What block i keeps instead of recomputing, and the reduction size that marks an "mlp" matmul."""
    return frozenset(o for o, idx in p.kept.items() if i in idx), MLP_K * (p.width or 0)


def _apply(model: nn.Module, blocks: list[nn.Module], p: Plan, device: torch.device, keep_host_copy: bool,
           compile: bool):
    """Move storage to where the plan says and install the block forwards (callable again with a new plan)."""
    state = _state(model)
    if state.fsdp:
        raise ValueError("this model was prepared with fsdp2, which cannot be undone: build a new model to re-plan")
    _synchronize(device)
    if state.streamer is not None:     # blocks still in the old ring go back to their host copies first
        for h in state.streamer.hosts:
            h.bind()
    state.streamer, state.blocks = None, list(blocks)
    pin = device.type == "cuda"
    for i in p.streamed:        # streamed blocks leave the GPU first, so the memory is free for what comes next
        b = blocks[i]
        if b not in state.hosts:
            state.hosts[b] = _HostCopy(_frozen(b), pin)
        state.hosts[b].bind()
    streamed = {id(q) for i in p.streamed for q in _frozen(blocks[i])}
    for q in model.parameters():
        if id(q) not in streamed:
            _move(q, device)
    _move_buffers(model, device)
    if not keep_host_copy:
        for b in [b for b in state.hosts if all(b is not blocks[i] for i in p.streamed)]:
            del state.hosts[b]
    if p.streamed:
        state.streamer = _Streamer([state.hosts[blocks[i]] for i in p.streamed], device, p.ring_size)
    rank, ckpt = {i: r for r, i in enumerate(p.streamed)}, set(p.checkpointed)
    for i, b in enumerate(blocks):
        b.forward = _BlockForward(b, i in ckpt, state.streamer if i in rank else None, rank.get(i, 0), compile,
                                  *_kept_by(p, i))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched() -> bool:
    """Whether torchrun (or an equivalent launcher) started this process: it sets RANK and WORLD_SIZE."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_process_group(device: torch.device):
    """A process group for FSDP2: torchrun's when launched by it, else a world of one (offload.md §1). Under
    torchrun, `device` is this process's GPU (cuda:LOCAL_RANK) or the CPU (gloo)."""
    if dist.is_initialized():
        return
    # generous: before training, ranks wait at a barrier while others cache latents or load the 24B text encoder
    timeout = timedelta(minutes=30)
    if device.type == "cpu":
        if launched():
            dist.init_process_group("gloo", timeout=timeout)
        else:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        return
    if not launched():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    # gloo for CPU tensors too: gradients and norms of offloaded shards live there once world size > 1
    dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device, timeout=timeout)


def leave_process_group():
    """Destroy the process group, if any, and free it now; call it once the model is out of scope.

    destroy_process_group() only unregisters the group. The sharded model (in reference cycles) and DTensor's
    sharding cache still hold it, so it used to die during interpreter shutdown. A gloo worker thread dropping the
    last reference to a tensor then has to take the GIL and aborts the process ("terminate called without an
    active exception"; 5 of 289 two-rank CPU runs). Freed here, its destructor joins the workers first."""
    if not dist.is_initialized():
        return
    dist.destroy_process_group()
    import torch.distributed.tensor.debug as dtensor_debug
    clear_cache = getattr(dtensor_debug, "_clear_sharding_prop_cache", None)     # private: skipped if renamed
    if clear_cache is not None:
        clear_cache()
    gc.collect()


def sum_gradients(params: list[Tensor]):
    """Sum the gradients of replicated parameters over all ranks in one flat all-reduce. FSDP2 leaves the LoRA
    parameters alone (ignored_params), so this is their data-parallel reduction; with each rank's loss its share of
    the global batch's mean, the sum is the global batch's gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    if rank_world()[1] == 1 or not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])            # one fp32 buffer: one collective, not one per tensor
    dist.all_reduce(flat)
    for g, r in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(r.view_as(g))


def _apply_fsdp2(model: nn.Module, blocks: list[nn.Module], p: Plan, device: torch.device):
    """fully_shard every block, then the root, over all ranks, with CPU offload when the plan says so; LoRA stays a
    plain GPU parameter (ignored_params)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    state = _state(model)
    if state.fsdp or state.hosts:
        raise ValueError("this model was already prepared: build a new model to use fsdp2")
    init_process_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))   # explicit: the default mesh may mismatch (#132471)
    on_gpu, host = device.type == "cuda", p.cpu_offload
    # pin_memory=False, then pin each shard in place below: FSDP's own pinning rounds every tensor up to a power
    # of two (58.5 -> ~90 GiB for FLUX.2, offload.md §2). cast_forward_inputs=False keeps the fp32 RoPE tensors fp32.
    kw = dict(mesh=mesh, offload_policy=CPUOffloadPolicy(pin_memory=False) if host else OffloadPolicy(),
              mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16 if on_gpu else None,
                                             reduce_dtype=torch.float32, cast_forward_inputs=False))
    trainable, ckpt = [q for q in model.parameters() if q.requires_grad], set(p.checkpointed)
    for q in trainable:                 # FSDP neither moves nor casts ignored parameters
        _move(q, device)
    for i, b in enumerate(blocks):
        b.forward = _BlockForward(b, i in ckpt, None, 0, False, *_kept_by(p, i))
        fully_shard(b, ignored_params={q for q in b.parameters() if q.requires_grad}, **kw)
    fully_shard(model, ignored_params=set(trainable), **kw)
    state.fsdp, state.blocks, meta = True, list(blocks), any(q.is_meta for q in model.parameters())
    if meta:                            # torchtitan's order: shard on meta, then allocate the shards
        model.to_empty(device="cpu" if host else device)   # (takes LoRA along, keeping it: back to the device)
        for q in trainable:
            _move(q, device)
    _move_buffers(model, device)
    for q in model.parameters():
        local = q.to_local() if isinstance(q, DTensor) else None
        if host and on_gpu and local is not None and _nbytes(local) >= 2**20:   # small ones may share a page
            if meta:
                local.zero_()           # touch the pages on all cores before pinning; values are loaded later
            state.fsdp_pinned += _nbytes(local) if _pin(local, q) else 0


# ----------------------------------------------------------------------------------------------------------
# The entry points

def _width_and_itemsize(blocks: list[nn.Module]) -> tuple[int, int]:
    """The blocks' hidden size (smallest in_features of their frozen Linears) and weight element size."""
    lin = [m for b in blocks for m in b.modules() if isinstance(m, nn.Linear) and not m.weight.requires_grad]
    if not lin:
        raise ValueError("offload: the blocks contain no frozen nn.Linear, so their hidden size is unknown")
    return min(m.in_features for m in lin), lin[0].weight.element_size()


def cap_gpu_memory(device, gib: float | None):
    """Make the caching allocator refuse more than `gib` GiB on this GPU (OutOfMemoryError past it), so a plan made
    with --gpu-memory-limit for a smaller card is held to it on a bigger one. The CUDA context and library
    workspaces (~0.5-1 GiB) are outside the allocator: a real card of that size needs that much more."""
    device = _device(device)
    if gib is not None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GiB / total), device)


def _budget(model: nn.Module, device: torch.device) -> int:
    """GPU bytes this model may use: free memory plus what the model already holds there; with several ranks the
    smallest rank's, so that every rank takes the same decisions."""
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    state = _state(model)
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in [*model.parameters(), *model.buffers(), *(state.streamer.ring if state.streamer else [])]
            if t.device == device}
    budget = torch.tensor([free + sum(held.values())], device=device)
    if rank_world()[1] > 1:
        dist.all_reduce(budget, op=dist.ReduceOp.MIN)
    return int(budget.item())


def _kept_outputs(unit: int, width: int, tokens_per_sample: int) -> dict[str, int]:
    """Bytes per block and sample of each output a checkpointed block may keep, best value first: recompute FLOPs
    per element kept are 2K >= 2 x MLP_K x width for an MLP matmul, 4L for attention (L = tokens per sample)."""
    outputs = {"mlp": (int(MLP_UNITS * unit), 2 * MLP_K * width), "attention": (int(ATTN_UNITS * unit),
                                                                               4 * tokens_per_sample)}
    return {o: b for o, (b, _) in sorted(outputs.items(), key=lambda kv: -kv[1][1])}


def plan_for(model: nn.Module, blocks: list[nn.Module], *, strategy: str = "auto", device, batch_size: int,
             tokens_per_sample: int, train: bool = True, gpu_memory_limit: float | None = None,
             ring_size: int = 2, selective: bool = True) -> Plan:
    """The plan prepare() would apply, measured from the model (nothing is moved); batch_size is this rank's.
    selective=False: checkpointed blocks keep nothing but their input (the report's plain checkpointing)."""
    device = _device(device)
    if strategy not in STRATEGIES:
        raise ValueError(f"offload strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    in_blocks = {id(q) for b in blocks for q in b.parameters()}
    block_bytes = [sum(_nbytes(q) for q in _frozen(b)) + sum(_nbytes(t) for t in b.buffers()) for b in blocks]
    root_bytes = sum(_nbytes(q) for q in model.parameters() if not q.requires_grad and id(q) not in in_blocks)
    trainable = sum(_nbytes(q) for q in model.parameters() if q.requires_grad)
    width, itemsize = _width_and_itemsize(blocks)
    unit = tokens_per_sample * width * itemsize
    budget, asked = None, strategy
    if gpu_memory_limit is not None:
        budget = int(gpu_memory_limit * GiB)
    elif device.type == "cuda":
        budget = _budget(model, device)
    elif strategy != "fsdp2":          # a CPU run without a limit: nothing to fit, every block stays resident
        strategy = "none" if strategy == "none" or not train else "checkpoint"
    out = plan(block_bytes, root_bytes, budget, SAVED_UNITS * unit, batch_size,
               work_bytes_per_sample=(WORK_UNITS if train else INFER_UNITS) * unit,
               keep_bytes_per_block_sample=KEEP_UNITS * unit,
               kept_bytes_per_block_sample=_kept_outputs(unit, width, tokens_per_sample) if selective else None,
               copies_hidden=batch_size * tokens_per_sample >= HIDE_TOKENS, trainable_bytes=trainable,
               strategy=strategy, train=train, ring_size=ring_size, world_size=rank_world()[1])
    out.strategy, out.tokens_per_sample, out.width = asked, tokens_per_sample, width
    return out


def prepare(model: nn.Module, blocks: list[nn.Module], *, strategy: str = "auto", device, batch_size: int,
            tokens_per_sample: int, train: bool = True, gpu_memory_limit: float | None = None, ring_size: int = 2,
            compile: bool = False, keep_host_copy: bool = False, selective: bool = True) -> Plan:
    """Place the model for training or inference: root and trainable parameters on `device`, each block resident,
    streamed or FSDP2-sharded, checkpointing when training; prints and returns the plan.

    Works on a model whose weights are on the CPU (moved block by block, each CPU tensor freed once copied, so host
    memory never holds two copies), on the device, or on meta (storage is allocated where the plan puts it; load
    values afterwards, before the first forward). On a CPU device every strategy but fsdp2 keeps all blocks
    resident, unless gpu_memory_limit (GiB) is given: then the plan runs on the CPU as it would on such a GPU, with
    synchronous copies (tests, dry runs). May be called again with another plan (not after fsdp2);
    keep_host_copy=True keeps host copies of blocks that become resident, so re-plans need no pinning.
    selective=False: checkpointed blocks keep nothing but their input (see plan()).
    Under torchrun, fsdp2 shards over every rank (all ranks call this with the same arguments)."""
    device = _device(device)
    p = plan_for(model, blocks, strategy=strategy, device=device, batch_size=batch_size,
                 tokens_per_sample=tokens_per_sample, train=train, gpu_memory_limit=gpu_memory_limit,
                 ring_size=ring_size, selective=selective)
    # Whole blocks are compiled for inference only, and only when every block is resident (sample.py). In training
    # they failed three times (NaN gradients and illegal memory accesses next to streamed weights, a cuDNN attention
    # crash: bench/RESULTS.md §1, §6) and hide their ops from the selective checkpoint; training compiles the glue
    # between the matmuls instead (flux2.fuse).
    p.compiled = compile and not train and not p.streamed and strategy != "fsdp2"
    if strategy == "fsdp2":
        _apply_fsdp2(model, blocks, p, device)
    else:
        _apply(model, blocks, p, device, keep_host_copy, p.compiled)
    print0(p.describe())
    return p


def stats(model: nn.Module) -> dict:
    """Host bytes pinned for this model and host-to-GPU bytes the streamer moved so far."""
    state = _state(model)
    pinned = sum(h.nbytes for h in state.hosts.values() if h.pinned) + state.fsdp_pinned
    return {"pinned_bytes": pinned, "host_copy_bytes": sum(h.nbytes for h in state.hosts.values()),
            "moved_bytes": state.streamer.bytes_moved if state.streamer else 0}


def release(model: nn.Module):
    """Remove the block forwards and drop host copies and the ring (streamed weights end up on the CPU)."""
    state = _state(model)
    for b in state.blocks:
        b.__dict__.pop("forward", None)
    if state.streamer is not None:
        _synchronize(state.streamer.device)
        for h in state.hosts.values():
            h.bind()
    model.__dict__.pop("_offload", None)
