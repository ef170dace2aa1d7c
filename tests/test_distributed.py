"""train.py under torchrun, on the CPU (gloo) with the tiny model: two ranks train what one process trains with the
same global batch, a checkpoint resumes on another number of ranks, each global batch and the caching are split
over the ranks, and the planner shards FLUX.2 [dev] over several GPUs (docs/offload.md §1-2, §7)."""
import json
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load_file, save_file

import data
import flux2
import lora
import models
import offload
import planner
import sample
import train
import util
import weights
from util import GiB

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "examples" / "toy"
K = 2                        # steps of the two-rank run; the reference goes on to 2K
# --buckets: the toy squares and three odd aspect ratios give short batches (1 image), so rank 1 gets padding rows;
# 4 global batches per K steps, 6 per epoch: the runs cross an epoch.
RUN = ["--data", str(TOY), "--model", "tiny", "--resolution", "64", "--buckets", "--batch-size", "2",
       "--grad-accum", "2", "--rank", "4", "--lr", "1e-3", "--seed", "3", "--sample-steps", "4",
       "--save-every", str(K)]


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def torchrun(*argv) -> str:
    """`torchrun --standalone --nproc_per_node 2 train.py RUN argv` with one thread per rank; its output."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", *RUN, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def by_hand(tmp: Path, *argvs) -> list[tuple[int, str]]:
    """One `python train.py RUN argv` per rank, each with the environment torchrun gives the only process of a
    machine (RANK, WORLD_SIZE, LOCAL_RANK=0, MASTER_ADDR/PORT); (exit code, stderr) per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": str(len(argvs)), "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(offload._free_port())}
    errs = [tmp / f"rank{r}.err" for r in range(len(argvs))]
    procs = [subprocess.Popen([sys.executable, "train.py", *RUN, *map(str, argv)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=err.open("w"), env={**env, "RANK": str(r)})
             for r, (argv, err) in enumerate(zip(argvs, errs))]
    return [(p.wait(timeout=120), err.read_text()) for p, err in zip(procs, errs)]


def run_here(tmp, *argv):
    """One process, in this one (no process group)."""
    return train.train(train.parse_args([*RUN, "--cache-dir", str(tmp / "cache"), *map(str, argv)]))


def checkpoint(out: Path, step: int) -> dict:
    return train.load_checkpoint(out / "checkpoints" / f"step-{step:06d}.pt")


def assert_same_state(got: dict, want: dict):
    """Checkpoints of the same global state: data position and noise stream exactly, float state to rounding.
    The split gradient is as close to a float64 one as the unsplit float32 gradient is (~1e-6; the logs check it
    at 1e-6), but Adam divides every component by its own RMS: components whose gradient is near eps or cancels
    between steps turn that rounding into ~1e-4 of the moments and up to ~1e-3 of a LoRA tensor (seeds 1-5)."""
    assert got["step"] == want["step"] and got["loader"] == want["loader"]
    assert torch.equal(got["rng"]["train"], want["rng"]["train"])
    assert got["lora"].keys() == want["lora"].keys()
    assert all(rel(got["lora"][k], want["lora"][k]) < 1e-2 for k in want["lora"])
    g, w = got["optimizer"]["state"], want["optimizer"]["state"]
    assert g.keys() == w.keys()
    for i in w:
        assert g[i]["step"] == w[i]["step"]
        assert rel(g[i]["exp_avg"], w[i]["exp_avg"]) < 1e-3 and rel(g[i]["exp_avg_sq"], w[i]["exp_avg_sq"]) < 1e-3


def assert_same_log(got: list[dict], want: list[dict]):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * b["loss"]
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-6 * b["grad_norm"]


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """One process straight to 2K steps, checkpoints at K and 2K: what every number of ranks must reproduce."""
    tmp = tmp_path_factory.mktemp("one")
    run_here(tmp, "--out", tmp / "out", "--steps", 2 * K, "--sample-every", "0")
    return tmp


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two ranks, K steps, fresh cache, previews at 0 and K: (folder, torchrun output)."""
    tmp = tmp_path_factory.mktemp("two")
    return tmp, torchrun("--out", tmp / "out", "--cache-dir", tmp / "cache", "--steps", K, "--sample-every", K)


def test_two_ranks_train_what_one_process_trains(one, two):
    (tmp, output), out = two, two[0] / "out"
    assert output.count("offload plan 'fsdp2'") == 1                       # printed by rank 0 only
    assert "FSDP2 over 2 ranks, shards on the GPU, 1/2 per rank" in output
    assert "batch 2 over 2 processes (1 each) x 2 accumulated" in output
    assert_same_state(checkpoint(out, K), checkpoint(one / "out", K))
    assert_same_log(train.read_log(out), train.read_log(one / "out")[:K])  # one writer: K lines, not 2K
    # the ranks split the caching and filled the same cache the single process did
    files = lambda c: {p.relative_to(c): p.read_bytes() for p in c.rglob("*") if p.is_file()}
    assert files(tmp / "cache") == files(one / "cache")
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000000.png", f"step-{K:06d}.png"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    # the preview drawn by the sharded model is what sample.py draws with the LoRA file rank 0 saved
    png = tmp / "s.png"
    caption = (TOY / "green_triangle.txt").read_text().strip()              # the second preview prompt: seed 3 + 1
    assert sample.main(["--model", "tiny", "--device", "cpu", "--lora", str(out / "lora.safetensors"), "--prompt",
                        caption, "--seed", "4", "--steps", "4", "--width", "64", "--height", "64",
                        "--out", str(png)]) == 0
    grid = np.asarray(Image.open(out / "samples" / f"step-{K:06d}.png").convert("RGB"))
    assert np.array_equal(grid[20:84, 64:128], np.asarray(Image.open(png).convert("RGB")))


def test_two_rank_checkpoint_resumes_on_one_rank(one, two, tmp_path):
    shutil.copytree(two[0] / "out", tmp_path / "out")
    run_here(two[0], "--out", tmp_path / "out", "--steps", 2 * K, "--sample-every", "0", "--resume")
    assert_same_state(checkpoint(tmp_path / "out", 2 * K), checkpoint(one / "out", 2 * K))
    assert_same_log(train.read_log(tmp_path / "out"), train.read_log(one / "out"))
    a, b = load_file(tmp_path / "out" / "lora.safetensors"), load_file(one / "out" / "lora.safetensors")
    assert a.keys() == b.keys() and all(rel(a[k], b[k]) < 1e-2 for k in b)


def test_one_rank_checkpoint_resumes_on_two_ranks_with_cpu_offload(one, tmp_path):
    (tmp_path / "out" / "checkpoints").mkdir(parents=True)
    shutil.copy(one / "out" / "checkpoints" / f"step-{K:06d}.pt", tmp_path / "out" / "checkpoints")
    shutil.copy(one / "out" / "log.jsonl", tmp_path / "out")
    # a 1 MiB "GPU" cannot hold the shards: FSDP2 keeps them in host memory (CPUOffloadPolicy, unpinned on the CPU)
    output = torchrun("--out", tmp_path / "out", "--cache-dir", one / "cache", "--steps", 2 * K, "--sample-every",
                      "0", "--resume", "--gpu-memory-limit", 1 / 1024)
    assert "FSDP2 over 2 ranks, shards in host memory (CPUOffloadPolicy), 1/2 per rank" in output
    assert_same_state(checkpoint(tmp_path / "out", 2 * K), checkpoint(one / "out", 2 * K))
    assert_same_log(train.read_log(tmp_path / "out"), train.read_log(one / "out"))


def test_train_frees_its_process_group_before_returning(tmp_path, monkeypatch):
    """The group train() made for fsdp2 is freed (its gloo worker threads joined) before train() returns, not left to
    interpreter shutdown. There a worker dropping a tensor's last reference must take the GIL and aborts the process
    ("terminate called without an active exception"): 5 of 289 runs of the two-rank snapshot test below before,
    0 of 210 after."""
    groups, join = [], offload.init_process_group
    monkeypatch.setattr(offload, "init_process_group",
                        lambda device: (join(device), groups.append(weakref.ref(dist.group.WORLD))))
    args = train.parse_args(["--data", str(TOY), "--model", "tiny", "--resolution", "32", "--steps", "1",
                             "--offload", "fsdp2", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"),
                             "--sample-every", "0", "--save-every", "0"])
    train.train(args)
    assert groups and groups[0]() is None and not dist.is_initialized()


def tiny_snapshot(root: Path, cache: Path) -> Path:
    """A dev-layout snapshot whose DiT file holds the tiny model's weights (BFL names, float32), with the toy data
    cached under its ids by the tiny autoencoder and text encoder, which it therefore never loads (those parts are
    placeholders; text_encoder/config.json only has to pass check_pair: 3 x 64-wide Mistral features)."""
    (root / "text_encoder").mkdir(parents=True)
    (root / "text_encoder" / "config.json").write_text(json.dumps(
        {"model_type": "mistral", "hidden_size": 64, "num_hidden_layers": 31, "num_attention_heads": 4}))
    (root / "ae.safetensors").touch()
    (root / "tokenizer.json").touch()
    dit = models.load_models(tiny=True, dtype=torch.float32, parts=("dit",)).dit
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, root / "flux2-dev.safetensors")
    tiny, snap = models.ModelSource("tiny", None, "cpu"), models.ModelSource("dev", root, "cpu")
    items = data.cache_latents(TOY, cache_dir=cache, ae_id=snap.ae_id, load_ae=tiny.load_ae, resolution=64,
                               buckets=True)
    data.cache_texts([it.caption for it in items], cache_dir=cache, text_id=snap.text_id,
                     load_encoder=tiny.load_text_encoder)
    return root


def test_two_ranks_load_their_shards_of_a_snapshot_and_train_what_one_process_trains(one, tmp_path):
    """From a snapshot, fsdp2 builds the DiT on meta and each rank reads only its shard from the file
    (models.ModelSource.fill_dit); the adapters are redrawn as on a CPU-loaded DiT. The run equals --model tiny's."""
    snap = tiny_snapshot(tmp_path / "snap", tmp_path / "cache")
    output = torchrun("--model", "dev", "--model-dir", snap, "--out", tmp_path / "out", "--cache-dir",
                      tmp_path / "cache", "--steps", K, "--sample-every", "0")
    assert "FSDP2 over 2 ranks" in output
    assert_same_state(checkpoint(tmp_path / "out", K), checkpoint(one / "out", K))
    assert_same_log(train.read_log(tmp_path / "out"), train.read_log(one / "out")[:K])


def test_one_process_fills_a_snapshot_into_the_placed_dit_and_trains_what_tiny_trains(one, tmp_path, capsys,
                                                                                      monkeypatch):
    """One process builds the DiT on meta too: offload.prepare places it (here --offload stream, as on a GPU: the
    blocks in host copies the GPU streams from), then fill_dit reads the file into those places, so the whole DiT
    never sits in host memory. The run equals --model tiny's."""
    snap = tiny_snapshot(tmp_path / "snap", tmp_path / "cache")
    filled, fill = [], models.ModelSource.fill_dit
    monkeypatch.setattr(models.ModelSource, "fill_dit", lambda self, dit: fill(self, filled.append(dit) or dit))
    run_here(tmp_path, "--model", "dev", "--model-dir", snap, "--out", tmp_path / "out", "--steps", K,
             "--sample-every", "0", "--offload", "stream", "--gpu-memory-limit", 1)
    assert "streamed: 4 of 4 blocks" in capsys.readouterr().out and len(filled) == 1
    assert_same_state(checkpoint(tmp_path / "out", K), checkpoint(one / "out", K))
    assert_same_log(train.read_log(tmp_path / "out"), train.read_log(one / "out")[:K])


def _load_shards(rank: int, port: int, cases: list):
    """One of two ranks for test_sharded_load_equals_load_flux2 (torch.multiprocessing.spawn)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        _check_shards(rank, cases)           # returns first, so its sharded models are gone when the group is freed
    finally:
        offload.leave_process_group()


def _check_shards(rank: int, cases: list):
    """For each (path, gpu_memory_limit): the DiT built on meta, given LoRA, sharded by offload.prepare and filled
    by load_flux2_into gathers to load_flux2's tensors."""
    models = []
    for path, limit in cases:
        want = weights.load_flux2(path).state_dict()                        # bf16, the whole DiT on this rank
        model = weights.load_flux2(path, device="meta")
        lora.inject(model, "all", rank=2)
        plan = offload.prepare(model, model.blocks, strategy="fsdp2", device="cpu", batch_size=1,
                               tokens_per_sample=8, gpu_memory_limit=limit)
        assert plan.cpu_offload is (limit is not None)
        weights.load_flux2_into(model, path)
        models.append(model)
        frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
        assert frozen.keys() == want.keys()
        for name, p in frozen.items():
            assert p.dtype == torch.bfloat16 and torch.equal(p.full_tensor(), want[name]), name
        short = [n for n, p in frozen.items() if p.to_local().shape[0] < -(-p.shape[0] // 2)]
        assert bool(short) == (rank == 1)                                 # rows that do not split evenly
    bad = cases[0][0].with_name("missing.safetensors")
    with pytest.raises(util.LoadError, match=r"missing.safetensors: 1 keys of FLUX.2 .* missing, e\.g\. "
                                               r"\['single_blocks\.1\.linear2\.weight'\]"):
        weights.load_flux2_into(models[0], bad)


def test_sharded_load_equals_load_flux2(tmp_path):
    """Each rank copies its rows (torch.chunk's split, as FSDP2 shards: the last shard short or, for one row, empty)
    from BFL and diffusers files; gathered, they are load_flux2's tensors bit for bit. A missing key: LoadError."""
    from test_dit import CONFIGS, random_reference, to_bfl
    cases = []
    for layout, channels in (("bfl", 1), ("diffusers", 7)):       # final_layer.linear [channels, H]: 1 row, 7 rows
        ref = random_reference({**CONFIGS["klein-like"], "in_channels": channels})
        if layout == "diffusers":
            ref.save_pretrained(tmp_path / "transformer")
            cases.append((tmp_path / "transformer", 1e-4))           # a 0.1 MiB "GPU": shards in host memory
        else:
            sd = {"model.diffusion_model." + k: v.contiguous() for k, v in to_bfl(ref.state_dict()).items()}
            save_file(sd, tmp_path / "flux2.safetensors")
            cases.append((tmp_path / "flux2.safetensors", None))
            save_file({k: v for k, v in sd.items() if not k.endswith("single_blocks.1.linear2.weight")},
                      tmp_path / "missing.safetensors")
    torch.multiprocessing.spawn(_load_shards, args=(offload._free_port(), cases), nprocs=2)


def test_replicas_when_asked_for(one, tmp_path):
    """--offload checkpoint under torchrun: no sharding, each rank holds the whole model (plain data parallel)."""
    output = torchrun("--out", tmp_path / "out", "--cache-dir", one / "cache", "--steps", K, "--sample-every", "0",
                      "--offload", "checkpoint")
    assert "offload plan 'checkpoint'" in output and "resident: 4 of 4 blocks" in output and "FSDP2" not in output
    assert_same_state(checkpoint(tmp_path / "out", K), checkpoint(one / "out", K))
    assert_same_log(train.read_log(tmp_path / "out"), train.read_log(one / "out")[:K])


def test_machines_must_share_the_cache(one, tmp_path):
    """Two machines with a cache folder each: each caches half the images and never sees the other half."""
    got = by_hand(tmp_path, *[("--out", tmp_path / "out", "--cache-dir", tmp_path / f"cache{r}", "--steps", 1)
                              for r in (0, 1)])
    for code, err in got:
        lines = [line for line in err.splitlines() if line.startswith("error")]
        assert code == 2 and len(lines) == 1 and "the ranks see different images" in lines[0], err[-2000:]
        assert "must be folders every machine sees (a shared filesystem)" in lines[0]


def test_global_batch_must_split_over_the_ranks(tmp_path, monkeypatch, capsys):
    argv = [*RUN[:RUN.index("--batch-size")], "--batch-size", "3", "--out", str(tmp_path / "out")]
    for rank in (0, 1):                                 # what torchrun sets for each of its two processes
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert train.main(argv) == 2 and not dist.is_initialized() and not (tmp_path / "out").exists()
        err = capsys.readouterr().err.strip().splitlines()
        assert err == (["error: --batch-size 3 is the global batch and does not split over 2 processes; pass a "
                        "multiple of 2"] if rank == 0 else [])


# ----------------------------------------------------------------------------------------------------------
# The pieces: the loader's split, the cache's split, the planner

def test_each_rank_gets_its_rows_of_every_global_batch(one):
    items = data.cache_latents(TOY, cache_dir=one / "cache", ae_id=models.ModelSource("tiny", None, "cpu").ae_id,
                               load_ae=None, resolution=64, buckets=True)   # cached: the autoencoder is not needed
    text_id = models.ModelSource("tiny", None, "cpu").text_id
    make = lambda rank, world: data.Loader(items, cache_dir=one / "cache", text_id=text_id, batch_size=3,
                                           repeats=2, seed=5, rank=rank, world=world)
    whole, halves = make(0, 1), [make(0, 2), make(1, 2)]
    padded = 0
    for _ in range(12):                                                      # more than an epoch
        full, parts = next(whole), [next(h) for h in halves]
        total = full["total"]
        assert full["index"].tolist() == list(range(total)) and all(p["total"] == total for p in parts)
        m = -(-total // 2)
        assert [p["index"].tolist() for p in parts] == [list(range(m)), list(range(m, 2 * m))]
        rows = torch.cat([p["latents"] for p in parts])                      # [2m, 128, h, w]
        assert torch.equal(rows[:total], full["latents"])
        assert all(torch.equal(r, full["latents"][-1]) for r in rows[total:])   # padding repeats the last item
        padded += 2 * m - total
        assert all(h.state_dict() == whole.state_dict() for h in halves)
    assert padded > 0


def test_ranks_split_the_caching(tmp_path):
    """Rank r encodes items r, r + 2, ...: run rank 1's share, then rank 0's, in a world of one (the barrier)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ae = models.load_models(tiny=True, device="cpu", dtype=torch.float32, parts=("ae",)).ae
        encoded = []

        class Counting(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.ae = ae

            def encode(self, x):
                encoded.append(x.shape)
                return ae.encode(x)

        kw = dict(cache_dir=tmp_path, ae_id="tiny", load_ae=Counting, resolution=32)
        names = [p.name for p, _ in data.find_images(TOY)]
        odd = data.cache_latents(TOY, rank=1, world=2, **kw)
        assert [it.path.name for it in odd] == names[1::2] and len(encoded) == 4      # only its share exists yet
        every = data.cache_latents(TOY, rank=0, world=2, **kw)
        assert [it.path.name for it in every] == names and len(encoded) == 8

        texts, seen = ["a", "b", "c", "a", "d", "e"], []
        encoder = lambda: lambda chunk: (seen.extend(chunk), torch.zeros(len(chunk), 512, 4))[1]
        data.cache_texts(texts, cache_dir=tmp_path, text_id="t", load_encoder=encoder, rank=1, world=2)
        assert seen == ["b", "d"]                                            # distinct texts 1 and 3
        data.cache_texts(texts, cache_dir=tmp_path, text_id="t", load_encoder=encoder, rank=0, world=2)
        assert sorted(seen) == ["a", "b", "c", "d", "e"]
    finally:
        offload.leave_process_group()


def test_fsdp2_keeps_shards_on_the_gpus_when_they_fit():
    """FLUX.2 [dev], paper LoRA r16, 1024², 79 GiB per GPU: at 2 ranks the 32 GiB half-shards fit next to batch 2
    but not next to batch 8, which then offloads them; at 8 ranks they fit either way."""
    with torch.device("meta"):
        model = flux2.Flux2(flux2.PRESETS["dev"]).to(torch.bfloat16)
        lora.inject(model, "paper", rank=16)
    one_gpu = {B: offload.plan_for(model, model.blocks, strategy="fsdp2", device="cpu", batch_size=B,
                                   tokens_per_sample=4608, gpu_memory_limit=79.0, selective=False)
               for B in (2, 8)}                                    # (the q plans below keep no attention either)
    p = one_gpu[2]
    assert p.cpu_offload and p.world_size == 1 and p.h2d_bytes_per_step == 2 * sum(p.block_bytes) + p.root_bytes
    trainable = sum(q.numel() * 4 for q in model.parameters() if q.requires_grad)
    unit = 4608 * 6144 * 2
    for W, B, on_gpu in ((2, 2, True), (2, 8, False), (8, 8, True)):
        activations = planner.ActivationBytes(saved_input=planner.SAVED_INPUT_UNITS * unit,
                                              working_set=planner.TRAIN_WORKING_SET_UNITS * unit,
                                              whole_block=planner.WHOLE_BLOCK_UNITS * unit)
        q = planner.plan(p.block_bytes, p.root_bytes, activations=activations, batch_size=B, budget_bytes=79 * GiB,
                         trainable_bytes=trainable, strategy="fsdp2", world_size=W)
        shards = (sum(p.block_bytes) + p.root_bytes) // W
        extra = B * (planner.WHOLE_BLOCK_UNITS - planner.SAVED_INPUT_UNITS) * unit   # a block keeping activations
        plain = lambda plan: 56 - len(plan.checkpointed)
        gathered = one_gpu[B].peak_bytes - plain(one_gpu[B]) * extra       # all 56 checkpointed, shards on the host
        with_shards = gathered + shards
        assert (with_shards <= 79 * GiB - 3 * GiB) is on_gpu                # margin min(3 GiB, 5%)
        assert q.cpu_offload is not on_gpu and q.streamed == list(range(56))
        base = with_shards if on_gpu else gathered
        assert plain(q) == min(56, (79 * GiB - 3 * GiB - base) // extra) > 0   # spare memory skips recompute
        assert q.checkpointed == list(range(56 - plain(q)))
        assert q.peak_bytes == base + plain(q) * extra <= 79 * GiB - 3 * GiB
        assert q.h2d_bytes_per_step == (0 if on_gpu else (2 * sum(p.block_bytes) + p.root_bytes) // W)
        text = q.describe()
        assert f"FSDP2 over {W} ranks, shards {'on the GPU' if on_gpu else 'in host memory'}" in text
        assert ("host -> GPU" in text) is not on_gpu and "all-gathered per step" in text
