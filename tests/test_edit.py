"""Edit LoRAs on the tiny model (CPU): finding reference images by folder and by metadata.jsonl,
the loss on the target tokens only, caching references by content, micro-batches of one shape,
exact resume, caption dropout, two gloo ranks under torchrun, previews with references and the
LoRA's edit metadata."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import data
import models
import sample
import train

ROOT = Path(__file__).resolve().parents[1]
# img0: two references, img1 and img3: one 80x64, img2: one 64x64 -> three shape groups
REFS = {"img0": [(64, 64), (64, 64)], "img1": [(80, 64)], "img2": [(64, 64)], "img3": [(80, 64)]}


def noise_image(path: Path, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def edit_set(tmp: Path) -> tuple[Path, Path]:
    """data/imgN.png + .txt targets and control/imgN.png, imgN_1.png, ... references."""
    folder, control = tmp / "data", tmp / "control"
    for i, (stem, sizes) in enumerate(REFS.items()):
        noise_image(folder / f"{stem}.png", (48, 48), seed=i)
        (folder / f"{stem}.txt").write_text(f"edit number {i}")
        for k, size in enumerate(sizes):
            noise_image(control / (stem + (f"_{k}" if k else "") + ".png"), size, seed=100 + 10 * i + k)
    return folder, control


def argv(tmp: Path, *extra, out="out") -> list[str]:
    folder, control = tmp / "data", tmp / "control"
    return ["--data", str(folder), "--control-dir", str(control), "--model", "tiny", "--out", str(tmp / out),
            "--cache-dir", str(tmp / "cache"), "--resolution", "32", "--sample-every", "0", "--save-every", "0",
            "--rank", "4", "--lr", "1e-3", "--seed", "3", "--sample-steps", "4", *map(str, extra)]


def adapters(out: Path) -> dict:
    return load_file(out / "lora.safetensors")


def same_lora(a: Path, b: Path) -> bool:
    x, y = adapters(a), adapters(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def cache(tmp: Path, **kw) -> list[data.Item]:
    source = models.ModelSource("tiny", None, torch.device("cpu"))
    load_ae = kw.pop("load_ae", source.load_ae)
    return data.cache_latents(tmp / "data", cache_dir=tmp / "cache", ae_id=source.ae_id, load_ae=load_ae,
                              resolution=32, control_dir=tmp / "control", **kw)


# --------------------------------------------------------------------------------------------------
# Finding references

def test_references_by_folder_and_by_metadata(tmp_path):
    folder, control = edit_set(tmp_path)
    images = sorted(folder.glob("*.png"))
    found = data.find_references(folder, images, control)
    assert [[p.name for p in refs] for refs in found] == [["img0.png", "img0_1.png"], ["img1.png"], ["img2.png"],
                                                          ["img3.png"]]
    assert all(p.parent == control for refs in found for p in refs)
    assert data.find_references(folder, images) == [[], [], [], []]                      # text-to-image
    (folder / "refs").mkdir()
    noise_image(folder / "refs" / "a.png", (64, 64), seed=7)
    noise_image(folder / "refs" / "b.png", (64, 64), seed=8)
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"img{i}.png", "text": "t", "control": ["refs/b.png", "refs/a.png"]}) + "\n"
                for i in range(4)))
    listed = data.find_references(folder, images)
    assert listed == [[folder / "refs" / "b.png", folder / "refs" / "a.png"]] * 4


def test_a_target_without_reference_is_one_error_line(tmp_path, capsys):
    folder, control = edit_set(tmp_path)
    (control / "img2.png").unlink()
    assert train.main(argv(tmp_path, "--steps", 1)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {folder / 'img2.png'}: no reference image; add {control}/img2.png (more as _1, _2, "
                   f"...) or move this image to a text-to-image run"]
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "img0.png", "text": "t",
                                                       "control": ["nope.png"]}) + "\n")
    assert train.main(argv(tmp_path, "--steps", 1)) == 2
    assert "names the reference 'nope.png', which is not in" in capsys.readouterr().err
    prompts = tmp_path / "p.jsonl"
    for line, message in [('"just a string"', f"error: --sample-prompts {prompts}: '\"just a string\"' is not "
                                               f"{{\"prompt\": ..., \"refs\": [...]}}; fix that line"),
                          ('{"prompt": "a", "refs": ["gone.png"]}', f"error: {tmp_path / 'gone.png'}: cannot open "
                                                                    f"this image")]:
        prompts.write_text(line + "\n")
        assert train.main(argv(tmp_path, "--steps", 1, "--sample-prompts", prompts)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(message), err


# --------------------------------------------------------------------------------------------------
# The loss: target tokens only, references with time ids 10, 20, ...

def test_loss_ignores_reference_outputs_and_depends_on_references():
    m = models.load_models(tiny=True, device="cpu", dtype=torch.float32, parts=("dit",))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 128, 2, 2, generator=g), torch.randn(2, 128, 2, 2, generator=g)
    refs = [torch.randn(2, 128, 4, 4, generator=g), torch.randn(2, 128, 5, 4, generator=g)]
    txt, t = torch.randn(2, 512, m.dit.cfg.context_in_dim, generator=g), torch.tensor([0.3, 0.8])
    seen = {}

    def perturbed(img, ids, *rest):                   # the reference positions' outputs changed
        seen["ids"] = ids
        out = m.dit(img, ids, *rest)
        return torch.cat([out[:, :4], out[:, 4:] + 100.0], dim=1)

    with torch.no_grad():
        loss = train.flow_matching_loss(m.dit, x0, txt, t, noise, 4.0, refs=refs)
        assert torch.equal(train.flow_matching_loss(perturbed, x0, txt, t, noise, 4.0, refs=refs), loss)
        assert seen["ids"].shape == (1, 4 + 16 + 20, 4)
        assert seen["ids"][0, :, 0].tolist() == [0] * 4 + [10] * 16 + [20] * 20      # time ids 0, 10, 20
        # the random tiny model attends weakly: a moved reference changes the loss by ~5e-6 of it, 40x the
        # float32 rounding of the mean
        moved = [refs[0], refs[1] + 0.5]
        assert abs(train.flow_matching_loss(m.dit, x0, txt, t, noise, 4.0, refs=moved) - loss) > 1e-6 * loss
        plain = train.flow_matching_loss(m.dit, x0, txt, t, noise, 4.0)
        assert abs(plain - loss) > 1e-6 * loss


# --------------------------------------------------------------------------------------------------
# Caching and batches

def test_references_cached_by_content(tmp_path):
    edit_set(tmp_path)
    items = cache(tmp_path)
    assert [[r.size for r in it.refs] for it in items] == list(REFS.values())
    for it in items:
        for r in it.refs:
            z = load_file(data.latent_path(tmp_path / "cache", r))["latent"]
            assert z.shape == (128, r.size[1] // 16, r.size[0] // 16)

    def no_ae():
        raise AssertionError("everything is cached: the autoencoder must not load")

    assert cache(tmp_path, load_ae=no_ae) == items                         # second run: nothing encoded
    # the same bytes under another name share the entry; another size cap is another entry
    (tmp_path / "control" / "img2.png").write_bytes((tmp_path / "control" / "img0.png").read_bytes())
    again = cache(tmp_path, load_ae=no_ae)
    assert again[2].refs[0].digest == again[0].refs[0].digest
    capped = cache(tmp_path, control_resolution=64)
    assert capped[1].refs[0].size == (64, 48) and capped[1].refs[0].digest != items[1].refs[0].digest
    # prepared and encoded exactly as sampling prepares and encodes them
    ae = models.ModelSource("tiny", None, torch.device("cpu")).load_ae()
    pixels = sample.prepare_refs([Image.open(tmp_path / "control" / "img1.png")])[0]      # [3, 64, 80]
    with torch.no_grad():
        z = ae.encode(pixels[None].to(next(ae.parameters()).dtype))[0]
    assert torch.equal(z.float(), load_file(data.latent_path(tmp_path / "cache", items[1].refs[0]))["latent"])


def test_micro_batches_hold_one_shape(tmp_path):
    edit_set(tmp_path)
    items = cache(tmp_path)
    source = models.ModelSource("tiny", None, torch.device("cpu"))
    data.cache_texts([it.caption for it in items], cache_dir=tmp_path / "cache", text_id=source.text_id,
                     load_encoder=source.load_text_encoder)
    loader = data.Loader(items, cache_dir=tmp_path / "cache", text_id=source.text_id, batch_size=2, seed=1)
    groups = [sorted(loader.items[i].path.stem for i in b) for b in loader._plan]
    assert sorted(groups) == [["img0"], ["img1", "img3"], ["img2"]]
    for _ in range(3):
        batch = next(loader)
        shapes = [tuple(r.shape[1:]) for r in batch["refs"]]
        want = [(128, h // 16, w // 16) for w, h in REFS[f"img{batch['captions'][0][-1]}"]]
        assert shapes == want and all(len(r) == len(batch["latents"]) for r in batch["refs"])


# --------------------------------------------------------------------------------------------------
# Runs: exact resume, caption dropout, metadata, previews

def test_resume_is_exact_with_references_and_caption_dropout(tmp_path):
    edit_set(tmp_path)
    run = ("--batch-size", 2, "--caption-dropout", 0.5, "--save-every", 2)
    straight = train.train(train.parse_args(argv(tmp_path, "--steps", 4, *run, out="straight")))
    train.train(train.parse_args(argv(tmp_path, "--steps", 2, *run, out="resumed")))
    train.train(train.parse_args(argv(tmp_path, "--steps", 4, *run, "--resume", out="resumed")))
    assert same_lora(straight["out"], tmp_path / "resumed")
    assert straight["losses"] == [r["loss"] for r in train.read_log(tmp_path / "resumed")]
    again = train.train(train.parse_args(argv(tmp_path, "--steps", 4, *run, out="again")))
    assert same_lora(straight["out"], again["out"])                        # same seed, same dropout draws
    with safe_open(str(straight["out"] / "lora.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["edit"] == "true" and meta["references"] == "2"
    with pytest.warns(UserWarning, match="is an edit LoRA trained with 2 reference image"):
        sample.warn_if_edit_lora(straight["out"] / "lora.safetensors")
    with pytest.raises(train.LoadError, match="--resume: --caption-dropout is 0.2"):
        train.train(train.parse_args(argv(tmp_path, "--steps", 6, "--batch-size", 2, "--caption-dropout", 0.2,
                                          "--resume", out="resumed")))


def test_caption_dropout_draws_after_t_and_noise_and_uses_the_empty_prompt():
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(3, 128, 2, 2, generator=g), "ctx": torch.randn(3, 512, 8, generator=g),
             "index": torch.arange(3), "total": 3, "refs": [torch.randn(3, 128, 4, 4, generator=g)]}
    empty = torch.randn(1, 512, 8, generator=g)
    calls = []

    def model(img, ids, txt, *rest):
        calls.append(txt)
        return img[:, :4] * 0.5

    kw = dict(device=torch.device("cpu"), guidance=4.0, timestep_sampling="shift", sample_steps=4)
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    dropped = train.micro_batch_loss(model, batch, a, caption_dropout=1.0, empty_txt=empty, **kw)
    kept = train.micro_batch_loss(model, {**batch, "ctx": empty.expand(3, -1, -1)}, b, **kw)
    assert torch.equal(dropped, kept) and torch.equal(calls[0], calls[1])      # P = 1: every row on ""
    b.manual_seed(5)
    train.micro_batch_loss(model, batch, b, **kw)
    assert not torch.equal(a.get_state(), b.get_state())                      # P > 0 draws one more uniform...
    assert torch.equal(calls[2], batch["ctx"])
    c = torch.Generator().manual_seed(5)
    train.micro_batch_loss(model, batch, c, caption_dropout=0.0, empty_txt=empty, **kw)
    assert torch.equal(b.get_state(), c.get_state())                          # ...P = 0 none


def test_previews_show_references_and_jsonl_prompts(tmp_path):
    folder, control = edit_set(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a", "refs": ["control/img1.png"]}) + "\n"
                       + json.dumps({"prompt": "b", "refs": ["control/img0.png", "control/img0_1.png"]}) + "\n")
    out = train.train(train.parse_args(argv(tmp_path, "--steps", 1, "--sample-every", 1, "--sample-prompts",
                                            prompts)))["out"]
    grid = Image.open(out / "samples" / "step-000001.png").convert("RGB")
    assert grid.size[0] == 2 * (32 + 8)                                   # each column: output + thumbnails
    # the first column is what sample.py draws with that reference and the LoRA
    png = tmp_path / "s.png"
    assert sample.main(["--model", "tiny", "--device", "cpu", "--lora", str(out / "lora.safetensors"), "--prompt",
                        "a", "--seed", "3", "--steps", "4", "--width", "32", "--height", "32", "--ref",
                        str(control / "img1.png"), "--out", str(png)]) == 0
    cells = np.asarray(grid)
    assert np.array_equal(cells[20:52, 0:32], np.asarray(Image.open(png).convert("RGB")))
    # beside each output its references' 8 px thumbnails, one under the other (a: 80x64 -> 8x6)
    assert cells[20:26, 32:40].std() > 0 and np.all(cells[26:52, 32:40] == 255)
    assert cells[20:28, 72:80].std() > 0 and cells[28:36, 72:80].std() > 0 and np.all(cells[36:52, 72:80] == 255)
    # without --sample-prompts an edit run previews its first two items with their references
    assert [len(r) for r in train.default_previews(cache(tmp_path))[1]] == [2, 1]


# --------------------------------------------------------------------------------------------------
# Two ranks

def test_two_gloo_ranks_train_what_one_process_trains(tmp_path):
    edit_set(tmp_path)
    run = ("--steps", 3, "--batch-size", 2, "--caption-dropout", 0.5, "--save-every", 3)
    one = train.train(train.parse_args(argv(tmp_path, *run, out="one")))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", *argv(tmp_path, *run, "--cache-dir", tmp_path / "cache2", out="two")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    a = train.load_checkpoint(one["out"] / "checkpoints" / "step-000003.pt")
    b = train.load_checkpoint(tmp_path / "two" / "checkpoints" / "step-000003.pt")
    assert a["loader"] == b["loader"] and torch.equal(a["rng"]["train"], b["rng"]["train"])
    for k, want in a["lora"].items():
        assert ((b["lora"][k] - want).abs().max() / want.abs().max()).item() < 1e-2
    losses = [r["loss"] for r in train.read_log(tmp_path / "two")]
    assert np.allclose(losses, one["losses"], rtol=1e-6)
    # the ranks split the caching and filled the same cache the single process did
    files = lambda c: {p.relative_to(c): p.read_bytes() for p in c.rglob("*") if p.is_file()}
    assert files(tmp_path / "cache2") == files(tmp_path / "cache")
