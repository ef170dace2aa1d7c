"""The offload planner: pure arithmetic over byte counts that decides, for one run, which blocks of
the DiT stay on the GPU, which are streamed (by offload.py's ring or by FSDP2), which are
checkpointed, and which outputs a checkpointed block keeps instead of recomputing. offload.py
measures the model and applies the plan; this file only counts. Follows docs/offload.md §6 (bytes
moved per step) and the calibrations in bench/RESULTS.md §6.
"""
from dataclasses import dataclass, field

from util import GiB, LoadError

STRATEGIES = ("auto", "none", "checkpoint", "stream", "fsdp2")


# Activation memory in units of one block input: tokens x width x element size (width = the blocks'
# hidden size). Calibrated on FLUX.2 [dev] shapes: bench/RESULTS.md (H200 probe, checkpointing every
# block) measured 4.8 GiB per sample at 1024² (4608 tokens) and 1.7 GiB at 512², i.e. 56 saved
# inputs plus a working set of 35-40 units; the 64-block proxy of offload.md §4 (65.6 / 70.5 / 75.4
# GiB at micro-batch 1 / 2 / 3) gives 29 units for a simpler block.
SAVED_INPUT_UNITS = 1          # a checkpointed block keeps only its input until backward
TRAIN_WORKING_SET_UNITS = 44   # the block recomputed and differentiated (35-40 measured + headroom)
INFER_WORKING_SET_UNITS = 28   # one block's forward without autograd (22-27 measured, same probe)
WHOLE_BLOCK_UNITS = 30         # an un-checkpointed block keeps all its saved tensors (26.3 counted
                               # for a single block with paper LoRA)
# What a checkpointed block may keep so that its recompute skips the op (selective checkpointing):
# "mlp", the outputs of matmuls reducing over >= MLP_MIN_K x width: FLUX.2's MLP down-projections
# (img_mlp.2 and txt_mlp.2 over 3x, linear2 over 4x the width; the LoRA's r-wide ones are tiny), and
# "attention", the kernel's output [B, heads, L, D] (1 unit) plus its fp32 log-sum-exp.
MLP_MIN_K = 3
MLP_OUTPUT_UNITS = 1
ATTENTION_OUTPUT_UNITS = 1.05

# A streamed block's copy (2 bytes per weight) hides behind its forward (2 FLOPs per weight and
# token) when the step has at least  matmul rate / copy rate  tokens: ~730 TFLOP/s / ~50 GB/s
# (H100/H200, pinned, offload.md) = 14,600. Measured on the H100 (bench/RESULTS.md §1): streaming
# every block costs 33% at 4,608 tokens per step (batch 1 at 1024²), 4% at 9,216 (batch 2) and
# nothing at 36,864 (batch 8).
HIDE_TOKENS = 16384


class PlanError(ValueError):
    """The run does not fit the GPU even with every block streamed, or the host memory it would pin
    exceeds the host budget; the message names the budget, the shortfall and the fix."""


class OutOfMemory(LoadError):
    """The GPU or host ran out of memory although the plan fitted (an estimate, or memory used by
    others); the message names the budget, what the plan wanted and the flags that help."""


# The flags that change how much memory a run needs, named in every out-of-memory message
MEMORY_FLAGS = "--gpu-memory-limit, --host-memory-limit, --batch-size, --offload stream"


def out_of_memory(budget: str, *, during: str, plan: "Plan | None" = None,
                  limit_bytes: int | None = None) -> OutOfMemory:
    """The one-line error for running out of `budget` ("GPU" or "host") while `during`: what the
    plan wanted of that budget (when there is a plan) and which flags help."""
    limit = f" (limit {_size(limit_bytes)})" if limit_bytes is not None else ""
    wanted = ""
    if plan is not None:
        want = plan.peak_bytes if budget == "GPU" else plan.host_bytes
        wanted = (f"; the offload plan '{plan.strategy}' for batch {plan.batch_size} wanted "
                  f"~{_size(want)} of it")
    return OutOfMemory(f"{budget} memory ran out{limit} while {during}{wanted}; lower what the "
                       f"run needs or raise what it may use: {MEMORY_FLAGS}")


@dataclass(frozen=True)
class ActivationBytes:
    """Activation bytes per sample a plan budgets for (plan_for derives them from the units)."""
    saved_input: int     # per checkpointed block: its input, kept until backward
    working_set: int     # the one block running (with autograd: recomputed and differentiated)
    whole_block: int     # per block not checkpointed: every tensor its backward needs
    # per checkpointed block, each output it may keep instead of recomputing ("mlp", "attention"),
    # best value per byte first (selective checkpointing); {}: each keeps only its input
    kept_outputs: dict[str, int] = field(default_factory=dict)


def kept_outputs(unit: int, *, width: int, tokens_per_sample: int) -> dict[str, int]:
    """Bytes per block and sample of each output a checkpointed block may keep, best value first:
    recompute FLOPs per element kept are 2K >= 2 x MLP_MIN_K x width for an MLP matmul, 4L for
    attention (L = tokens)."""
    outputs = {"mlp": (int(MLP_OUTPUT_UNITS * unit), 2 * MLP_MIN_K * width),
               "attention": (int(ATTENTION_OUTPUT_UNITS * unit), 4 * tokens_per_sample)}
    return {o: b for o, (b, _) in sorted(outputs.items(), key=lambda kv: -kv[1][1])}


@dataclass(frozen=True)
class Plan:
    """Where every block lives and which are checkpointed, with the memory and traffic implied."""
    strategy: str                # as asked: auto | none | checkpoint | stream | fsdp2
    block_bytes: list[int]       # frozen bytes per block
    root_bytes: int              # frozen bytes outside the blocks (always on the GPU)
    resident: list[int]          # block indices kept on the GPU
    streamed: list[int]          # block indices copied in per use (by our ring, or by FSDP2)
    checkpointed: list[int]      # block indices under activation checkpointing
    kept: dict[str, list[int]]   # "mlp" / "attention": the checkpointed blocks keeping that output
    ring_size: int
    peak_bytes: int              # estimated peak GPU allocation, margin excluded
    budget_bytes: int | None     # None: no GPU to fit (CPU run)
    train: bool
    batch_size: int
    tokens_per_sample: int | None = None
    width: int | None = None     # the blocks' hidden size (what "mlp" outputs are recognised by)
    world_size: int = 1          # fsdp2: ranks the blocks are sharded over
    cpu_offload: bool = True     # fsdp2: the shards live in host memory (else on the GPUs)
    compiled: bool = False       # whole blocks run compiled (inference with every block resident)
    host_budget_bytes: int | None = None   # host memory the run may pin (None: no limit)

    @property
    def host_bytes(self) -> int:
        """Host memory holding streamed weights (pinned on CUDA machines): our ring's host copies,
        or this rank's FSDP2 shards when they live in host memory."""
        if self.strategy == "fsdp2":
            if not self.cpu_offload:
                return 0
            return (sum(self.block_bytes) + self.root_bytes) // self.world_size
        return sum(self.block_bytes[i] for i in self.streamed)

    @property
    def slot_bytes(self) -> int:
        """Size of one ring slot: the largest streamed block (0 when FSDP2 does the moving)."""
        if self.strategy == "fsdp2":
            return 0
        return max((self.block_bytes[i] for i in self.streamed), default=0)

    @property
    def h2d_bytes_per_step(self) -> int:
        """Host-to-GPU bytes per step in steady state (forward + recompute when training)."""
        b = [self.block_bytes[i] for i in self.streamed]
        if self.strategy == "fsdp2":     # each block twice (forward, pre-backward), the root once
            if not self.cpu_offload:
                return 0
            return ((2 if self.train else 1) * sum(b) + self.root_bytes) // self.world_size
        R = self.ring_size
        if len(b) <= R:                  # the ring holds them all
            return 0
        if not self.train:
            return sum(b)
        # the first R blocks are still in the ring from the last backward, the last R from this one
        return sum(b[R:]) + sum(b[:-R])

    def describe(self) -> str:
        """A few lines for the log: resident / streamed / checkpointed blocks, memory, traffic."""
        n, W = len(self.block_bytes), self.world_size
        resident_bytes = sum(self.block_bytes[i] for i in self.resident)
        streamed_bytes = sum(self.block_bytes[i] for i in self.streamed)
        tokens = f" x {self.tokens_per_sample} tokens" if self.tokens_per_sample else ""
        blocks = lambda idx: f"{len(idx)} of {n} blocks" + (f" [{_ranges(idx)}]" if idx else "")
        lines = [f"offload plan '{self.strategy}' for {'training' if self.train else 'inference'}, "
                 f"batch {self.batch_size}{tokens}:",
                 f"  resident: {blocks(self.resident)} ({_size(resident_bytes)}) "
                 f"+ root {_size(self.root_bytes)}"]
        if self.strategy == "fsdp2":
            where = "in host memory (CPUOffloadPolicy)" if self.cpu_offload else "on the GPU"
            where += f", 1/{W} per rank" if W > 1 else ""
            lines.append(f"  streamed: {blocks(self.streamed)} ({_size(streamed_bytes)}) "
                         f"by FSDP2 over {W} rank{'s' * (W > 1)}, shards {where}")
        elif self.streamed:
            lines.append(f"  streamed: {blocks(self.streamed)} ({_size(streamed_bytes)} in host "
                         f"memory) through a {self.ring_size}-slot GPU ring of "
                         f"{_size(self.slot_bytes)} slots")
        plain = [i for i in range(n) if i not in set(self.checkpointed)]
        kept = " and ".join(f"{o} output {len(k)}" for o, k in self.kept.items() if k)
        lines.append(f"  checkpointed: {len(self.checkpointed)} of {n} blocks"
                     + (f"; kept instead of recomputed: {kept}" if kept else "")
                     + (f"; blocks [{_ranges(plain)}] keep their activations"
                        if plain and self.checkpointed else ""))
        fits = self.budget_bytes is None            # no budget: a CPU run, nothing to fit
        budget = "" if fits else f" of a {_size(self.budget_bytes)} budget"
        over = not fits and self.peak_bytes > self.budget_bytes
        over = " -- OVER BUDGET, expect out-of-memory" if over else ""
        where = "" if fits else "GPU "
        lines.append(f"  estimated peak {where}memory {_size(self.peak_bytes)}{budget}{over}")
        if self.host_bytes or self.host_budget_bytes is not None:
            host_budget = ("" if self.host_budget_bytes is None
                           else f" of a {_size(self.host_budget_bytes)} host budget")
            lines.append(f"  host memory for streamed weights: {_size(self.host_bytes)}"
                         f"{host_budget}" + " per rank" * (W > 1))
        if self.streamed and (self.strategy != "fsdp2" or self.cpu_offload):
            lines.append(f"  host -> GPU per step: {_size(self.h2d_bytes_per_step)}"
                         + " per rank" * (W > 1))
        if self.strategy == "fsdp2" and W > 1:   # each use gathers the other ranks' (W-1)/W
            gathered = ((2 if self.train else 1) * streamed_bytes + self.root_bytes) * (W - 1) // W
            lines.append(f"  all-gathered per step: {_size(gathered)} per rank")
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
    """The k blocks to stream: smallest first (small ring slots, short copies), evenly spread among
    equal sizes so resident blocks sit between streamed ones and give their copies time."""
    groups = {}
    for i, b in enumerate(block_bytes):
        groups.setdefault(b, []).append(i)
    picked = []
    for size in sorted(groups):
        g, j = groups[size], min(k - len(picked), len(groups[size]))
        picked += [g[(2 * t + 1) * len(g) // (2 * j)] for t in range(j)]
    return sorted(picked)


@dataclass(frozen=True)
class _Fit:
    """A plan's estimated peak as a function of the blocks it streams; the memory it must fit."""
    block_bytes: list[int]
    fixed_bytes: int             # the same wherever blocks live: root, optimizer, activations
    ring_slots: int              # GPU slots streamed blocks pass through, each the largest's size
    budget_bytes: int | None     # None: no GPU to fit (a CPU run)
    margin_bytes: int
    host_budget_bytes: int | None = None   # what streamed blocks may take of host memory

    @property
    def available(self) -> int | None:
        return None if self.budget_bytes is None else self.budget_bytes - self.margin_bytes

    def peak(self, streamed: list[int], kept_bytes: int = 0) -> int:
        """Estimated peak when these blocks stream, plus kept_bytes of kept outputs."""
        ring = self.ring_slots * max((self.block_bytes[i] for i in streamed), default=0)
        resident = sum(self.block_bytes) - sum(self.block_bytes[i] for i in streamed)
        return self.fixed_bytes + resident + ring + kept_bytes

    def fewest_streamed(self, kept_bytes: int = 0) -> list[int] | None:
        """The smallest stream set (by _stream_set) whose peak fits, if any."""
        sets = (_stream_set(self.block_bytes, k) for k in range(len(self.block_bytes) + 1))
        return next((s for s in sets if self.peak(s, kept_bytes) <= self.available), None)

    def host_fits(self, streamed: list[int]) -> bool:
        """Whether these blocks' host copies fit the host budget."""
        host = sum(self.block_bytes[i] for i in streamed)
        return self.host_budget_bytes is None or host <= self.host_budget_bytes


def plan(block_bytes: list[int], root_bytes: int, *, activations: ActivationBytes,
         batch_size: int, budget_bytes: int | None, trainable_bytes: int = 0,
         strategy: str = "auto", train: bool = True, ring_size: int = 2, world_size: int = 1,
         margin_bytes: int | None = None, tokens_per_sample: int | None = None,
         width: int | None = None, compile: bool = False,
         host_budget_bytes: int | None = None, reserve_bytes: int = 0) -> Plan:
    """Decide resident / streamed / checkpointed blocks, and which outputs checkpointed blocks keep,
    from byte counts (a pure function); batch_size is per rank, activations are per sample.

    Estimated peak = root + resident blocks + ring (R x largest streamed block)
        + trainable x 4 (AdamW: parameter, gradient, two moments)
        + max(B x (n_blocks x saved_input + working_set), reserve_bytes)
        [+ B x kept_outputs[o] per block keeping output o]
        [+ B x (whole_block - saved_input - sum(kept_outputs)) per block not checkpointed].
    Without autograd (train=False) nothing is saved and the optimizer holds no state. The peak must
    fit the budget less a margin (default min(3 GiB, 5%)); without a budget (a CPU run) nothing
    needs to fit and only fsdp2 moves blocks. Streamed blocks (or fsdp2's shards in host memory)
    must also fit host_budget_bytes (None: no limit). reserve_bytes: what a decode between forwards
    needs. Steps: _blocks_to_stream (tokens_per_sample: do copies hide, HIDE_TOKENS),
    _fsdp2_shards, _spend_spare_memory."""
    if strategy not in STRATEGIES:
        raise ValueError(f"offload strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    n, B = len(block_bytes), batch_size
    checkpointing = train and strategy != "none"
    checkpointed = list(range(n)) if checkpointing else []
    kept_tiers = ({o: B * b for o, b in activations.kept_outputs.items()}   # per block keeping o
                  if checkpointing else {})
    acts = B * activations.working_set + (B * n * activations.saved_input if train else 0)
    fixed = root_bytes + (4 if train else 1) * trainable_bytes + max(acts, reserve_bytes)
    if margin_bytes is None:
        margin_bytes = 0 if budget_bytes is None else min(3 * GiB, budget_bytes // 20)
    fit = _Fit(list(block_bytes), fixed, ring_slots=2 if strategy == "fsdp2" else ring_size,
               budget_bytes=budget_bytes, margin_bytes=margin_bytes,
               host_budget_bytes=host_budget_bytes)
    streamed = _blocks_to_stream(fit, strategy=strategy, batch_size=B, kept_tiers=kept_tiers,
                                 copies_hidden=tokens_per_sample is not None
                                 and B * tokens_per_sample >= HIDE_TOKENS)
    peak, cpu_offload = fit.peak(streamed), True
    if strategy == "fsdp2":
        peak, cpu_offload = _fsdp2_shards(fit, peak, world_size=world_size,
                                          shard_bytes=(sum(block_bytes) + root_bytes) // world_size)
    # a block that skips checkpointing keeps every activation instead of its input and kept outputs.
    # FSDP2 gathers a block again for its backward either way, so its blocks may skip checkpointing;
    # our ring needs the checkpoint (the backward reads the weights the recompute bound)
    skip_bytes = B * (activations.whole_block - activations.saved_input) - sum(kept_tiers.values())
    checkpointed, kept, peak = _spend_spare_memory(
        fit, peak, checkpointed=checkpointed, kept_tiers=kept_tiers, skip_bytes=skip_bytes,
        may_skip=train and (strategy == "fsdp2" or strategy == "auto" and not streamed))
    if strategy == "none" and train:             # no block is checkpointed
        peak += n * skip_bytes
    # whole compiled blocks only for inference with every block resident: in training they hide
    # their ops from the selective checkpoint, and fail next to streamed weights (bench/RESULTS.md)
    compiled = compile and not train and not streamed and strategy != "fsdp2"
    return Plan(strategy=strategy, block_bytes=list(block_bytes), root_bytes=root_bytes,
                resident=[i for i in range(n) if i not in set(streamed)], streamed=streamed,
                checkpointed=checkpointed, kept=kept, ring_size=ring_size, peak_bytes=peak,
                budget_bytes=budget_bytes, train=train, batch_size=batch_size,
                tokens_per_sample=tokens_per_sample, width=width, world_size=world_size,
                cpu_offload=cpu_offload, compiled=compiled, host_budget_bytes=host_budget_bytes)


def _fsdp2_shards(fit: _Fit, peak: int, *, shard_bytes: int, world_size: int) -> tuple[int, bool]:
    """(peak, cpu_offload): with several ranks fsdp2's shards stay on the GPUs when they fit there
    beside the peak; otherwise they live in host memory, which must hold them."""
    if world_size > 1 and (fit.available is None or peak + shard_bytes <= fit.available):
        return peak + shard_bytes, False
    _check_host(fit, shard_bytes, what="FSDP2's shards in host memory",
                fix="use more GPUs (torchrun)")
    return peak, True


def _check_host(fit: _Fit, host_bytes: int, *, what: str, fix: str):
    """PlanError when host_bytes exceed the host budget: by how much, and what helps."""
    if fit.host_budget_bytes is not None and host_bytes > fit.host_budget_bytes:
        raise PlanError(f"{what} need {_size(host_bytes)} of host memory, "
                        f"{_size(host_bytes - fit.host_budget_bytes)} more than the "
                        f"{_size(fit.host_budget_bytes)} host budget: raise --host-memory-limit "
                        f"(or free host memory), or {fix}")


def _blocks_to_stream(fit: _Fit, *, strategy: str, batch_size: int, kept_tiers: dict[str, int],
                      copies_hidden: bool) -> list[int]:
    """stream and fsdp2 stream every block (stream only with a budget). auto keeps every block
    resident when that fits; otherwise it streams the fewest blocks that make it fit, and when
    copies hide behind compute, as many more as it takes for every block to keep each output of
    kept_tiers (bytes per block for the batch, best first) in turn, as far as that goes."""
    n = len(fit.block_bytes)
    if strategy == "fsdp2":
        return list(range(n))
    if strategy == "stream" and fit.available is not None:
        _check_host(fit, sum(fit.block_bytes), what="--offload stream: all blocks",
                    fix="use --offload auto (it streams only what the GPU cannot hold)")
        return list(range(n))
    if strategy != "auto" or fit.available is None or fit.peak([]) <= fit.available:
        return []
    streamed = fit.fewest_streamed()
    if streamed is None:
        needs = fit.peak(list(range(n))) + fit.margin_bytes
        raise PlanError(f"batch {batch_size} does not fit a {_size(fit.budget_bytes)} GPU even "
                        f"with every block streamed (needs ~{_size(needs)}): lower the batch size "
                        f"or resolution, or raise --gpu-memory-limit")
    _check_host(fit, sum(fit.block_bytes[i] for i in streamed),
                what=f"batch {batch_size} on a {_size(fit.budget_bytes)} GPU: "
                     f"{len(streamed)} streamed blocks",
                fix="raise --gpu-memory-limit or lower --batch-size (fewer blocks streamed)")
    if copies_hidden:                   # more streaming costs nothing here; recomputing does
        kept_bytes = 0
        for per_block in kept_tiers.values():
            more = fit.fewest_streamed(kept_bytes + n * per_block)
            if more is None or not fit.host_fits(more):
                break
            streamed, kept_bytes = more, kept_bytes + n * per_block
    return streamed


def _spend_spare_memory(fit: _Fit, peak: int, *, checkpointed: list[int],
                        kept_tiers: dict[str, int], skip_bytes: int,
                        may_skip: bool) -> tuple[list[int], dict[str, list[int]], int]:
    """What the budget leaves above `peak` buys back of the recompute, best value per byte first:
    each output of kept_tiers (bytes per block for the batch, best first) kept by as many
    checkpointed blocks as fit, in turn; once every block keeps all of them, and may_skip, the last
    blocks skip checkpointing (skip_bytes more each). Without a budget every checkpointed block
    keeps every output. Returns (checkpointed blocks, the blocks keeping each output, peak)."""
    kept, everyone = {}, True
    for output, per_block in kept_tiers.items():
        if fit.available is None:
            k = len(checkpointed)
        else:
            k = max(0, min(len(checkpointed), (fit.available - peak) // per_block))
        kept[output], peak = k, peak + k * per_block
        if k < len(checkpointed):
            everyone = False
            break
    n = len(fit.block_bytes)
    if may_skip and fit.available is not None and skip_bytes > 0 and everyone:
        plain = max(0, min(n, (fit.available - peak) // skip_bytes))
        checkpointed, peak = checkpointed[:n - plain], peak + plain * skip_bytes
        kept = {o: n - plain for o in kept}
    return checkpointed, {o: checkpointed[:k] for o, k in kept.items()}, peak
