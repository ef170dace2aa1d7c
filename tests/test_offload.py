"""offload.py: every strategy trains a tiny FLUX.2 exactly like the plain model, the streamer visits and prefetches
blocks in forward then recompute order, and the planner decides what its arithmetic says (docs/offload.md)."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import flux2
import lora
import offload
import planner
from util import GiB

B, SIDE, LT = 2, 4, 8                      # batch, image side in tokens, text tokens
S = SIDE * SIDE + LT                       # tokens per sample
TINY6 = dataclasses.replace(flux2.PRESETS["tiny"], depth_single_blocks=6)   # enough blocks to stream some


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def tiny(cfg=flux2.PRESETS["tiny"], seed=0, meta=False):
    """A float64 tiny DiT with paper LoRA whose B factors are non-zero, so every adapter has a gradient."""
    torch.manual_seed(seed)
    with torch.device("meta" if meta else "cpu"):
        model = flux2.Flux2(cfg).double()
        params = lora.inject(model, "paper", rank=4)
    if not meta:
        with torch.no_grad():
            for p in params:
                p.normal_(0, 0.05)
    return model


def batch(step, cfg=flux2.PRESETS["tiny"]):
    g = torch.Generator().manual_seed(100 + step)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    return ((r(B, SIDE * SIDE, cfg.in_channels), flux2.image_ids(SIDE, SIDE)[None].expand(B, -1, -1),
             r(B, LT, cfg.context_in_dim), flux2.text_ids(LT)[None].expand(B, -1, -1),
             torch.rand(B, generator=g, dtype=torch.float64), torch.full((B,), 4.0, dtype=torch.float64)),
            r(B, SIDE * SIDE, cfg.in_channels))


def train(model, steps=3, cfg=flux2.PRESETS["tiny"]):
    """(loss, {name: grad}) per AdamW step."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for _, p in named], lr=1e-2)
    out = []
    for s in range(steps):
        x, target = batch(s, cfg)
        loss = F.mse_loss(model(*x), target)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in named}))
        opt.step()
        opt.zero_grad()
    return out


def assert_same_training(got, ref, tol=1e-12):
    for (loss, grads), (loss_ref, grads_ref) in zip(got, ref, strict=True):
        assert rel(loss, loss_ref) <= tol
        assert grads.keys() == grads_ref.keys()
        for n in grads:
            assert rel(grads[n], grads_ref[n]) <= tol, n


def prepare(model, strategy, **kw):
    kw.setdefault("gpu_memory_limit", 1.0)   # on a CPU device a limit makes the plan stream as on a GPU
    return offload.prepare(model, model.blocks, strategy=strategy, device="cpu", batch_size=B, tokens_per_sample=S,
                           **kw)


@pytest.fixture(scope="module")
def reference():
    return train(tiny())


@pytest.mark.parametrize("strategy", ["checkpoint", "stream", "none"])
def test_strategy_trains_like_the_plain_model(strategy, reference):
    model = tiny()
    plan = prepare(model, strategy)
    assert plan.streamed == ([0, 1, 2, 3] if strategy == "stream" else [])
    assert plan.checkpointed == ([] if strategy == "none" else [0, 1, 2, 3])
    assert_same_training(train(model), reference)


def test_cpu_without_limit_keeps_blocks_resident_and_checkpointed(reference):
    model = tiny()
    plan = prepare(model, "stream", gpu_memory_limit=None)
    assert (plan.resident, plan.streamed, plan.checkpointed) == ([0, 1, 2, 3], [], [0, 1, 2, 3])
    assert offload.stats(model)["host_copy_bytes"] == 0
    assert_same_training(train(model), reference)


def test_apply_checkpointing_keeps_block0_lora_gradients(reference):
    model = tiny()
    offload.apply_checkpointing(model.blocks)
    got = train(model, steps=1)
    assert_same_training(got, reference[:1])
    block0 = [g for n, g in got[0][1].items() if n.startswith("double_blocks.0.")]
    assert len(block0) == 8 and all(g.abs().max() > 0 for g in block0)   # img/txt qkv/proj A and B


def test_auto_streams_some_single_blocks_and_trains_like_the_plain_model():
    ref, model = train(tiny(TINY6), cfg=TINY6), tiny(TINY6)
    n = len(model.blocks)
    # shrink the limit in steps of 1% of the all-resident need until auto starts streaming
    plan_at = lambda gib: offload.plan_for(model, model.blocks, device="cpu", batch_size=B, tokens_per_sample=S,
                                           gpu_memory_limit=gib)
    limit = need = plan_at(1.0).peak_bytes / GiB / 0.95
    while not plan_at(limit).streamed:
        limit -= need / 100
    plan = prepare(model, "auto", gpu_memory_limit=limit)
    assert 0 < len(plan.streamed) < n and min(plan.streamed) >= 2       # only single blocks (the smaller ones)
    assert plan.peak_bytes <= plan.budget_bytes
    assert_same_training(train(model, cfg=TINY6), ref)


def test_whole_blocks_compile_only_for_inference_with_every_block_resident():
    """prepare(compile=True) compiles whole blocks for a resident inference plan (sample.py) and says so in
    Plan.compiled; training plans and plans that move weights stay uncompiled (callers fuse the glue: flux2.fuse)."""
    assert prepare(tiny(), "checkpoint", compile=True, train=False).compiled
    assert not prepare(tiny(), "checkpoint", compile=True).compiled                 # training
    assert not prepare(tiny(), "stream", compile=True, train=False).compiled
    assert not prepare(tiny(), "checkpoint", compile=False, train=False).compiled
    with pytest.raises(dataclasses.FrozenInstanceError):     # a plan is built once, then only read
        prepare(tiny(), "checkpoint").compiled = True


def test_fused_glue_trains_like_eager_with_streamed_weights(reference):
    """flux2.fuse() compiles the elementwise glue (norms, modulation, RoPE, SwiGLU); in float64 the compiled kernels
    compute what eager does, here with every block's weights coming through the ring."""
    model = tiny()
    prepare(model, "stream")
    flux2.fuse(True)
    try:
        assert flux2.modulate.__wrapped__ in flux2._FUSED
        assert_same_training(train(model), reference, tol=1e-10)
    finally:
        flux2.fuse(False)


def test_auto_spends_spare_memory_on_skipping_checkpoints_and_trains_like_the_plain_model(reference):
    model = tiny()
    plan_at = lambda gib: offload.plan_for(model, model.blocks, device="cpu", batch_size=B, tokens_per_sample=S,
                                           gpu_memory_limit=gib)
    limit = plan_at(1.0).peak_bytes / GiB / 0.95          # every block un-checkpointed just fits
    while len(plan_at(limit).checkpointed) < 2:
        limit *= 0.999
    plan = prepare(model, "auto", gpu_memory_limit=limit)
    assert plan.streamed == [] and plan.checkpointed == [0, 1]                # the last blocks keep activations
    assert_same_training(train(model), reference)


class CountKeptOps(TorchDispatchMode):
    """Counts the attention kernels and the matmuls reducing over >= 3 x width that actually run (what a selective
    checkpoint kept does not reach it)."""

    def __init__(self, width):
        super().__init__()
        self.attention = self.mlp = 0
        self.min_k = planner.MLP_MIN_K * width

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.attention += func in offload._ATTENTION_OPS
        self.mlp += func in offload._MATMUL_OPS and args[-2].shape[-1] >= self.min_k
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("strategy", ["checkpoint", "stream"])
def test_checkpointed_blocks_keep_mlp_and_attention_outputs_instead_of_recomputing_them(strategy, reference):
    """With memory to spare every checkpointed block keeps what its attention kernel and its MLP down-projections
    returned (selective checkpointing): the backward's recompute runs the block again without them, and the
    training is the plain model's, step by step. selective=False recomputes them."""
    counts = {}
    for selective in (True, False):
        model = tiny()
        plan = prepare(model, strategy, selective=selective)
        assert plan.kept == ({"mlp": [0, 1, 2, 3], "attention": [0, 1, 2, 3]} if selective else {})
        assert ("kept instead of recomputed: mlp output 4 and attention output 4" in plan.describe()) == selective
        x, target = batch(0)
        loss, counter = F.mse_loss(model(*x), target), CountKeptOps(128)
        with counter:
            loss.backward()
        counts[selective] = counter
        model.zero_grad(set_to_none=True)
        assert_same_training(train(model), reference)
    assert (counts[True].attention, counts[False].attention) == (0, 4)          # one attention per block
    # per double block img_mlp.2 and txt_mlp.2, per single block linear2 and its LoRA A (backward's own
    # activation-gradient matmuls reducing over 2 x mlp width run either way)
    assert counts[False].mlp - counts[True].mlp == 8


def test_meta_model_gets_its_storage_in_place_and_trains_like_the_plain_model(reference):
    model, values = tiny(meta=True), tiny().state_dict()
    prepare(model, "stream")
    with torch.no_grad():                    # load after prepare, as flux2 loaders or bench.py's random fill do
        for name, p in model.named_parameters():
            p.copy_(values[name])
    assert_same_training(train(model), reference)


def test_stream_weights_move_into_one_host_buffer_per_block():
    model = tiny()
    prepare(model, "stream")
    hosts = offload._state(model).hosts
    for b in model.blocks:
        ptrs = {p.untyped_storage().data_ptr() for p in b.parameters() if not p.requires_grad}
        assert ptrs == {hosts[b].buf.untyped_storage().data_ptr()}     # the original CPU tensors are gone
        assert all(p.device.type == "cpu" for p in b.parameters() if p.requires_grad)
    assert offload.stats(model)["host_copy_bytes"] == sum(h.nbytes for h in hosts.values())


def test_streamer_prefetches_in_forward_then_recompute_order(monkeypatch):
    model, events = tiny(), []
    plan = prepare(model, "stream")
    acquire, load = offload._Streamer.acquire, offload._Streamer._load
    monkeypatch.setattr(offload._Streamer, "acquire",
                        lambda self, r, *, backward, train: (events.append(("use", r, backward)),
                                                             acquire(self, r, backward=backward, train=train))[1])
    monkeypatch.setattr(offload._Streamer, "_load", lambda self, r: (events.append(("load", r)), load(self, r))[1])
    train(model, steps=1)
    moved = offload.stats(model)["moved_bytes"]
    events.clear()
    train(model, steps=1)
    # blocks 0 and 1 are still in the ring from the last backward, 3 and 2 from this forward; every other block
    # is copied while the block before it (in visiting order) computes
    assert events == [("use", 0, False), ("use", 1, False), ("load", 2), ("use", 2, False), ("load", 3),
                      ("use", 3, False), ("use", 3, True), ("use", 2, True), ("load", 1), ("use", 1, True),
                      ("load", 0), ("use", 0, True)]
    assert offload.stats(model)["moved_bytes"] - moved == plan.h2d_bytes_per_step


@pytest.mark.parametrize("cfg", [flux2.PRESETS["tiny"], dataclasses.replace(TINY6, depth_single_blocks=5)])
def test_streamed_inference_matches_and_refuses_autograd_without_checkpointing(cfg):
    ref, model = tiny(cfg), tiny(cfg)
    prepare(model, "stream", train=False)    # an odd block count exercises the wrap-around to block 0
    x, _ = batch(0, cfg)
    with torch.no_grad():
        want = ref(*x)
        for _ in range(3):
            assert rel(model(*x), want) <= 1e-12
    with pytest.raises(RuntimeError, match="checkpointing"):
        model(*x)


def test_replanning_with_kept_host_copies(reference):
    model = tiny()
    prepare(model, "stream", keep_host_copy=True)
    got = train(model, steps=1)
    prepare(model, "checkpoint", keep_host_copy=True)
    assert offload.stats(model)["host_copy_bytes"] > 0 and offload._state(model).streamer is None
    got += train(model, steps=1)
    prepare(model, "stream")
    got += train(model, steps=1)
    # AdamW restarts per call, so compare with three one-step runs of the reference model
    ref_model = tiny()
    want = [train(ref_model, steps=1)[0] for _ in range(3)]
    assert_same_training(got, want)
    offload.release(model)
    assert "forward" not in model.blocks[0].__dict__


def test_fsdp2_on_gloo_trains_like_the_plain_model(reference):
    from torch.distributed.tensor import DTensor
    values = tiny().state_dict()
    try:
        for meta in (False, True):          # loaded on the CPU, or sharded on meta and loaded into the shards
            model = tiny(meta=meta)
            trainable = [p for p in model.parameters() if p.requires_grad]
            plan = prepare(model, "fsdp2", gpu_memory_limit=None)
            assert plan.streamed == [0, 1, 2, 3] and plan.checkpointed == [0, 1, 2, 3]
            assert plan.kept == {"mlp": [0, 1, 2, 3], "attention": [0, 1, 2, 3]}   # selective checkpoints in FSDP2
            assert all(isinstance(p, DTensor) for p in model.blocks[0].parameters() if not p.requires_grad)
            assert [id(p) for p in model.parameters() if p.requires_grad] == [id(p) for p in trainable]   # same objects
            assert not any(isinstance(p, DTensor) for p in trainable)
            if meta:
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        (p.to_local() if isinstance(p, DTensor) else p).copy_(values[name])
            assert_same_training(train(model), reference)
    finally:
        offload.leave_process_group()


def test_fsdp2_with_spare_memory_skips_some_checkpoints_and_trains_like_the_plain_model(reference):
    """With a budget, fsdp2 spends what is left on keeping the last blocks' activations (FSDP2 gathers a block again
    for its backward either way); training is unchanged."""
    model = tiny()
    try:
        plan_at = lambda gib: offload.plan_for(model, model.blocks, strategy="fsdp2", device="cpu", batch_size=B,
                                               tokens_per_sample=S, gpu_memory_limit=gib)
        limit = plan_at(1e-6).peak_bytes / GiB         # every block checkpointed: the least fsdp2 needs...
        while len(plan_at(limit).checkpointed) > 2:    # ...then grow the budget until half the blocks keep activations
            limit *= 1.01
        plan = prepare(model, "fsdp2", gpu_memory_limit=limit)
        assert plan.checkpointed == [0, 1] and plan.peak_bytes <= plan.budget_bytes
        assert_same_training(train(model), reference)
    finally:
        offload.leave_process_group()


# ----------------------------------------------------------------------------------------------------------
# The planner's arithmetic

MiB = 2**20
_DEV = []


def dev_plan(batch_size, side, limit_gib=79.0, strategy="auto", selective=True):
    """The plan for FLUX.2 [dev] (bf16, paper LoRA r16) at a given batch and resolution, on an 79 GiB budget."""
    if not _DEV:
        with torch.device("meta"):
            _DEV.append(flux2.Flux2(flux2.PRESETS["dev"]).to(torch.bfloat16))
            lora.inject(_DEV[0], "paper", rank=16)
    model = _DEV[0]
    return offload.plan_for(model, model.blocks, strategy=strategy, device="cpu", batch_size=batch_size,
                            tokens_per_sample=(side // 16) ** 2 + 512, gpu_memory_limit=limit_gib,
                            selective=selective)


def dev_fixed_bytes(p, batch_size, unit):
    """Root + AdamW on the paper LoRA r16 (fp32, x4) + each sample's saved block inputs and working set."""
    # per double block 2 streams x (qkv 6144->18432 + proj 6144->6144), per single block qkv rows of linear1
    # (6144->18432) + linear2 (24576->6144)
    lora_bytes = 16 * (8 * 2 * (6144 + 18432 + 6144 + 6144) + 48 * (6144 + 18432 + 24576 + 6144)) * 4
    per_sample = 56 * planner.SAVED_INPUT_UNITS + planner.TRAIN_WORKING_SET_UNITS
    return p.root_bytes + 4 * lora_bytes + batch_size * per_sample * unit


def test_dev_1024_batch8_recomputing_attention_streams_the_fewest_single_blocks_evenly_spread():
    p = dev_plan(8, 1024, selective=False)
    single, double = p.block_bytes[8], p.block_bytes[0]
    assert p.block_bytes == [double] * 8 + [single] * 48 and double == 2 * single
    unit = 4608 * 6144 * 2                                             # one block input: 4608 tokens x 6144 x bf16
    budget, margin = 79 * GiB, 3 * GiB
    fixed = dev_fixed_bytes(p, 8, unit)
    k = math.ceil((fixed + sum(p.block_bytes) + 2 * single - (budget - margin)) / single)   # ring: 2 single slots
    assert 0 < k <= 48 and p.streamed == sorted(p.streamed) and len(p.streamed) == k and min(p.streamed) >= 8
    gaps = {b - a for a, b in zip(p.streamed, p.streamed[1:])}
    assert max(gaps) - min(gaps) <= 1                                  # evenly spread among the single blocks
    assert p.checkpointed == list(range(56)) and p.kept == {} and p.slot_bytes == single
    assert p.peak_bytes <= budget - margin < p.peak_bytes + single     # one block fewer would not fit
    R = 2
    assert p.h2d_bytes_per_step == (k - R) * single * 2
    assert "streamed: %d of 56 blocks" % k in p.describe()


def test_dev_1024_batch8_streams_more_blocks_so_that_every_block_keeps_its_mlp_output():
    """36,864 tokens per step hide the copies (HIDE_TOKENS), so auto streams the fewest blocks with which all 56
    checkpointed blocks also keep their MLP output (worth 2 x 3 x 6144 FLOPs per element kept, against attention's
    4 x 4608): the 48 single blocks first, then double ones (whose size sets the ring slots). Attention outputs
    too would not fit even with every block streamed, so what is left goes to as many of them as fit."""
    p = dev_plan(8, 1024)
    single, double = p.block_bytes[8], p.block_bytes[0]
    unit = 4608 * 6144 * 2
    assert 8 * 4608 >= planner.HIDE_TOKENS and list(p.kept) == ["mlp", "attention"]
    available = 79 * GiB - 3 * GiB
    mlp = 8 * int(planner.MLP_OUTPUT_UNITS * unit)                     # per block, batch 8
    attn = 8 * int(planner.ATTENTION_OUTPUT_UNITS * unit)
    fixed = dev_fixed_bytes(p, 8, unit) + 56 * mlp

    def need(k):                                       # k blocks streamed, smallest first
        moved = single * min(k, 48) + double * max(0, k - 48)
        return fixed + sum(p.block_bytes) - moved + 2 * (double if k > 48 else single)
    k = next(k for k in range(57) if need(k) <= available)
    assert len(p.streamed) == k and need(k - 1) > available and need(56) + 56 * attn > available
    with_attention = (available - need(k)) // attn
    assert p.checkpointed == p.kept["mlp"] == list(range(56)) and p.kept["attention"] == list(range(with_attention))
    assert p.peak_bytes == need(k) + with_attention * attn
    assert len(p.streamed) > len(dev_plan(8, 1024, selective=False).streamed)
    assert f"kept instead of recomputed: mlp output 56 and attention output {with_attention}" in p.describe()


@pytest.mark.parametrize("side", [512, 1024])
def test_dev_batch1_stays_resident_and_spends_spare_memory_on_kept_outputs_then_on_skipping_checkpoints(side):
    p = dev_plan(1, side)
    assert p.streamed == [] and p.h2d_bytes_per_step == 0
    unit = ((side // 16) ** 2 + 512) * 6144 * 2
    kept = int(planner.MLP_OUTPUT_UNITS * unit) + int(planner.ATTENTION_OUTPUT_UNITS * unit)
    budget, margin = 79 * GiB, 3 * GiB
    resident = dev_plan(1, side, strategy="checkpoint", selective=False).peak_bytes
    whole_block = (planner.WHOLE_BLOCK_UNITS - planner.SAVED_INPUT_UNITS) * unit
    plain = (budget - margin - resident - 56 * kept) // (whole_block - kept)
    assert plain > 0 and p.checkpointed == p.kept["mlp"] == p.kept["attention"] == list(range(56 - plain))
    assert p.peak_bytes <= budget - margin


def test_dev_does_not_fit_and_says_why():
    with pytest.raises(planner.PlanError, match="even with every block streamed"):
        dev_plan(8, 1024, limit_gib=40.0)
    assert dev_plan(8, 1024, strategy="checkpoint").peak_bytes > 79 * GiB   # forced resident: over budget, warned
    assert "OVER BUDGET" in dev_plan(8, 1024, strategy="checkpoint").describe()


def test_plan_arithmetic_on_round_numbers():
    blocks = [4 * MiB, 4 * MiB, 1 * MiB, 2 * MiB, 3 * MiB]
    acts = planner.ActivationBytes(saved_input=MiB // 8, working_set=1 * MiB, whole_block=2 * MiB)
    plan = lambda budget, **kw: planner.plan(blocks, MiB, activations=acts, batch_size=2, budget_bytes=budget,
                                             trainable_bytes=MiB // 4, **kw)
    # stream: forward copies ranks 2.. (the ring still holds 0, 1), backward ranks ..2 (it holds 4, 3)
    p = plan(100 * GiB, strategy="stream")
    assert p.h2d_bytes_per_step == (1 + 2 + 3) * MiB + (4 + 4 + 1) * MiB and p.slot_bytes == 4 * MiB
    # fixed = root 1 + 4 x 0.25 (AdamW) + 2 x (5 x 1/8 + 1) = 5.25 MiB, blocks 14 MiB: all resident at 19.25 MiB
    budget = lambda need: int(need / 0.95) + 1      # a small budget keeps a 5% margin
    p = plan(budget(19.25 * MiB))
    assert p.streamed == [] and p.checkpointed == [0, 1, 2, 3, 4] and p.peak_bytes == int(19.25 * MiB)
    # a block that keeps its activations costs 2 x (2 - 1/8) = 3.75 MiB: 3.5 MiB spare buys nothing, 3.75 one block
    assert plan(budget(22.75 * MiB)).checkpointed == [0, 1, 2, 3, 4]
    assert plan(budget(23.0 * MiB)).checkpointed == [0, 1, 2, 3]
    # 2 MiB short: streaming the 1, 2, 3 MiB blocks frees 6 but the ring takes 2 x 3; adding a 4 MiB one frees 10
    # for a ring of 2 x 4: the smallest set that fits
    p = plan(budget(17.25 * MiB))
    assert p.streamed == [1, 2, 3, 4] and p.resident == [0] and p.peak_bytes == int(17.25 * MiB)
    # inference: nothing saved, optimizer holds nothing, no checkpointing
    p = plan(None, train=False)
    assert p.checkpointed == [] and p.peak_bytes == MiB + MiB // 4 + 2 * MiB + 14 * MiB
    # a decode between forwards (reserve_bytes) uses the activations' room: only what exceeds the
    # 2 x (5 x 1/8 + 1) = 3.25 MiB of training activations is added
    assert plan(budget(19.25 * MiB), reserve_bytes=3 * MiB).peak_bytes == int(19.25 * MiB)
    assert plan(budget(20.25 * MiB), reserve_bytes=4 * MiB + MiB // 4).streamed == []
    assert plan(budget(20.25 * MiB), reserve_bytes=4 * MiB + MiB // 4).peak_bytes == int(20.25 * MiB)
    assert plan(None, train=False, reserve_bytes=5 * MiB).peak_bytes == p.peak_bytes + 3 * MiB
    # without a budget (a CPU run) nothing needs to fit: stream keeps every block resident, fsdp2 still shards
    assert plan(None, strategy="stream").streamed == []
    assert plan(None, strategy="fsdp2").streamed == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="choose one of"):
        plan(None, strategy="zero3")
    # keeping a block's MLP output costs 2 x 1/8 = 0.25 MiB, its attention output 2 x 1/4 = 0.5 MiB: spare memory
    # goes to them first, in that order, block by block...
    acts = dataclasses.replace(acts, kept_outputs={"mlp": MiB // 8, "attention": MiB // 4})
    assert plan(budget(19.9 * MiB)).kept == {"mlp": [0, 1]}
    p = plan(budget(21.7 * MiB))
    assert p.checkpointed == p.kept["mlp"] == [0, 1, 2, 3, 4] and p.kept["attention"] == [0, 1]
    assert p.peak_bytes == int(21.5 * MiB)
    # ...then to whole blocks, which now cost 2 x (2 - 1/8) - 0.75 = 3 MiB more than keeping both outputs
    assert plan(budget(25.9 * MiB)).checkpointed == [0, 1, 2, 3, 4]
    p = plan(budget(26.0 * MiB))
    assert p.checkpointed == p.kept["mlp"] == p.kept["attention"] == [0, 1, 2, 3] and p.peak_bytes == 26 * MiB
    # 2 MiB short, as above: streaming four blocks fits but leaves nothing to keep; when copies hide behind
    # compute (a step of HIDE_TOKENS tokens or more), streaming the fifth too frees 4 MiB (the ring stays 2 x 4),
    # enough for both outputs of all five
    p = plan(budget(17.25 * MiB), tokens_per_sample=planner.HIDE_TOKENS // 2 - 1)
    assert p.streamed == [1, 2, 3, 4] and not any(p.kept.values())
    p = plan(budget(17.25 * MiB), tokens_per_sample=planner.HIDE_TOKENS // 2)
    assert p.streamed == [0, 1, 2, 3, 4] and p.kept == {"mlp": [0, 1, 2, 3, 4], "attention": [0, 1, 2, 3, 4]}
    assert p.peak_bytes == int((17.25 - 4 + 1.25 + 2.5) * MiB)
    # no budget (a CPU run): every checkpointed block keeps both; no checkpointing, nothing to keep
    p = plan(None, strategy="checkpoint")
    assert p.kept == {"mlp": [0, 1, 2, 3, 4], "attention": [0, 1, 2, 3, 4]}
    assert plan(None, strategy="none").kept == {}
