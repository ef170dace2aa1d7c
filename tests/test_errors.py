"""Bad input and faults on the tiny model (CPU): each ends in one `error:` line with its exit code,
and nothing good is lost — a NaN never replaces a good checkpoint, a full or read-only disk is
named, a sampled image is kept when its path fails."""
import argparse
import errno
import math
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file

import data
import lora
import models
import sample
import train
import util

TOY = Path(__file__).resolve().parents[1] / "examples" / "toy"


def train_argv(out, cache, *extra, data_dir=TOY):
    """Tiny-model training flags: 32 px, no previews, CPU."""
    return [str(a) for a in ("--data", data_dir, "--model", "tiny", "--out", out,
                             "--cache-dir", cache, "--resolution", 32, "--sample-every", 0,
                             "--device", "cpu", *extra)]


def sample_argv(out, *extra):
    """Tiny-model sampling flags: 32 px, 2 steps, CPU."""
    return [str(a) for a in ("--model", "tiny", "--device", "cpu", "--prompt", "a red circle",
                             "--seed", 1, "--steps", 2, "--width", 32, "--height", 32,
                             "--out", out, *extra)]


def errors(capsys) -> list[str]:
    """The `error:` lines written to stderr since the last call."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 6-step run with a checkpoint every 2 steps: (its --out, its cache)."""
    root = tmp_path_factory.mktemp("trained")
    out, cache = root / "out", root / "cache"
    assert train.main(train_argv(out, cache, "--steps", 6, "--save-every", 2)) == 0
    return out, cache


@pytest.fixture
def run_copy(trained, tmp_path):
    """A private copy of the trained run's --out (the cache is shared: it only gains entries)."""
    out = tmp_path / "out"
    shutil.copytree(trained[0], out)
    return out, trained[1]


def lora_finite(path) -> bool:
    return all(torch.isfinite(t).all() for t in train.load_checkpoint(path)["lora"].values())


# --------------------------------------------------------------------------------------------------
# A NaN never replaces a good checkpoint

def test_a_step_that_makes_the_adapters_nan_keeps_the_good_checkpoints(run_copy, capsys,
                                                                       monkeypatch):
    """The issue's recipe (train 6 steps saving every 2, resume with a bad lr, resume with a good
    one), with the bad lr's effect simulated: --lr inf itself is now refused up front. The step
    makes the adapters NaN although its loss was finite: nothing is saved, nothing rotated, exit
    1 names the newest good checkpoint, and the next resume recovers from it."""
    out, cache = run_copy
    real_step = torch.optim.AdamW.step

    def overflowing(self, *a, **kw):
        real_step(self, *a, **kw)
        for group in self.param_groups:
            for p in group["params"]:
                p.data.mul_(math.inf)

    before = [c.name for c in train.checkpoints(out)]
    assert before == ["step-000002.pt", "step-000004.pt", "step-000006.pt"]
    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing)
    assert train.main(train_argv(out, cache, "--steps", 12, "--save-every", 2, "--resume")) == 1
    assert errors(capsys) == [
        f"error: step 7: the optimizer step made the adapters NaN or inf; the newest good "
        f"checkpoint is {out / 'checkpoints' / 'step-000006.pt'}; lower --lr or check the data, "
        f"then --resume"]
    assert [c.name for c in train.checkpoints(out)] == before
    assert all(lora_finite(c) for c in train.checkpoints(out))
    monkeypatch.undo()
    assert train.main(train_argv(out, cache, "--steps", 12, "--save-every", 2, "--resume",
                                 "--lr", "5e-5")) == 0
    assert all(torch.isfinite(t).all() for t in load_file(out / "lora.safetensors").values())
    assert [r["step"] for r in train.read_log(out)] == list(range(1, 13))


def test_a_non_finite_gradient_stops_before_the_optimizer_step(run_copy, capsys, monkeypatch):
    out, cache = run_copy
    real = torch.nn.utils.clip_grad_norm_

    def inf_norm(params, max_norm):
        real(params, max_norm)
        return torch.tensor(math.inf)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", inf_norm)
    assert train.main(train_argv(out, cache, "--steps", 8, "--save-every", 2, "--resume")) == 1
    assert errors(capsys) == [
        f"error: step 7: the gradient norm is inf; the state after step 6 is saved in "
        f"{out / 'checkpoints' / 'step-000006.pt'}; lower --lr or check the data, then --resume"]
    assert [c.name for c in train.checkpoints(out)] == \
        ["step-000002.pt", "step-000004.pt", "step-000006.pt"]
    assert train.load_checkpoint(out / "checkpoints" / "step-000006.pt")["step"] == 6


def test_save_checkpoint_refuses_non_finite_adapters(run_copy):
    out, _ = run_copy
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    optimizer = torch.optim.AdamW(model.parameters())
    args = argparse.Namespace(steps=1)
    assert train.save_checkpoint(out, 99, model, optimizer, {}, args) is None
    assert not train.checkpoint_path(out, 99).exists()


# --------------------------------------------------------------------------------------------------
# --resume past an unreadable checkpoint; the dataset fingerprint

def test_resume_skips_an_unreadable_newest_checkpoint(run_copy, capsys):
    out, cache = run_copy
    newest = out / "checkpoints" / "step-000006.pt"
    newest.write_bytes(random.Random(0).randbytes(4096))    # torch: "use weights_only=False"
    with pytest.raises(util.LoadError) as e:
        train.load_checkpoint(newest)
    assert "weights_only" not in str(e.value) and "not a checkpoint" in str(e.value)
    assert train.main(train_argv(out, cache, "--steps", 7, "--resume")) == 0
    err = capsys.readouterr().err
    assert f"warning: {newest}: unreadable checkpoint (not a checkpoint); renamed to " \
           f"step-000006.pt.bad, resuming from the one before" in err
    assert "weights_only" not in err
    assert [r["step"] for r in train.read_log(out)] == [1, 2, 3, 4, 5, 6, 7]
    assert (out / "checkpoints" / "step-000006.pt.bad").is_file()


def test_dataset_fingerprint_in_lora_and_checkpoints_and_a_changed_folder_warns(tmp_path, capsys):
    folder = tmp_path / "data"
    shutil.copytree(TOY, folder)
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert train.main(train_argv(out, cache, "--steps", 2, "--save-every", 2,
                                 data_dir=folder)) == 0
    with safe_open(str(out / "lora.safetensors"), framework="pt") as f:
        stamp = f.metadata()["dataset"]
    assert len(stamp) == 16
    assert train.load_checkpoint(train.checkpoints(out)[-1])["dataset"] == stamp
    capsys.readouterr()
    (folder / "red_circle.txt").write_text("a crimson disc on white")
    assert train.main(train_argv(out, cache, "--steps", 3, "--resume", data_dir=folder)) == 0
    warned = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("warning:") and "dataset" in line]
    assert len(warned) == 1 and warned[0].startswith(
        f"warning: --resume: the images or captions in --data {folder} changed since the "
        f"checkpoint (dataset {stamp} -> ")
    assert stamp not in warned[0].rpartition("->")[2]


# --------------------------------------------------------------------------------------------------
# The disk: full, read-only, too small

def test_a_full_disk_is_one_line_and_keeps_the_older_checkpoints(run_copy, capsys, monkeypatch):
    out, cache = run_copy

    def full(obj, f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(train.torch, "save", full)
    assert train.main(train_argv(out, cache, "--steps", 8, "--save-every", 2, "--resume")) == 2
    target = out / "checkpoints" / "step-000008.pt"
    assert errors(capsys) == [f"error: {target}: no space left on the disk of {target.parent}; "
                              f"free some space or write elsewhere"]
    assert [c.name for c in train.checkpoints(out)] == \
        ["step-000002.pt", "step-000004.pt", "step-000006.pt"]
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_a_full_disk_while_caching_is_one_line_and_leaves_no_entry(tmp_path, capsys, monkeypatch):
    def full(self, raw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(data.Path, "write_bytes", full)
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert train.main(train_argv(out, cache, "--steps", 1)) == 2
    err = errors(capsys)
    assert len(err) == 1 and err[0].startswith(f"error: {cache / 'latents'}/")
    assert err[0].endswith(f": no space left on the disk of {cache / 'latents'}; free some space "
                           f"or write elsewhere")
    assert not list(cache.rglob("*.safetensors")) and not list(cache.rglob("*.tmp"))


def test_an_unwritable_out_fails_before_caching(tmp_path, capsys, monkeypatch):
    def read_only(*a, **kw):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(util.tempfile, "TemporaryFile", read_only)
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert train.main(train_argv(out, cache, "--steps", 1)) == 2
    assert errors(capsys) == [f"error: --out {out}: read-only file system; write to a writable "
                              f"folder"]
    assert not cache.exists()                           # nothing was cached or loaded


def test_an_out_that_is_a_file_fails_before_caching(tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    out.write_text("not a folder")
    assert train.main(train_argv(out, cache, "--steps", 1)) == 2
    assert errors(capsys) == [f"error: --out {out}: is a file, not a folder; name a folder"]
    assert not cache.exists() and out.read_text() == "not a folder"


def test_too_little_space_for_a_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(util.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 1))
    out = tmp_path / "out"
    assert train.main(train_argv(out, tmp_path / "cache", "--steps", 1)) == 2
    err = errors(capsys)
    assert len(err) == 1 and err[0].startswith(f"error: --out {out}: 0.00 GiB free but a "
                                               f"checkpoint needs about ")


# --------------------------------------------------------------------------------------------------
# Flags and config values, checked before anything loads

@pytest.mark.parametrize("extra, message", [
    (("--lr", "nan"), "--lr nan: must be a finite number > 0"),
    (("--lr", "-1"), "--lr -1.0: must be a finite number > 0"),
    (("--lr", "inf"), "--lr inf: must be a finite number > 0"),
    (("--lr", "1e300"), "--lr 1e+300: must be at most 1 (1e-4 is the default)"),
    (("--alpha", "0"), "--alpha 0.0: must be a finite number > 0"),
    (("--alpha", "nan"), "--alpha nan: must be a finite number > 0"),
    (("--weight-decay", "-0.1"), "--weight-decay -0.1: must be a finite number >= 0"),
    (("--guidance", "nan"), "--guidance nan: must be a finite number"),
    (("--device", "foo"), "--device foo: pass cpu, cuda or cuda:N"),
    (("--save-every", "-1"), "--save-every must be at least 0"),
    (("--sample-every", "-1"), "--sample-every must be at least 0"),
])
def test_bad_numbers_and_devices_exit_2(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        train.parse_args(train_argv(tmp_path / "out", tmp_path / "cache", *extra))
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {message}")


@pytest.mark.parametrize("line, message", [
    ('buckets = "no"', "buckets = 'no' must be true or false"),
    ("data = 3", "data = 3 must be a string"),
    ("batch-size = 2.5", "batch-size = 2.5 must be an integer"),
    ('model = "big"', "model = 'big' must be one of dev, tiny"),
])
def test_config_values_are_checked_like_flags(tmp_path, capsys, line, message):
    cfg = tmp_path / "run.toml"
    keys = {"data": '"x"', "model": '"tiny"', **dict([line.split(" = ")])}
    cfg.write_text("".join(f"{k} = {v}\n" for k, v in keys.items()))
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--config", str(cfg)])
    assert e.value.code == 2
    assert f"error: --config {cfg}: {message}" in capsys.readouterr().err.splitlines()[-1]


def test_a_batch_larger_than_the_dataset_is_refused(tmp_path, capsys):
    argv = train_argv(tmp_path / "out", tmp_path / "cache", "--steps", 1, "--batch-size", 9)
    assert train.main(argv) == 2
    assert errors(capsys) == ["error: --batch-size 9 is larger than the dataset: 8 usable "
                              "image(s) x 1 repeat(s) = 8; pass --batch-size 8 or less (or more "
                              "--repeats)"]


# --------------------------------------------------------------------------------------------------
# Files: text that is not UTF-8, images PIL refuses

def test_text_that_is_not_utf8_names_the_file(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (32, 32), "red").save(folder / "a.png")
    (folder / "a.txt").write_bytes(b"\xffa red square")
    base = train_argv(tmp_path / "out", tmp_path / "cache", "--steps", 1, data_dir=folder)
    assert train.main(base) == 2
    assert errors(capsys) == [f"error: {folder / 'a.txt'}: not UTF-8 text (byte 0xff at offset "
                              f"0); save it as UTF-8"]
    (folder / "a.txt").unlink()
    (folder / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "\xe9t\xe9"}\n')
    assert train.main(base) == 2
    assert errors(capsys) == [f"error: {folder / 'metadata.jsonl'}: not UTF-8 text (byte 0xe9 at "
                              f"offset 32); save it as UTF-8"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"caf\xe9\n")
    assert sample.main(sample_argv(tmp_path / "x.png", "--prompts", prompts)) == 2
    assert errors(capsys) == [f"error: {prompts}: not UTF-8 text (byte 0xe9 at offset 3); save it "
                              f"as UTF-8"]
    with pytest.raises(util.LoadError, match="prompts.txt: not UTF-8"):
        train.read_prompts(prompts)
    cfg = tmp_path / "run.toml"
    cfg.write_bytes(b'data = "\xff"\n')
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(cfg)])
    assert f"error: --config {cfg}: not UTF-8 text" in capsys.readouterr().err


def test_an_image_pil_refuses_is_skipped_with_the_warning(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (30, 30), "red").save(folder / "small.png")
    Image.new("RGB", (64, 64), "blue").save(folder / "huge.png")     # over twice the limit
    for stem in ("small", "huge"):
        (folder / f"{stem}.txt").write_text(f"a {stem} square")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    source = models.ModelSource("tiny", None, torch.device("cpu"))
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\) .*huge\.png "
                                         r"\(DecompressionBombError"):
        items = data.cache_latents(folder, cache_dir=tmp_path / "cache", ae_id=source.ae_id,
                                   load_ae=source.load_ae, resolution=32)
    assert [it.path.name for it in items] == ["small.png"]


# --------------------------------------------------------------------------------------------------
# sample.py: the output path, numbers, a device that is not there

@pytest.mark.parametrize("extra, message", [
    (("--width", "0"), "--width 0: must be at least 16"),
    (("--steps", "-3"), "--steps -3: must be at least 1"),
    (("--guidance", "nan"), "--guidance nan: must be a finite number"),
    (("--cfg", "inf"), "--cfg inf: must be a finite number"),
    (("--lora-scale", "nan", "--lora", "L"), "--lora-scale nan: must be a finite number"),
])
def test_sample_bad_numbers_exit_2_before_loading(tmp_path, capsys, extra, message):
    lora_file = tmp_path / "L"
    lora_file.write_bytes(b"")
    extra = [str(lora_file) if a == "L" else a for a in extra]
    assert sample.main(sample_argv(tmp_path / "x.png", *extra)) == 2
    assert errors(capsys) == [f"error: {message}"]


def test_sample_cuda_without_a_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        sample.main(sample_argv(tmp_path / "x.png", "--device", "cuda"))
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: --device cuda: no CUDA GPU is visible to torch; use --device cpu")


def test_sample_checks_its_output_path_first(tmp_path, capsys, monkeypatch):
    def never(*a, **kw):
        raise AssertionError("sampled although the output path is bad")

    monkeypatch.setattr(sample, "generate", never)
    missing = tmp_path / "nope" / "x.png"
    assert sample.main(sample_argv(missing)) == 2
    assert errors(capsys) == [f"error: --out {missing}: the folder {missing.parent} does not "
                              f"exist; create it or name another"]
    assert sample.main(sample_argv(tmp_path)) == 2
    assert errors(capsys) == [f"error: --out {tmp_path}: is a folder; name a .png file"]
    monkeypatch.setattr(util.tempfile, "TemporaryFile",
                        lambda **kw: (_ for _ in ()).throw(OSError(errno.EACCES, "denied")))
    assert sample.main(sample_argv(tmp_path / "x.png")) == 2
    assert errors(capsys) == [f"error: --out {tmp_path}: permission denied; fix the permissions "
                              f"or write elsewhere"]


def test_sample_keeps_an_image_it_cannot_save(tmp_path, capsys, monkeypatch):
    out, real = tmp_path / "x.png", sample.save_png

    def disk_full_at_out(img, path, settings):
        if Path(path) == out:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(img, path, settings)

    monkeypatch.setattr(sample, "save_png", disk_full_at_out)
    assert sample.main(sample_argv(out)) == 2
    err = errors(capsys)
    prefix = f"error: {out}: no space left on the disk of {tmp_path}; free some space or write " \
             f"elsewhere; the image is saved as "
    assert len(err) == 1 and err[0].startswith(prefix)
    kept = Path(err[0][len(prefix):])
    try:
        assert sample.read_png_settings(kept)["seed"] == 1
        assert Image.open(kept).size == (32, 32)
    finally:
        kept.unlink()


# --------------------------------------------------------------------------------------------------
# The guard, LoRA files, preview labels

def test_guard_translates_known_failures_and_keeps_bugs():
    said = []

    def fail(error):
        def body():
            raise error
        return util.guard(body, say=said.append)

    assert fail(torch.OutOfMemoryError("CUDA out of memory")) == 2
    assert said[-1].startswith("out of GPU memory; lower --batch-size")
    assert fail(OSError(errno.EACCES, "Permission denied", "/x/y")) == 2
    assert said[-1] == "/x/y: permission denied; fix the permissions or write elsewhere"
    with pytest.raises(RuntimeError, match="a bug"):
        fail(RuntimeError("a bug"))
    with pytest.raises(OSError):
        fail(OSError(errno.EIO, "I/O error"))           # not one a user can fix: a traceback


def test_lora_files_are_deterministic_and_0644(trained, tmp_path):
    """The same adapters and metadata, given in any order, give the same bytes, mode 0644 (less
    the umask, as every other output)."""
    source = load_file(trained[0] / "lora.safetensors")
    dit = models.load_models(tiny=True, device="cpu", dtype=torch.float32).dit
    lora.load(dit, trained[0] / "lora.safetensors")
    meta = {"z": "1", "base_model": "tiny", "dataset": "abc", "steps": 6, "a": "2"}
    lora.save(dit, tmp_path / "a.safetensors", metadata=meta)
    lora.save(dit, tmp_path / "b.safetensors", metadata=dict(reversed(meta.items())))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    loaded = load_file(tmp_path / "a.safetensors")
    assert loaded.keys() == source.keys() and all(torch.equal(loaded[k], source[k]) for k in source)


def test_preview_labels_wrap_at_word_boundaries(monkeypatch):
    shown = []
    real = ImageDraw.ImageDraw.multiline_text

    def capture(self, xy, text, *a, **kw):
        shown.append(text)
        return real(self, xy, text, *a, **kw)

    monkeypatch.setattr(ImageDraw.ImageDraw, "multiline_text", capture)
    prompt = "a watercolour painting of a lighthouse"
    train.preview_grid([Image.new("RGB", (128, 128))], [prompt], step=3)
    lines = shown[0].splitlines()
    assert len(lines) > 1 and " ".join(lines) == prompt
    assert all(len(line) <= 128 // 6 for line in lines)
