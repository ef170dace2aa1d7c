"""Full-size FLUX.2 [dev] sampling benchmark: 1024², 50 steps, batch 1, random bf16 weights (run from the repo root:
`python bench/sample_full.py [--compile]`). Times the text encoder (embeddings + 30 layers), the 50 DiT steps, the decode."""
import gc, json, os, sys, time, torch
sys.path.insert(0, os.getcwd())
import flux2, models, sample, offload, text_encoder, vae
from models import fill_random
dev, out = torch.device("cuda"), os.environ.get("OUT", "/tmp")
res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
def sync_time(): torch.cuda.synchronize(); return time.time()
def build(cls, cfg, dtype):
    with torch.device("meta"):
        m = cls(cfg)
    m = m.to(dtype).to_empty(device=dev).requires_grad_(False).eval()
    fill_random(m, dev)
    return m
t0 = sync_time()
text = build(text_encoder.MistralEncoder, text_encoder.TEXT_PRESETS["mistral-small-3.2"], torch.bfloat16)
res["text_build_s"] = sync_time() - t0
stack = models.Models(device=dev, dtype=torch.bfloat16, text_encoder=text, tokenizer=text_encoder.Tokenizer.tiny())
torch.cuda.reset_peak_memory_stats()
t0 = sync_time(); txt = models.encode_text(stack, ["a red fox in the snow, golden hour"]); res["text_encode_s"] = sync_time() - t0
res["text_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
models.free_text_encoder(stack); del text; gc.collect(); torch.cuda.empty_cache()
stack.dit = build(flux2.Flux2, flux2.PRESETS["dev"], torch.bfloat16)
stack.ae = build(vae.AutoEncoder, vae.AE_PRESETS["flux2"], torch.float32)
with torch.no_grad():
    for n, b in stack.ae.named_buffers():
        if n.endswith("running_var"): b.fill_(1.0)
        if n.endswith("running_mean"): b.zero_()
print(res, flush=True)
for compile in [False] + (["compile"] if "--compile" in sys.argv else []):
    offload.prepare(stack.dit, stack.dit.blocks, strategy="auto", device=dev, batch_size=1, tokens_per_sample=4608,
                    train=False, compile=bool(compile))
    tag = "compiled" if compile else "eager"
    if compile:   # warm-up compile outside the timing
        sample.generate_tensors(stack, txt=txt, width=1024, height=1024, steps=2, guidance=4.0, seeds=[0])
    torch.cuda.reset_peak_memory_stats()
    # time the DiT stage and the decode separately: generate_tensors = denoise + decode, so time denoise via steps=50 minus decode
    h16 = w16 = 64
    ts = sample.schedule(50, h16 * w16)
    x = flux2.pack(sample.noise(0, h16, w16)).to(dev, torch.bfloat16)
    ids = flux2.image_ids(h16, w16)[None].to(dev); tids = flux2.text_ids(512)[None].to(dev)
    with torch.no_grad():
        t0 = sync_time(); x = sample.denoise(stack.dit, x, ids, txt, tids, ts, 4.0); res[f"dit_50_steps_{tag}_s"] = sync_time() - t0
        t0 = sync_time(); img = stack.ae.decode(flux2.unpack(x, h16, w16).float()); res[f"decode_{tag}_s"] = sync_time() - t0
    res[f"peak_{tag}_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(res, flush=True)
    if compile: break
    offload.release(stack.dit) if hasattr(offload, "release") else None
json.dump(res, open(f"{out}/sample_full.json", "w"), indent=1)
