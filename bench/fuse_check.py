"""Does `flux2.fuse()` change what the full-size model learns? One training step's loss and LoRA
gradients at FLUX.2 [dev] size (random bf16 weights), eager against fused, under an offload plan
that streams (the plan training at full size uses on an 80 GiB card). Eager is run twice first: the
run-to-run spread of eager bf16 (atomics in the attention backward) is the yardstick the fused
difference is read against. bench/RESULTS.md §5.1 holds its numbers.

    python bench/fuse_check.py --gpu-memory-limit 80                 # stream, batch 1 at 512²
    python bench/fuse_check.py --strategy auto --batch 8 --side 1024 --gpu-memory-limit 80
    python bench/fuse_check.py --preset klein-4b --strategy none --fp32-reference   # both vs fp32
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch
import torch.nn.functional as F

import flux2
import lora
import offload
import planner
from bench import make_inputs, tokens
from models import fill_random


def step(model, params, x, target) -> tuple[float, list[torch.Tensor]]:
    """Loss and LoRA gradients of one forward/backward (the gradients are taken, not kept)."""
    loss = F.mse_loss(model(*x).float(), target.float())
    loss.backward()
    grads = [p.grad.float() for p in params]
    for p in params:
        p.grad = None
    return loss.item(), grads


def differ(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """(max, median) over tensors of |a - b|_max / |b|_max."""
    r = torch.tensor([((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
                      for x, y in zip(a, b)])
    return r.max().item(), r.median().item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="dev", choices=sorted(flux2.PRESETS))
    p.add_argument("--strategy", default="stream", choices=planner.STRATEGIES)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--side", type=int, default=512)
    p.add_argument("--gpu-memory-limit", type=float, default=None)
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run (--preset tiny)")
    p.add_argument("--fp32-reference", action="store_true",
                   help="first run the step in fp32 (resident: use a model that fits, e.g. "
                        "klein-4b) and measure eager and fused bf16 against it")
    args = p.parse_args()
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else \
        torch.device(args.device)
    offload.cap_gpu_memory(device, args.gpu_memory_limit)
    cfg = flux2.PRESETS[args.preset]
    dtype = torch.float32 if args.fp32_reference else torch.bfloat16
    with torch.device("meta"):
        model = flux2.Flux2(cfg).to(dtype).requires_grad_(False)
        params = lora.inject(model, "paper", rank=16)
    offload.prepare(model, model.blocks, strategy=args.strategy, device=device,
                    batch_size=args.batch, tokens_per_sample=tokens(args.side, 512),
                    gpu_memory_limit=args.gpu_memory_limit)
    fill_random(model, device)
    with torch.no_grad():          # B = 0 would leave every A without a gradient: give B values too
        for n, q in model.named_parameters():
            if n.endswith("lora_B"):
                q.normal_(0, 0.01)
    x, target = make_inputs(cfg, args.batch, args.side, 512, device, torch.bfloat16)
    if args.fp32_reference:
        # the step in fp32, then the frozen weights rounded to bf16 for the others; t = 0.5: t and
        # 1000 t are exact in bf16, so both runs see the same time embedding
        x = (*x[:4], torch.full_like(x[4], 0.5), *x[5:])
        x32 = [t.float() if t is not None and t.is_floating_point() else t for t in x]
        loss_r, ref = step(model, params, x32, target)
        for q in model.parameters():
            if not q.requires_grad:
                q.data = q.data.to(torch.bfloat16)
    loss_a, eager_a = step(model, params, x, target)
    loss_b, eager_b = step(model, params, x, target)
    flux2.fuse(True)
    step(model, params, x, target)         # compiles
    loss_f, fused = step(model, params, x, target)
    finite = all(torch.isfinite(g).all() for g in fused)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, {args.preset} {args.strategy} "
          f"batch {args.batch} x {args.side}², LoRA paper r16 ({len(params)} tensors)")
    print(f"loss eager {loss_a:.6f} / eager again {loss_b:.6f} / fused {loss_f:.6f}")
    print("gradients, max / median relative difference over tensors:")
    print("  eager vs eager: %.2e / %.2e" % differ(eager_b, eager_a))
    print("  fused vs eager: %.2e / %.2e" % differ(fused, eager_a))
    if args.fp32_reference:
        print(f"against fp32 (loss {loss_r:.6f}): eager bf16 %.2e / %.2e, fused bf16 %.2e / %.2e"
              % (*differ(eager_a, ref), *differ(fused, ref)))
    print(f"  fused gradients all finite: {finite}")
    if device.type == "cuda":
        print(f"peak GPU {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
