"""Probe: whole-block torch.compile together with the ring streamer, at FLUX.2 [dev] size, batch 8 at 1024², 80 GiB.

offload.prepare refuses this combination (whole blocks compile for inference only: in training on the H100 they
gave NaN gradients / an illegal memory access), so this script goes past the guard with offload._place, on the
plain-checkpoint plan of that time (selective=False: compiled code hides its ops from the selective policy). It prints per-step time, loss, whether the LoRA parameters
stay finite, and peak memory. bench/RESULTS.md §5.1 has its output; compare the losses with bench.py's
8x1024:auto+fuse run (same seeds, same inputs).

    python bench/block_stream_probe.py
"""
import os
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import dataclasses, sys, time, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import flux2, lora, offload, bench
from models import fill_random
dev = torch.device("cuda", 0)
offload.cap_gpu_memory(dev, 80)
torch._dynamo.config.cache_size_limit = 64
cfg = flux2.PRESETS["dev"]
with torch.device("meta"):
    model = flux2.Flux2(cfg).to(torch.bfloat16).requires_grad_(False)
    params = lora.inject(model, "paper", rank=16)
p = offload.plan_for(model, model.blocks, device=dev, batch_size=8, tokens_per_sample=4608, gpu_memory_limit=80,
                     selective=False)
print(p.describe(), flush=True)
offload._place(model, model.blocks, dataclasses.replace(p, compiled=True), device=dev, keep_host_copy=False)
fill_random(model, dev)
x, target = bench.make_inputs(cfg, 8, 1024, 512, dev, torch.bfloat16)
step = bench.train_step(lambda: model(*x), params, target, dev)
for i in range(4):
    t = time.perf_counter()
    loss = step()
    torch.cuda.synchronize()
    print(f"step {i + 1}: {time.perf_counter() - t:.3f} s, loss {loss.item():.4f}, "
          f"finite params {all(torch.isfinite(q).all().item() for q in params)}, "
          f"peak {torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GiB", flush=True)
