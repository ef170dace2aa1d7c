"""End to end on a card of a given size, rehearsed with --gpu-memory-limit: for each cap, train.py
(caching, --steps steps, one preview at the last step) and sample.py (one image) on a random
full-size model, each in its own process. Records s/step (median of log.jsonl), text-encoding time
per prompt (the caching pass; the sampler's prompt), s/image, peak GPU (allocator, reserved),
peak host RSS, pinned host memory and host->GPU bytes per step (from the printed plan), and what
PCIe 4.0 x16 (~25 GB/s) would add per step. Writes card.json and card.md to --out-dir.
bench/RESULTS.md holds its numbers; README's "Which card?" table is filled from them.

    python bench/card.py --caps 24 --out-dir bench/h200/card          # one cap per device call
    python bench/card.py --model tiny --device cpu --caps none --steps 2 --sample-steps 2 \\
        --resolution 32 --size 32 --out-dir /tmp/card                  # a quick check on the CPU

Each process runs in `--child` mode: train.py's or sample.py's main() in this file's process,
with the text encoder and sample.generate wrapped in timers; it prints one `CARD {json}` line of
its measurements at the end.
"""
import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GiB = 2**30
PCIE4_BYTES_PER_S = 25e9          # PCIe 4.0 x16, what a host->GPU copy reaches in practice
H200_BYTES_PER_S = 50e9           # pinned host->GPU on the H200 host (PCIe 5.0), offload.md


# --------------------------------------------------------------------------------------------------
# Child: one train.py or sample.py run, timed from inside

def _synchronize():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def child(kind: str, argv: list[str]) -> int:
    """Run train.main or sample.main(argv) here, timing the text encoder (loading included) and
    each sample.generate call; print `CARD {json}` with the timings and peak memory; its exit
    code."""
    import torch

    import models
    import sample
    import train
    found = {"text_s": 0.0, "texts": 0, "image_s": []}
    load = models.ModelSource.load_text_encoder

    def timed_load(source):
        start = time.perf_counter()
        encode = load(source)
        found["text_s"] += time.perf_counter() - start

        def timed_encode(prompts):
            start = time.perf_counter()
            out = encode(prompts)
            _synchronize()
            found["text_s"] += time.perf_counter() - start
            found["texts"] += len(prompts)
            return out
        return timed_encode
    generate = sample.generate

    def timed_generate(*args, **kwargs):
        _synchronize()
        start = time.perf_counter()
        out = generate(*args, **kwargs)
        _synchronize()
        found["image_s"].append(time.perf_counter() - start)
        return out
    models.ModelSource.load_text_encoder, sample.generate = timed_load, timed_generate
    try:
        return (train.main if kind == "train" else sample.main)(argv)
    finally:
        if torch.cuda.is_available():
            found["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
            found["peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
        found["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
        print("CARD " + json.dumps(found), flush=True)


# --------------------------------------------------------------------------------------------------
# Parent: the runs, what they printed, the tables

def _gib(text: str, label: str) -> float | None:
    """The size after `label` in a printed plan ("47.5 GiB", "12.0 MiB") in GiB; None if absent."""
    m = re.search(re.escape(label) + r" ([\d.]+) (GiB|MiB)", text)
    return None if m is None else float(m[1]) / (1024 if m[2] == "MiB" else 1)


def run_child(kind: str, argv: list[str], *, log: Path, timeout: float) -> dict:
    """One child process; its CARD measurements, plan figures, exit code and wall time."""
    start = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, __file__, "--child", kind, *argv], cwd=ROOT,
                           capture_output=True, text=True, timeout=timeout)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout:.0f} s", "timeout"
    log.write_text(out if isinstance(out, str) else out.decode(errors="replace"))
    card = [json.loads(line[5:]) for line in str(out).splitlines() if line.startswith("CARD ")]
    r = {"rc": rc, "wall_s": round(time.perf_counter() - start, 1), **(card[-1] if card else {})}
    r["pinned_gib"] = _gib(out, "host memory for streamed weights:")
    r["h2d_gib_per_step"] = _gib(out, "host -> GPU per step:")
    errors = [line for line in str(out).splitlines() if line.startswith("error:")]
    if errors:
        r["error"] = errors[-1]
    return r


def train_run(args, cap, work: Path, timeout: float) -> dict:
    """train.py at this cap: fresh cache (so caching is measured), --steps steps, one preview."""
    tag = f"cap{cap or 'none'}"
    argv = ["--model", args.model, "--data", str(args.data), "--steps", str(args.steps),
            "--sample-every", str(args.steps), "--sample-steps", str(args.sample_steps),
            "--save-every", "0", "--out", str(work / f"train-{tag}"),
            "--cache-dir", str(work / f"cache-{tag}")]
    argv += ["--gpu-memory-limit", str(cap)] if cap else []
    argv += ["--device", args.device] if args.device else []
    argv += ["--resolution", str(args.resolution)] if args.resolution else []
    r = run_child("train", argv, log=work / f"train-{tag}.log", timeout=timeout)
    log = work / f"train-{tag}" / "log.jsonl"
    steps = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    if steps:
        r["s_per_step"] = statistics.median(s["s_per_step"] for s in steps)
        r["log_gpu_mem_gib"] = max((s.get("gpu_mem_gb", 0) for s in steps), default=None)
    if r.get("texts"):
        r["text_s_per_prompt"] = r["text_s"] / r["texts"]
    if r.get("h2d_gib_per_step") and r.get("s_per_step"):
        r.update(pcie4(r["h2d_gib_per_step"] * GiB, r["s_per_step"]))
    return r


def pcie4(h2d_bytes: float, s_per_step: float) -> dict:
    """What PCIe 4.0 x16 would add per step: at least what the copies no longer hide behind the
    measured step (max(step, copy time) - step), at most their whole extra time if none hid."""
    copy = h2d_bytes / PCIE4_BYTES_PER_S
    return {"pcie4_copy_s": round(copy, 3),
            "pcie4_adds_s": [round(max(s_per_step, copy) - s_per_step, 3),
                             round(copy - h2d_bytes / H200_BYTES_PER_S, 3)]}


def sample_run(args, cap, work: Path, timeout: float) -> dict:
    """sample.py at this cap: one image of --size² with --sample-steps steps."""
    tag = f"cap{cap or 'none'}"
    argv = ["--model", args.model, "--prompt", "a red circle on a blue square",
            "--width", str(args.size), "--height", str(args.size), "--steps",
            str(args.sample_steps), "--seed", "0", "--out", str(work / f"sample-{tag}.png")]
    argv += ["--gpu-memory-limit", str(cap)] if cap else []
    argv += ["--device", args.device] if args.device else []
    r = run_child("sample", argv, log=work / f"sample-{tag}.log", timeout=timeout)
    if r.get("image_s"):
        r["s_per_image"] = r["image_s"][0]
    if r.get("texts"):
        r["text_s_per_prompt"] = r["text_s"] / r["texts"]
    return r


def _cell(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown(results: dict, args) -> str:
    """One row per cap: the training run's and the sampling run's figures."""
    lines = [f"{args.model}, train {args.steps} steps at {args.resolution or 'default'} px, "
             f"sample {args.size}² x {args.sample_steps} steps\n",
             "| cap GiB | s/step | text s/prompt | peak GPU GiB (train) | host RSS GiB (train) | "
             "pinned GiB | H2D GiB/step | PCIe 4 adds s/step | s/image | peak GPU GiB (sample) "
             "| host RSS GiB (sample) |", "|" + "---|" * 11]
    for cap, r in results.items():
        t, s = r.get("train", {}), r.get("sample", {})
        adds = t.get("pcie4_adds_s")
        lines.append("| " + " | ".join([
            cap, _cell(t.get("s_per_step")), _cell(t.get("text_s_per_prompt"), "{:.3f}"),
            _cell(t.get("peak_gpu_reserved_gib"), "{:.1f}"), _cell(t.get("peak_rss_gib"), "{:.1f}"),
            _cell(t.get("pinned_gib"), "{:.1f}"), _cell(t.get("h2d_gib_per_step"), "{:.1f}"),
            "-" if not adds else f"{adds[0]:.2f}-{adds[1]:.2f}", _cell(s.get("s_per_image")),
            _cell(s.get("peak_gpu_reserved_gib"), "{:.1f}"),
            _cell(s.get("peak_rss_gib"), "{:.1f}")]) + " |")
        for part in (t, s):
            if part.get("error") or part.get("rc") not in (0, None):
                lines.append(f"\ncap {cap}: {part.get('error') or 'exit ' + str(part.get('rc'))}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Run the caps, write card.json and card.md, print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--caps", default="24,32,48,none",
                   help="GiB caps (--gpu-memory-limit), comma-separated; none: uncapped")
    p.add_argument("--model", default="dev-random", help="tiny or a random model")
    p.add_argument("--device", help="cuda (default when there is one) or cpu")
    p.add_argument("--data", type=Path, default=ROOT / "examples" / "toy")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sample-steps", type=int, default=28, help="previews and sample.py")
    p.add_argument("--resolution", type=int, help="training side (default: train.py's)")
    p.add_argument("--size", type=int, default=1024, help="sample.py's image side")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-sample", action="store_true")
    p.add_argument("--budget-s", type=float, default=540,
                   help="stop starting runs (and stop a run) past this many seconds")
    p.add_argument("--out-dir", type=Path, default=Path("bench/card-out"))
    p.add_argument("--work-dir", type=Path, help="runs' outputs and caches (default: a temp dir)")
    args = p.parse_args(argv)
    caps = [None if c.strip().lower() == "none" else float(c) for c in args.caps.split(",")]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="card-"))
    work.mkdir(parents=True, exist_ok=True)
    start, results = time.perf_counter(), {}
    for cap in caps:
        r = results.setdefault(f"{cap:g}" if cap else "none", {})
        for part, fn, skip in (("train", train_run, args.skip_train),
                               ("sample", sample_run, args.skip_sample)):
            left = args.budget_s - (time.perf_counter() - start)
            if skip:
                continue
            if left < 10:                   # not enough left to start a run
                r[part] = {"skipped": "--budget-s"}
                continue
            r[part] = fn(args, cap, work, timeout=left)
            print(f"cap {cap or 'none'} {part}: "
                  + json.dumps({k: v for k, v in r[part].items() if k != "image_s"}), flush=True)
    (args.out_dir / "card.json").write_text(json.dumps({"args": {k: str(v) for k, v in
                                                                  vars(args).items()},
                                                         "results": results}, indent=1))
    table = markdown(results, args)
    (args.out_dir / "card.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child(sys.argv[2], sys.argv[3:]))
    sys.exit(main())
