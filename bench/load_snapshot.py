"""Loading a full-size snapshot into the offload plan, measured: the trainer's peak host memory
split into anonymous, file-backed and shared pages, and how long filling the placed DiT from the
file takes. The DiT is read one tensor at a time into the places the plan made, so host memory
should stay about the weights the plan keeps there plus a small margin, never two copies
(bench/RESULTS.md §7).

There are no real weights here, so it first writes a klein snapshot with random bf16 weights: the
DiT file in BFL names, a Qwen3 text_encoder/config.json, placeholder VAE and tokenizer files, and
the latent and text caches that the random full-size encoders compute under the snapshot's ids (as
tests/test_distributed.tiny_snapshot does at tiny size). train.py then reads only the DiT file. The
file's pages are dropped from the page cache (fsync + fadvise) before each run, and
/proc/<pid>/status is sampled every 0.1 s while train.py runs.

    python bench/load_snapshot.py --preset klein-9b --gpu-memory-limit 24 --batch-sizes 1,4 \
        --data imgs
    python bench/load_snapshot.py --preset tiny --device cpu --resolution 64 \
        --data examples/toy                                      # a dry run
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import models  # noqa: E402
import text_encoder  # noqa: E402
from util import GiB  # noqa: E402

SNAPSHOTS = {  # --preset -> (DiT file name, text encoder preset, the model train.py --model names)
    "klein-9b": ("flux-2-klein-base-9b.safetensors", "qwen3-8b", "klein-9b-random"),
    "klein-4b": ("flux-2-klein-base-4b.safetensors", "qwen3-4b", "klein-4b-random"),
    "tiny": ("flux2-dev.safetensors", "tiny", "tiny"),     # the dry run: a dev-shaped tiny model
}


def write_snapshot(root: Path, preset: str, images: Path, cache: Path, device: torch.device,
                   resolution: int) -> Path:
    """A snapshot with random weights whose caches hold every caption (and the empty CFG prompt)."""
    name, text, random_model = SNAPSHOTS[preset]
    root.mkdir(parents=True, exist_ok=True)
    rand = models.ModelSource(random_model, None, device, torch.bfloat16)
    tensors = {k: v.cpu() for k, v in rand.load_dit().state_dict().items()}
    t = time.time()
    save_file(tensors, root / name)
    del tensors
    size = (root / name).stat().st_size / GiB
    print(f"wrote {name}: {size:.1f} GiB in {time.time() - t:.0f} s", flush=True)
    c = text_encoder.TEXT_PRESETS[text]
    (root / "text_encoder").mkdir(exist_ok=True)
    (root / "text_encoder" / "config.json").write_text(json.dumps(   # tiny: Mistral's layer 30 too
        {"model_type": "qwen3" if c.qk_norm else "mistral", "hidden_size": c.hidden_size,
         "num_hidden_layers": c.num_layers if c.qk_norm else 31, "num_attention_heads": c.num_heads,
         "num_key_value_heads": c.num_kv_heads, "intermediate_size": c.intermediate_size,
         "head_dim": c.head_dim, "vocab_size": c.vocab_size, "rope_theta": c.rope_theta,
         "rms_norm_eps": c.rms_norm_eps}))
    (root / "ae.safetensors").touch()
    (root / "tokenizer.json").touch()
    snap = models.ModelSource("dev", root, device)
    items = data.cache_latents(images, cache_dir=cache, ae_id=snap.ae_id, load_ae=rand.load_ae,
                               resolution=resolution, device=device)
    data.cache_texts([it.caption for it in items] + [""], cache_dir=cache, text_id=snap.text_id,
                     load_encoder=rand.load_text_encoder)
    return root / name


def drop_from_page_cache(path: Path):
    """Write the file out and drop its pages from the page cache, so the next read is from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run(cmd: list[str]) -> dict:
    """Run cmd, echoing its output; peak VmRSS / RssAnon / RssFile / RssShmem (GiB) and the seconds
    from the printed plan (the DiT placed, still empty) to the trainer's first line after filling
    it."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    peak = {}

    def watch():
        while p.poll() is None:
            try:
                status = Path(f"/proc/{p.pid}/status").read_text()
            except OSError:
                break
            for line in status.splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    peak[key] = max(peak.get(key, 0), int(value.split()[0]) * 1024)
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()
    marks, t0 = {}, time.time()
    for line in p.stdout:
        if "it/s]" not in line:
            print(line, end="", flush=True)
        if "offload plan" in line:
            marks.setdefault("placed", time.time() - t0)
        if "images x" in line:
            marks.setdefault("filled", time.time() - t0)
    p.wait()
    fill = marks["filled"] - marks["placed"] if len(marks) == 2 else None
    return {"rc": p.returncode, "fill_s": fill, **{k: v / GiB for k, v in peak.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="klein-9b", choices=sorted(SNAPSHOTS))
    ap.add_argument("--gpu-memory-limit", default="24")
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--data", type=Path, required=True,
                    help="a folder of 1024² images with captions")
    ap.add_argument("--root", type=Path, default=Path("/tmp/snapshot"))
    ap.add_argument("--resolution", default="1024")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=None, help="results.json here")
    args = ap.parse_args()
    cache = args.root / "cache"
    dit_file = write_snapshot(args.root / "snap", args.preset, args.data, cache,
                              torch.device(args.device), int(args.resolution))
    results = []
    for b in args.batch_sizes.split(","):
        for model in ("dev", SNAPSHOTS[args.preset][2]):   # the snapshot, then the file-less model
            drop_from_page_cache(dit_file)
            cmd = [sys.executable, "train.py", "--data", str(args.data), "--model", model,
                   "--cache-dir", str(cache), "--out", str(args.root / f"run-{model}-{b}"),
                   "--steps", "1", "--batch-size", b, "--resolution", args.resolution,
                   "--gpu-memory-limit", args.gpu_memory_limit, "--sample-every", "0",
                   "--save-every", "0", "--no-compile", "--device", args.device]
            if model == "dev":
                cmd += ["--model-dir", str(args.root / "snap")]
            r = {"model": model, "batch": int(b), **run(cmd)}
            print(json.dumps(r), flush=True)
            results.append(r)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "load_snapshot.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
