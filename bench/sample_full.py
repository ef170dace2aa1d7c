"""Full-size FLUX.2 [dev] sampling speed: 1024², 50 steps, batch 1, random bf16 weights (models.py's
dev-random). Times the text encoder (embeddings + 30 layers), the 50 DiT steps and the decode, and
the peak GPU memory of each stage: eager, then with --compile also with whole blocks compiled.
Writes $OUT/sample_full.json (default /tmp). bench/RESULTS.md §3 holds its numbers.

    python bench/sample_full.py [--compile]
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import flux2  # noqa: E402
import models  # noqa: E402
import offload  # noqa: E402
import sample  # noqa: E402
from util import GiB, free_cuda  # noqa: E402


def timed(fn):
    """(fn(), its seconds), the GPU's queued work included."""
    torch.cuda.synchronize()
    t0 = time.time()
    out = fn()
    torch.cuda.synchronize()
    return out, time.time() - t0


@torch.no_grad()
def time_dit_and_decode(stack: models.Models, txt: torch.Tensor, tag: str, res: dict):
    """The 50 Euler steps and the decode of one 1024² image, timed apart."""
    h16 = w16 = 64
    timesteps = sample.schedule(50, h16 * w16)
    x = flux2.pack(sample.noise(0, h16, w16)).to(stack.device, stack.dtype)     # [1, 4096, 128]
    img_ids = flux2.image_ids(h16, w16)[None].to(stack.device)
    txt_ids = flux2.text_ids(txt.shape[1])[None].to(stack.device)
    torch.cuda.reset_peak_memory_stats()
    x, res[f"dit_50_steps_{tag}_s"] = timed(
        lambda: sample.denoise(stack.dit, x, img_ids, txt, txt_ids, timesteps, 4.0))
    latent = flux2.unpack(x, h16, w16).float()                                   # [1, 128, 64, 64]
    _, res[f"decode_{tag}_s"] = timed(lambda: stack.ae.decode(latent))
    res[f"peak_{tag}_gib"] = torch.cuda.max_memory_allocated() / GiB


def main():
    compile_too = "--compile" in sys.argv
    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    source = models.ModelSource("dev-random", None, dev)                       # bf16 on CUDA
    encode, res["text_build_s"] = timed(source.load_text_encoder)
    torch.cuda.reset_peak_memory_stats()
    txt, res["text_encode_s"] = timed(lambda: encode(["a red fox in the snow, golden hour"]))
    res["text_peak_gib"] = torch.cuda.max_memory_allocated() / GiB
    del encode                                   # the encoder and the DiT do not fit together
    free_cuda()
    stack = models.Models(device=dev, dtype=source.dtype, dit=source.load_dit(),
                          ae=source.load_ae())
    print(res, flush=True)
    for compile in [False] + [True] * compile_too:
        offload.prepare(stack.dit, stack.dit.blocks, strategy="auto", device=dev, batch_size=1,
                        tokens_per_sample=4608, train=False, compile=compile)
        if compile:                              # compile outside the timing
            sample.generate_tensors(stack, txt=txt, width=1024, height=1024, steps=2,
                                    guidance=4.0, seeds=[0])
        time_dit_and_decode(stack, txt, "compiled" if compile else "eager", res)
        print(res, flush=True)
        offload.release(stack.dit)
    out = Path(os.environ.get("OUT", "/tmp")) / "sample_full.json"
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
