"""Fitting a FLUX.2 LoRA run on one GPU or several, read in the order the ideas build on each other:

  1. checkpointing one block (plain or selective)           docs/offload.md §4
  2. FSDP2 per block, with CPU offload when shards don't fit  docs/offload.md §1-2, §7
  3. our H2D-only block streamer: host copies, a GPU ring    docs/offload.md §5, §8C
  4. placing a plan: prepare() and the other entry points

The planner that chooses among them from byte counts (docs/offload.md §6) is planner.py, read next.

The file knows only "a root module plus a list of blocks in execution order": frozen parameters are
those with requires_grad=False, trainable ones (LoRA) the rest. It imports neither flux2 nor lora.
"""
import functools
import gc
import os
import socket
import warnings
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                    create_selective_checkpoint_contexts)

from planner import (INFER_WORKING_SET_UNITS, MLP_MIN_K, SAVED_INPUT_UNITS, STRATEGIES,
                     TRAIN_WORKING_SET_UNITS, WHOLE_BLOCK_UNITS, ActivationBytes, Plan,
                     kept_outputs, out_of_memory, plan)
from util import GiB, ceil_div, print0, rank_world


# --------------------------------------------------------------------------------------------------
# 1. Checkpointing one block
#
# A checkpointed block keeps only its input until backward, which runs the block's forward again
# (the recompute) for what it needs. A checkpointed block may also keep the few outputs that cost
# most to recompute per byte kept (torch's selective activation checkpointing, at op level as in
# torchtitan): the outputs of the MLP down-projections (a matmul reducing over 3-4x the width: 2K
# FLOPs per element kept) and of the attention kernel (4L FLOPs per element, L = tokens). Each is
# one block input's worth of memory per sample; the recompute then skips those ops. Ops are
# recognised by op and shape only, so no FLUX.2 module is named.

# The attention kernels F.scaled_dot_product_attention dispatches to (those this torch build has)
_ATTENTION_OPS = {getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name)}
_MATMUL_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}   # what F.linear runs


def _keep(outputs: frozenset[str], mlp_min_k: int):
    """The selective checkpoint policy of a block keeping `outputs`: save what the attention kernel
    returns ("attention") and what matmuls reducing over at least mlp_min_k return ("mlp");
    recompute the rest."""
    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        save = ("attention" in outputs and op in _ATTENTION_OPS
                # mm(a, b) and addmm(c, a, b): a is [.., K]
                or "mlp" in outputs and op in _MATMUL_OPS and args[-2].shape[-1] >= mlp_min_k)
        return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE
    return policy


_COMPILED = {}   # one torch.compile per block class, shared by its blocks


class _BlockForward:
    """Stands in for `block.forward`: binds the block's weights when they stream (section 3), then
    runs the block's own forward, checkpointed when asked and autograd records (keeping the outputs
    named in `keep`). FSDP2's module hooks stay outside, as with torchtitan's checkpoint_wrapper."""

    def __init__(self, block: nn.Module, *, checkpointed: bool, streamer: "_Streamer | None" = None,
                 stream_index: int = 0, compile: bool = False, keep: frozenset[str] = frozenset(),
                 mlp_min_k: int = 0):
        self.block, self.checkpointed = block, checkpointed
        self.streamer = streamer
        self.stream_index = stream_index      # its place among the streamed blocks
        fn = type(block).forward
        if compile and fn not in _COMPILED:
            _COMPILED[fn] = torch.compile(fn)
        self.fn = _COMPILED[fn] if compile else fn
        self.context = None
        if keep:
            self.context = functools.partial(create_selective_checkpoint_contexts,
                                             _keep(keep, mlp_min_k))
        self.in_forward = self.train = False

    def __call__(self, *args, **kwargs):
        grad = torch.is_grad_enabled()
        if self.streamer is not None and grad and not self.checkpointed:
            raise RuntimeError("a streamed block ran with autograd on but without checkpointing: "
                               "prepare the model with train=True, or run it under torch.no_grad()")
        self.in_forward, self.train = True, grad and self.checkpointed
        try:
            # non-reentrant: block 0's LoRA gets gradients although its input needs none
            if self.train:
                selective = {"context_fn": self.context} if self.context else {}
                return checkpoint(self._run, *args, use_reentrant=False, **selective, **kwargs)
            return self._run(*args, **kwargs)
        finally:
            self.in_forward = False

    def _run(self, *args, **kwargs):
        if self.streamer is not None:
            backward = not self.in_forward    # the checkpoint's recompute calls us from backward
            self.streamer.acquire(self.stream_index, backward=backward,
                                  train=backward or self.train)
        return self.fn(self.block, *args, **kwargs)


def apply_checkpointing(blocks: list[nn.Module]):
    """Non-reentrant activation checkpointing around every block (weights stay where they are)."""
    for b in blocks:
        b.forward = _BlockForward(b, checkpointed=True)


# --------------------------------------------------------------------------------------------------
# 2. FSDP2 per block, with CPU offload
#
# fully_shard every block, then the root, over all ranks (a world of one without torchrun). Each
# rank keeps 1/N of the frozen weights, on its GPU when they fit the smallest rank's budget, else in
# host memory (CPUOffloadPolicy), and gathers a whole block for each use. The LoRA parameters stay
# replicated outside FSDP (ignored_params), so `sum_gradients` reduces them explicitly, once per
# optimizer step.

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched() -> bool:
    """Whether torchrun (or a launcher like it) started this process (it sets RANK, WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_process_group(device: torch.device):
    """A process group for FSDP2: torchrun's when launched by it, else a world of one (offload.md
    §1). Under torchrun, `device` is this process's GPU (cuda:LOCAL_RANK) or the CPU (gloo)."""
    if dist.is_initialized():
        return
    # generous: ranks wait at a barrier while others cache latents or load the text encoder
    timeout = timedelta(minutes=30)
    if device.type == "cpu":
        if launched():
            dist.init_process_group("gloo", timeout=timeout)
        else:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        return
    if not launched():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")
    # gloo for CPU tensors too: with several ranks, offloaded shards' gradients and norms live there
    dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device, timeout=timeout)


def leave_process_group():
    """Destroy the process group, if any, and free it now; call it once the model is out of scope.

    destroy_process_group() only unregisters the group: the sharded model (in reference cycles) and
    DTensor's sharding cache still hold it. Left to interpreter shutdown, a gloo worker thread
    dropping the last reference to a tensor has to take the GIL there and aborts the process
    ("terminate called without an active exception"). Freed here, its destructor first joins the
    workers."""
    if not dist.is_initialized():
        return
    dist.destroy_process_group()
    import torch.distributed.tensor.debug as dtensor_debug
    # a private function: skipped if a torch version renames it
    clear_cache = getattr(dtensor_debug, "_clear_sharding_prop_cache", None)
    if clear_cache is not None:
        clear_cache()
    gc.collect()


def sum_gradients(params: list[Tensor]):
    """Sum the gradients of replicated parameters over all ranks in one flat all-reduce. FSDP2
    leaves the LoRA parameters alone (ignored_params), so this is their data-parallel reduction;
    each rank's loss being its share of the global batch's mean, the sum is the global batch's
    gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    if rank_world()[1] == 1 or not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])   # one fp32 buffer: one collective in all
    dist.all_reduce(flat)
    for g, r in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(r.view_as(g))


def _apply_fsdp2(model: nn.Module, blocks: list[nn.Module], p: "Plan", *, device: torch.device):
    """fully_shard every block, then the root, over all ranks, with CPU offload when the plan says
    so; LoRA stays a plain GPU parameter (ignored_params). A meta model gets shard storage here."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy,
                                        fully_shard)
    from torch.distributed.tensor import DTensor

    state = _state(model)
    if state.fsdp or state.hosts:
        raise ValueError("this model was already prepared: build a new model to use fsdp2")
    init_process_group(device)
    # an explicit mesh: the default one is on the current accelerator, whatever the group's backend
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    on_gpu, host = device.type == "cuda", p.cpu_offload
    # pin_memory=False, then pin each shard in place below: FSDP's own pinning rounds every tensor
    # up to a power of two (58.5 -> ~90 GiB for FLUX.2, offload.md §2). cast_forward_inputs=False
    # keeps the fp32 RoPE tensors fp32.
    policies = dict(
        mesh=mesh, offload_policy=CPUOffloadPolicy(pin_memory=False) if host else OffloadPolicy(),
        mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16 if on_gpu else None,
                                       reduce_dtype=torch.float32, cast_forward_inputs=False))
    trainable = [q for q in model.parameters() if q.requires_grad]
    for q in trainable:                 # FSDP neither moves nor casts ignored parameters
        _move(q, device)
    _install_forwards(blocks, p)        # the checkpoint inside each block, FSDP2's hooks around it
    for b in blocks:
        fully_shard(b, ignored_params={q for q in b.parameters() if q.requires_grad}, **policies)
    fully_shard(model, ignored_params=set(trainable), **policies)
    state.fsdp, state.blocks = True, list(blocks)
    meta = any(q.is_meta for q in model.parameters())
    if meta:                            # torchtitan's order: shard on meta, then allocate shards
        model.to_empty(device="cpu" if host else device)   # (takes LoRA along: back to the device)
        for q in trainable:
            _move(q, device)
    _move_buffers(model, device)
    for q in model.parameters():
        local = q.to_local() if isinstance(q, DTensor) else None
        # small tensors may share a page with others: left pageable
        if host and on_gpu and local is not None and _nbytes(local) >= 2**20:
            if meta:
                local.zero_()           # touch the pages on all cores before pinning them
            state.fsdp_pinned += _nbytes(local) if _pin(local, q) else 0


# --------------------------------------------------------------------------------------------------
# 3. Our H2D-only block streamer
#
# Each streamed block's frozen weights live in one flat host buffer (`_HostCopy`), pinned in place
# with cudaHostRegister, so pinned memory is exactly the streamed bytes (the caching host allocator
# would round every tensor up to a power of two, offload.md §2). The GPU holds a ring of R flat
# slots; streamed block number r always uses slot r % R, and its parameters point (`p.data = view`)
# at the slot while it is there and at its host copy otherwise. The block's `_BlockForward` asks the
# streamer for the weights, then runs the block inside torch.utils.checkpoint. The checkpoint's
# recompute calls it again during backward, so the streamer sees the visiting order  0, 1, .., n-1
# (forward), n-1, .., 0 (recompute)  and prefetches the next R-1 blocks of that order on a copy
# stream while the current block computes. Copies only go host -> GPU: evicting a block is just
# repointing its parameters. A slot is overwritten only after an event recorded on the compute
# stream, i.e. after every kernel that read its previous block; compute waits for the copy's event.
# Streaming requires checkpointing when autograd records: backward reads the weights the recompute
# bound, not the ones the forward saw.

def _layout(tensors: list[Tensor]) -> tuple[list[int], int]:
    """Byte offsets (256-aligned, as cuBLAS likes) of tensors packed in a flat buffer; its size."""
    offsets, end = [], 0
    for t in tensors:
        offsets.append(end)
        end += ceil_div(t.numel() * t.element_size(), 256) * 256
    return offsets, end


def _views(buf: Tensor, offsets: list[int], like: list[Tensor]) -> list[Tensor]:
    """Typed views into a flat uint8 buffer, shaped like `like`."""
    return [buf[o:o + _nbytes(t)].view(t.dtype).view(t.shape) for o, t in zip(offsets, like)]


def _pin(t: Tensor, owner) -> bool:
    """Page-lock a host tensor's memory where it is (exact size, no copy) until `owner` is
    collected; False if the driver refuses (then it stays pageable: correct, ~8x slower to copy)."""
    err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), _nbytes(t), 0))
    if err:
        warnings.warn(f"cudaHostRegister failed (cudaError {err}): host copies stay pageable, "
                      "H2D ~8x slower")
        return False
    # weakref callbacks run before the owner's tensors are freed: unpinned while still allocated
    weakref.finalize(owner, torch.cuda.cudart().cudaHostUnregister, t.data_ptr()).atexit = False
    return True


class _HostCopy:
    """One block's frozen weights in one flat host buffer, page-locked on CUDA machines."""

    def __init__(self, params: list[nn.Parameter], *, pin: bool):
        self.params = params
        self.offsets, self.nbytes = _layout(params)
        self.buf = torch.empty(self.nbytes, dtype=torch.uint8)
        self.views = _views(self.buf, self.offsets, params)
        self.pinned = False
        sources = [p.data for p in params]
        if pin and any(s.device.type != "cpu" for s in sources):
            # touch the pages on all cores, pin, then copy from the GPU at DMA speed
            self.buf.zero_()
            self.pinned = _pin(self.buf, self)
        with torch.no_grad():
            for v, s in zip(self.views, sources):
                if not s.is_meta:       # a meta model gets storage here; values are loaded later
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
    """A ring of R GPU slots; streamed block r (its rank among streamed blocks) uses slot r % R."""

    def __init__(self, hosts: list[_HostCopy], device: torch.device, *, ring_size: int):
        self.hosts, self.device = hosts, device
        R = min(ring_size, len(hosts))
        slot_bytes = max(h.nbytes for h in hosts)
        self.ring = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(R)]
        self.gpu_views = [_views(self.ring[r % R], h.offsets, h.params)
                          for r, h in enumerate(hosts)]
        self.holder = [None] * R       # the streamed block (its rank) in each slot
        self.ready = [None] * R        # copy-done event of each slot
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.bytes_moved = 0

    def acquire(self, r: int, *, backward: bool, train: bool):
        """Make block r's weights current (compute waits for their copy); prefetch the next R-1."""
        R = len(self.ring)
        if self.holder[r % R] != r:
            # not prefetched: the first step, or the wrap-around of an odd inference loop
            self._load(r)
        if self.ready[r % R] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[r % R])
        needed = {r}
        for _ in range(R - 1):
            r, backward = self._next(r, backward=backward, train=train)
            if self.holder[r % R] != r:
                if self.holder[r % R] in needed:   # that slot's block runs before this one
                    break
                self._load(r)
            needed.add(r)

    def _next(self, r: int, *, backward: bool, train: bool) -> tuple[int, bool]:
        """The block visited after r: forward 0..n-1, (training) recompute n-1..0, forward again."""
        if backward:
            return (r - 1, True) if r > 0 else (0, False)
        if r + 1 < len(self.hosts):
            return r + 1, False
        return (r, True) if train else (0, False)

    def _load(self, r: int):
        """Copy block r into its slot on the copy stream and point its parameters there."""
        k = r % len(self.ring)
        if self.holder[k] is not None:
            self.hosts[self.holder[k]].bind()   # evicted: no copy back, the host copy is the master
        h = self.hosts[r]
        dst = self.ring[k][:h.nbytes]
        if self.copy_stream is None:
            dst.copy_(h.buf)
        else:
            # after every kernel that reads the slot's old block
            gate = torch.cuda.current_stream(self.device).record_event()
            self.copy_stream.wait_event(gate)
            with torch.cuda.stream(self.copy_stream):
                dst.copy_(h.buf, non_blocking=True)
            self.ready[k] = self.copy_stream.record_event()
        for p, v in zip(h.params, self.gpu_views[r]):
            p.data = v
        self.holder[k] = r
        self.bytes_moved += h.nbytes


# --------------------------------------------------------------------------------------------------
# 4. Placing a plan: the entry points

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
    if p.is_meta:       # set_data refuses to turn meta into a real tensor; swap_tensors does it
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


def _install_forwards(blocks: list[nn.Module], p: "Plan", *, streamer: _Streamer | None = None):
    """Give every block the forward the plan asks for: checkpointed or not, keeping which outputs,
    its weights from the streamer or not, compiled or not."""
    stream_index = {i: r for r, i in enumerate(p.streamed)} if streamer is not None else {}
    checkpointed = set(p.checkpointed)
    for i, b in enumerate(blocks):
        b.forward = _BlockForward(b, checkpointed=i in checkpointed,
                                  streamer=streamer if i in stream_index else None,
                                  stream_index=stream_index.get(i, 0), compile=p.compiled,
                                  keep=frozenset(o for o, idx in p.kept.items() if i in idx),
                                  mlp_min_k=MLP_MIN_K * (p.width or 0))


def _place(model: nn.Module, blocks: list[nn.Module], p: "Plan", *, device: torch.device,
           keep_host_copy: bool):
    """Move storage where the plan says and install the block forwards (again for a new plan)."""
    state = _state(model)
    if state.fsdp:
        raise ValueError("this model was prepared with fsdp2, which cannot be undone: "
                         "build a new model to re-plan")
    _synchronize(device)
    if state.streamer is not None:     # blocks in the old ring go back to their host copies first
        for h in state.streamer.hosts:
            h.bind()
    state.streamer, state.blocks = None, list(blocks)
    pin = device.type == "cuda"
    # streamed blocks leave the GPU first, so the memory is free for what comes next
    for i in p.streamed:
        b = blocks[i]
        if b not in state.hosts:
            state.hosts[b] = _HostCopy(_frozen(b), pin=pin)
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
        state.streamer = _Streamer([state.hosts[blocks[i]] for i in p.streamed], device,
                                   ring_size=p.ring_size)
    _install_forwards(blocks, p, streamer=state.streamer)


def cap_gpu_memory(device, gib: float | None):
    """Make the caching allocator refuse more than `gib` GiB on this GPU (OutOfMemoryError past it),
    so a plan made with --gpu-memory-limit for a smaller card is held to it on a bigger one. The
    CUDA context and library workspaces (~0.5-1 GiB) are outside the allocator: a real card of that
    size needs that much more."""
    device = _device(device)
    if gib is not None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GiB / total), device)


def host_budget(gib: float | None, meminfo="/proc/meminfo") -> float | None:
    """GiB of host memory a run may pin for streamed weights: `gib` as given (--host-memory-limit),
    else what the system reports available (MemAvailable, which counts the page cache that the
    memory-mapped weight files fill) less a margin of 10%, at most 4 GiB; None (no limit) where
    there is no /proc/meminfo."""
    if gib is not None:
        return gib
    try:
        fields = dict(line.split(":", 1) for line in open(meminfo).read().splitlines())
        available = int(fields["MemAvailable"].split()[0]) * 1024          # "24103956 kB"
    except (OSError, KeyError, ValueError):
        return None
    return (available - min(available // 10, 4 * GiB)) / GiB


class OutOfMemoryGuard:
    """`with` this around a run: running out of memory inside ends in planner.OutOfMemory, one line
    naming the budget that ran out, what the plan wanted and the flags that help. GPU: torch's
    OutOfMemoryError (the caching allocator, held to --gpu-memory-limit). Host: MemoryError, the
    CPU allocator's "can't allocate memory", and a failed page-lock (pin_memory's cudaHostAlloc
    fails with a plain RuntimeError "CUDA error: out of memory"; the GPU's own shortage always
    comes as OutOfMemoryError). The run sets `during` (what it does) and `plan` once it has one."""

    def __init__(self, *, gpu_memory_limit: float | None, host_memory_limit: float | None):
        self.limits = {"GPU": gpu_memory_limit, "host": host_memory_limit}     # GiB, None: none
        self.during, self.plan = "starting", None

    def __enter__(self) -> "OutOfMemoryGuard":
        return self

    def __exit__(self, kind, error, traceback):
        if isinstance(error, torch.OutOfMemoryError):
            budget = "GPU"
        elif isinstance(error, MemoryError) or isinstance(error, RuntimeError) and any(
                s in str(error) for s in ("out of memory", "can't allocate memory")):
            budget = "host"
        else:
            return False
        limit = None if self.limits[budget] is None else int(self.limits[budget] * GiB)
        if self.plan is not None:               # the budgets the plan was made for
            limit = self.plan.budget_bytes if budget == "GPU" else self.plan.host_budget_bytes
        raise out_of_memory(budget, during=self.during, plan=self.plan,
                            limit_bytes=limit) from None


def _budget(model: nn.Module, device: torch.device, *, limit_gib: float | None) -> int:
    """GPU bytes this model may use: the limit (else the free memory) less what others hold there,
    plus what the model already holds; with several ranks the smallest rank's, so that every rank
    takes the same decisions."""
    torch.cuda.empty_cache()
    state = _state(model)
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in [*model.parameters(), *model.buffers(), *(state.streamer.ring if state.streamer
                                                               else [])]
            if t.device == device}
    if limit_gib is None:
        free, _ = torch.cuda.mem_get_info(device)
    else:                             # the cap counts the caching allocator's reserved bytes
        free = int(limit_gib * GiB) - torch.cuda.memory_reserved(device)
    budget = torch.tensor([free + sum(held.values())], device=device)
    if rank_world()[1] > 1:
        dist.all_reduce(budget, op=dist.ReduceOp.MIN)
    return int(budget.item())


def _width_and_itemsize(blocks: list[nn.Module]) -> tuple[int, int]:
    """The blocks' hidden size (smallest in_features of their frozen Linears), weight item size."""
    lin = [m for b in blocks for m in b.modules()
           if isinstance(m, nn.Linear) and not m.weight.requires_grad]
    if not lin:
        raise ValueError("offload: the blocks contain no frozen nn.Linear, "
                         "so their hidden size is unknown")
    return min(m.in_features for m in lin), lin[0].weight.element_size()


def plan_for(model: nn.Module, blocks: list[nn.Module], *, strategy: str = "auto", device,
             batch_size: int, tokens_per_sample: int, train: bool = True,
             gpu_memory_limit: float | None = None, ring_size: int = 2, selective: bool = True,
             compile: bool = False, host_memory_limit: float | None = None,
             reserve_bytes: int = 0) -> "Plan":
    """The plan prepare() would apply, measured from the model (nothing is moved); batch_size is
    this rank's. selective=False: checkpointed blocks keep nothing but their input (the report's
    plain checkpointing). host_memory_limit: GiB this machine may pin for streamed weights, shared
    by its torchrun processes (None: no limit; the CLIs pass host_budget's). The GPU budget is
    what the limit (or the card) leaves after what others already hold there (the autoencoder).
    reserve_bytes: see plan() (a decode between forwards)."""
    device = _device(device)
    if strategy not in STRATEGIES:
        raise ValueError(f"offload strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    in_blocks = {id(q) for b in blocks for q in b.parameters()}
    block_bytes = [sum(_nbytes(q) for q in _frozen(b)) + sum(_nbytes(t) for t in b.buffers())
                   for b in blocks]
    root_bytes = sum(_nbytes(q) for q in model.parameters()
                     if not q.requires_grad and id(q) not in in_blocks)
    trainable_bytes = sum(_nbytes(q) for q in model.parameters() if q.requires_grad)
    width, itemsize = _width_and_itemsize(blocks)
    unit = tokens_per_sample * width * itemsize           # one block input of one sample
    activations = ActivationBytes(
        saved_input=SAVED_INPUT_UNITS * unit,
        working_set=(TRAIN_WORKING_SET_UNITS if train else INFER_WORKING_SET_UNITS) * unit,
        whole_block=WHOLE_BLOCK_UNITS * unit,
        kept_outputs=(kept_outputs(unit, width=width, tokens_per_sample=tokens_per_sample)
                      if selective else {}))
    if device.type == "cuda":
        budget = _budget(model, device, limit_gib=gpu_memory_limit)
    elif gpu_memory_limit is not None:
        budget = int(gpu_memory_limit * GiB)
    else:
        budget = None                 # a CPU run without a limit: nothing to fit
    host_budget_bytes = None
    if host_memory_limit is not None:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))      # processes on this machine
        host_budget_bytes = int(host_memory_limit * GiB) // local_world
    return plan(block_bytes, root_bytes, activations=activations, batch_size=batch_size,
                budget_bytes=budget, trainable_bytes=trainable_bytes,
                strategy=strategy, train=train, ring_size=ring_size, world_size=rank_world()[1],
                tokens_per_sample=tokens_per_sample, width=width, compile=compile,
                host_budget_bytes=host_budget_bytes, reserve_bytes=reserve_bytes)


def prepare(model: nn.Module, blocks: list[nn.Module], *, strategy: str = "auto", device,
            batch_size: int, tokens_per_sample: int, train: bool = True,
            gpu_memory_limit: float | None = None, ring_size: int = 2, compile: bool = False,
            keep_host_copy: bool = False, selective: bool = True,
            host_memory_limit: float | None = None, reserve_bytes: int = 0) -> "Plan":
    """Place the model for training or inference and print and return the plan: root and trainable
    parameters on `device`, each block resident, streamed or FSDP2-sharded, checkpointed to train.

    Works on a model whose weights are on the CPU (moved block by block, each CPU tensor freed once
    copied, so host memory never holds two copies), on the device, or on meta (storage is allocated
    where the plan puts it; load values afterwards, before the first forward). On a CPU device every
    strategy but fsdp2 keeps all blocks resident, unless gpu_memory_limit (GiB) is given: then the
    plan runs on the CPU as it would on such a GPU, with synchronous copies (tests, dry runs). May
    be called again with another plan (not after fsdp2); keep_host_copy=True keeps host copies of
    blocks that become resident, so re-plans need no pinning. compile=True compiles whole blocks
    where the plan allows it (Plan.compiled). selective=False: checkpointed blocks keep nothing but
    their input (see plan()). host_memory_limit: see plan_for. Under torchrun, fsdp2 shards over
    every rank (all ranks call this with the same arguments)."""
    device = _device(device)
    p = plan_for(model, blocks, strategy=strategy, device=device, batch_size=batch_size,
                 tokens_per_sample=tokens_per_sample, train=train,
                 gpu_memory_limit=gpu_memory_limit, ring_size=ring_size, selective=selective,
                 compile=compile, host_memory_limit=host_memory_limit, reserve_bytes=reserve_bytes)
    if p.strategy == "fsdp2":
        _apply_fsdp2(model, blocks, p, device=device)
    else:
        _place(model, blocks, p, device=device, keep_host_copy=keep_host_copy)
    print0(p.describe())
    return p


def stats(model: nn.Module) -> dict:
    """Host bytes pinned for this model and host-to-GPU bytes the streamer moved so far."""
    state = _state(model)
    pinned = sum(h.nbytes for h in state.hosts.values() if h.pinned) + state.fsdp_pinned
    return {"pinned_bytes": pinned, "host_copy_bytes": sum(h.nbytes for h in state.hosts.values()),
            "moved_bytes": state.streamer.bytes_moved if state.streamer else 0}


def release(model: nn.Module):
    """Remove the block forwards, drop host copies and ring (streamed weights end on the CPU)."""
    state = _state(model)
    for b in state.blocks:
        b.__dict__.pop("forward", None)
    if state.streamer is not None:
        _synchronize(state.streamer.device)
        for h in state.hosts.values():
            h.bind()
    model.__dict__.pop("_offload", None)
