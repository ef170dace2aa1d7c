"""train.py on the tiny model (CPU): the report's overfitting check, exact resume, crash-safe
checkpoints, the outputs a person watches, and one-line errors. The tiny stack is the one
`sample.py --model tiny` builds."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data
import flux2
import lora
import models
import sample
import text_encoder
import train
import vae
from flux2 import image_ids, pack, text_ids, unpack

TOY = Path(__file__).resolve().parents[1] / "examples" / "toy"


def args_for(tmp_path, *extra, out="out", data_dir=None):
    """Tiny-model flags with a private cache and no previews unless asked."""
    return train.parse_args(["--data", str(data_dir or TOY), "--model", "tiny",
                             "--out", str(tmp_path / out), "--cache-dir", str(tmp_path / "cache"),
                             "--resolution", "32", "--sample-every", "0", "--save-every", "0",
                             *extra])


def one_image(tmp_path, name="red_circle") -> Path:
    folder = tmp_path / "one"
    folder.mkdir(exist_ok=True)
    for ext in (".png", ".txt"):
        shutil.copy(TOY / f"{name}{ext}", folder)
    return folder


def log_losses(out: Path) -> list[float]:
    return [r["loss"] for r in train.read_log(out)]


def adapters(out: Path) -> dict:
    return load_file(out / "lora.safetensors")


# --------------------------------------------------------------------------------------------------
# The report's overfitting check

def test_overfit_one_image(tmp_path):
    """One image + caption, rank 16, lr 1e-3 (the tiny model's equivalent of the report's 1e-4),
    150 steps: the loss falls and samples from the caption move towards the training image."""
    folder, res, steps = one_image(tmp_path), 64, 150
    caption = (folder / "red_circle.txt").read_text().strip()
    result = train.train(args_for(tmp_path, "--resolution", str(res), "--steps", str(steps),
                                  "--lr", "1e-3", "--rank", "16", data_dir=folder))
    losses = result["losses"]
    assert len(losses) == steps and all(math.isfinite(v) for v in losses)

    m = models.load_models(tiny=True, device="cpu", dtype=torch.float32)
    txt = models.encode_text(m, [caption])                                      # [1, 512, 192]
    image = data.load_image(folder / "red_circle.png")
    pixels = vae.to_pixels(data.center_crop_resize(image, res, res))
    with torch.no_grad():
        x0 = m.ae.encode(pixels[None])                                          # [1, 128, 4, 4]
        target = m.ae.decode(x0).clamp(-1, 1)   # the image as the tiny random autoencoder shows it
    g = torch.Generator().manual_seed(1234)
    t, eps = torch.rand(32, generator=g), torch.randn(32, *x0.shape[1:], generator=g)
    h = res // 16

    @torch.no_grad()
    def measure():
        val = train.flow_matching_loss(m.dit, x0.expand(32, -1, -1, -1), txt.expand(32, -1, -1),
                                       t, eps, 4.0).item()
        lat, pix = [], []
        for seed in range(3):
            z = sample.denoise(m.dit, pack(sample.noise(seed, h, h)), image_ids(h, h)[None], txt,
                               text_ids(txt.shape[1])[None], sample.schedule(28, h * h), 4.0)
            z = unpack(z, h, h)
            lat.append(((z - x0) ** 2).mean().item())
            pix.append(((m.ae.decode(z).clamp(-1, 1) - target) ** 2).mean().item())
        return val, np.mean(lat), np.mean(pix)

    before = measure()
    lora.load(m.dit, result["out"] / "lora.safetensors")
    after = measure()
    first, last = np.mean(losses[:25]), np.mean(losses[-25:])
    print(f"\noverfit: training loss {first:.4f} -> {last:.4f} (x{first / last:.2f}); "
          f"held-out-noise loss {before[0]:.4f} -> {after[0]:.4f} (x{before[0] / after[0]:.2f}); "
          f"sample latent MSE {before[1]:.4f} -> {after[1]:.4f}; decoded sample MSE vs decoded "
          f"training latent {before[2]:.4f} -> {after[2]:.4f}")
    assert first / last > 1.15
    assert before[0] / after[0] > 1.15
    assert after[1] < 0.85 * before[1]
    assert after[2] < before[2]


# --------------------------------------------------------------------------------------------------
# Resume, interruption, crash safety

RUN = ("--steps", "10", "--grad-accum", "2", "--repeats", "2", "--buckets", "--lr", "1e-3",
       "--rank", "4", "--seed", "3", "--save-every", "5")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 10-step run the resumed ones must reproduce."""
    return train.train(args_for(tmp_path_factory.mktemp("straight"), *RUN))


def test_resume_gives_the_uninterrupted_run(tmp_path, straight):
    half = list(RUN)
    half[1] = "5"
    train.train(args_for(tmp_path, *half, out="resumed"))
    assert [c.name for c in train.checkpoints(tmp_path / "resumed")] == ["step-000005.pt"]
    # as the release before edit LoRAs wrote it: without their flags (they had their defaults)
    path = train.checkpoints(tmp_path / "resumed")[0]
    saved = torch.load(path, weights_only=True)
    for key in ("control_dir", "control_resolution", "caption_dropout"):
        del saved["args"][key]
    torch.save(saved, path)
    resumed = train.train(args_for(tmp_path, *RUN, "--resume", out="resumed"))
    a, b = adapters(straight["out"]), adapters(resumed["out"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)            # it trained
    assert log_losses(straight["out"]) == log_losses(resumed["out"])
    assert len(log_losses(resumed["out"])) == 10
    ckpt = train.load_checkpoint(train.checkpoints(tmp_path / "resumed")[-1])
    assert set(ckpt) >= {"step", "lora", "optimizer", "rng", "loader"}
    assert set(ckpt["rng"]) == {"train", "torch", "python", "numpy", "cuda"}


def test_ctrl_c_saves_and_resume_is_exact(tmp_path, monkeypatch, capsys, straight):
    calls, real = [0], train.flow_matching_loss

    def interrupted(*a, **kw):
        calls[0] += 1
        if calls[0] == 15:          # mid-step 8 (2 micro-batches per step): its work is dropped
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(train, "flow_matching_loss", interrupted)
    argv = ["--data", TOY, "--model", "tiny", "--out", tmp_path / "cut", "--cache-dir",
            tmp_path / "cache", "--resolution", "32", "--sample-every", "0", *RUN]
    assert train.main([str(a) for a in argv]) == 130
    assert "state after step 7 is saved" in capsys.readouterr().err
    assert [c.name for c in train.checkpoints(tmp_path / "cut")] == ["step-000005.pt",
                                                                     "step-000007.pt"]
    monkeypatch.setattr(train, "flow_matching_loss", real)
    resumed = train.train(args_for(tmp_path, *RUN, "--resume", out="cut"))
    a, b = adapters(straight["out"]), adapters(resumed["out"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert log_losses(straight["out"]) == log_losses(resumed["out"])


@pytest.mark.parametrize("placement", [("--offload", "stream", "--gpu-memory-limit", "1"), ()])
def test_compile_fuses_the_glue_and_trains_the_same(tmp_path, straight, placement):
    """--compile, with streamed weights or every block resident: the blocks stay eager and
    flux2.fuse compiles the glue; in fp32 the run follows the eager one to rounding."""
    fused = train.train(args_for(tmp_path, *RUN, "--compile", *placement))
    try:
        assert flux2._FUSED                                                  # the glue is compiled
        assert log_losses(fused["out"]) == pytest.approx(log_losses(straight["out"]), rel=1e-4)
    finally:
        flux2.fuse(False)


def test_killed_mid_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    args = args_for(tmp_path, "--steps", "4", "--save-every", "2")
    real_save = torch.save

    def killed(obj, f):                          # the temp file is written, then the process dies
        real_save(obj, f)
        if obj["step"] == 4:
            raise SystemExit("killed")

    monkeypatch.setattr(train.torch, "save", killed)
    with pytest.raises(SystemExit):
        train.train(args)
    monkeypatch.undo()
    out = tmp_path / "out"
    # what SIGKILL would leave behind: a truncated temp file next to the good checkpoint
    (out / "checkpoints" / "step-000004.pt.999.tmp").write_bytes(b"PK\x03\x04 truncated")
    assert [c.name for c in train.checkpoints(out)] == ["step-000002.pt"]
    assert train.load_checkpoint(train.checkpoints(out)[-1])["step"] == 2
    result = train.train(args_for(tmp_path, "--steps", "4", "--save-every", "2", "--resume"))
    assert result["steps"] == 4 and not list((out / "checkpoints").glob("*.tmp"))
    assert [c.name for c in train.checkpoints(out)] == ["step-000002.pt", "step-000004.pt"]


def test_nan_loss_stops_with_state_saved(tmp_path, monkeypatch, capsys):
    calls, real = [0], train.flow_matching_loss

    def poisoned(*a, **kw):
        calls[0] += 1
        loss = real(*a, **kw)
        return loss * float("nan") if calls[0] == 3 else loss

    monkeypatch.setattr(train, "flow_matching_loss", poisoned)
    argv = ["--data", TOY, "--model", "tiny", "--out", tmp_path / "out", "--cache-dir",
            tmp_path / "cache", "--resolution", "32", "--sample-every", "0", "--steps", "5"]
    code = train.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 1 and "step 3: the loss is nan; the state after step 2 is saved" in err
    assert train.load_checkpoint(train.checkpoints(tmp_path / "out")[-1])["step"] == 2


def test_keeps_the_last_few_checkpoints(tmp_path):
    train.train(args_for(tmp_path, "--steps", "5", "--save-every", "1"))
    names = [c.name for c in train.checkpoints(tmp_path / "out")]
    assert names == [f"step-{s:06d}.pt" for s in (3, 4, 5)] and len(names) == train.KEEP_CHECKPOINTS


# --------------------------------------------------------------------------------------------------
# What a person watches

def test_outputs_log_curve_and_previews_equal_the_sampler(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a white background\n\n"
                       "a blue square on a yellow background\n")
    result = train.train(args_for(tmp_path, "--steps", "3", "--sample-every", "2",
                                  "--sample-steps", "3", "--sample-prompts", str(prompts),
                                  "--save-every", "2", "--lr", "1e-2"))
    out = result["out"]
    records = train.read_log(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"loss", "lr", "grad_norm", "s_per_step", "samples_per_s"} <= set(records[0])
    assert Image.open(out / "loss.png").size == (800, 400)
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "step-000000.png", "step-000002.png", "step-000003.png"]
    grid = Image.open(out / "samples" / "step-000003.png")
    assert grid.size[0] == 2 * 32
    assert json.loads((out / "config.json").read_text())["steps"] == 3

    # the final preview is what `sample.py --model tiny --lora OUT/lora.safetensors` draws for
    # that prompt and seed
    png = tmp_path / "s.png"
    assert sample.main(["--model", "tiny", "--device", "cpu",
                        "--lora", str(out / "lora.safetensors"),
                        "--prompt", "a blue square on a yellow background", "--seed", "1",
                        "--steps", "3", "--width", "32", "--height", "32", "--out", str(png)]) == 0
    tile = np.asarray(grid.convert("RGB"))[20:52, 32:64]
    assert np.array_equal(tile, np.asarray(Image.open(png).convert("RGB")))


def test_loss_curve_and_grid_drawing(tmp_path):
    records = [{"step": s, "loss": 1 / s} for s in range(1, 51)]
    train.draw_loss_curve(records, tmp_path / "loss.png")
    img = np.asarray(Image.open(tmp_path / "loss.png").convert("RGB"))
    blue = (img[..., 2] > 150) & (img[..., 0] < 80)
    ys, xs = np.nonzero(blue[60:350])
    assert xs.size and ys[xs.argmin()] < ys[xs.argmax()]   # the smoothed curve falls left to right
    tiles = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    grid = train.preview_grid(tiles, ["first prompt", "second"], 7)
    assert grid.size == (64, 32 + 64) and grid.getpixel((40, 30)) == (0, 0, 255)


# --------------------------------------------------------------------------------------------------
# Timesteps, config, errors

def test_timestep_sampling():
    g = torch.Generator().manual_seed(0)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    mu = flux2.empirical_mu(4096, 50)
    t = train.sample_timesteps(20000, "shift", mu, g)
    assert torch.allclose(t, math.exp(mu) / (math.exp(mu) + (1 / u - 1)), rtol=1e-5, atol=1e-7)
    # shifted uniform u has the sampler's distribution: the fraction below each schedule point
    # is its grid rank
    grid = sample.schedule(50, 4096)
    for k in (10, 25, 40):
        assert abs((t < grid[k]).float().mean().item() - (1 - k / 50)) < 0.015
    assert flux2.time_shift(torch.tensor([0.0, 1.0]), mu).tolist() == [0.0, 1.0]
    for how in ("uniform", "logit-normal"):
        s = train.sample_timesteps(20000, how, mu, g)
        assert 0 <= s.min() and s.max() <= 1
    assert abs(train.sample_timesteps(20000, "uniform", mu, g).mean().item() - 0.5) < 0.01
    logit = train.sample_timesteps(20000, "logit-normal", 0.0, g)
    assert abs(torch.logit(logit).std().item() - 1) < 0.03


def test_flow_matching_target():
    """With a model that returns eps - x0 exactly, the loss is 0; x_t is (1 - t) x0 + t eps."""
    x0, eps, t = torch.randn(2, 128, 2, 3), torch.randn(2, 128, 2, 3), torch.tensor([0.25, 0.9])

    class Oracle(torch.nn.Module):
        def forward(self, img, img_ids, txt, txt_ids, timesteps, guidance):
            assert img_ids.shape == (1, 6, 4) and txt_ids.shape == (1, 5, 4)
            assert guidance.tolist() == [4.0, 4.0]
            tb = timesteps.view(-1, 1, 1)
            x0_tok = pack(x0)
            return (img - x0_tok) / tb                                  # (x_t - x0) / t = eps - x0
    assert train.flow_matching_loss(Oracle(), x0, torch.zeros(2, 5, 8), t, eps, 4.0).item() < 1e-10


def test_config_file_and_flag_precedence(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('data = "some/dir"\nmodel = "tiny"\nrank = 4\nbatch-size = 3\nlr = 5e-4\n'
                   'buckets = true\n')
    args = train.parse_args(["--config", str(cfg), "--rank", "8"])
    assert (args.data, args.rank, args.batch_size, args.lr, args.buckets, args.resolution) == \
        ("some/dir", 8, 3, 5e-4, True, 128)
    cfg.write_text('data = "x"\nbatch_sise = 3\n')
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--config", str(cfg)])
    assert e.value.code == 2


def test_user_mistakes_exit_2_with_one_line(tmp_path, capsys):
    empty, nocap = tmp_path / "empty", tmp_path / "nocap"
    empty.mkdir()
    nocap.mkdir()
    Image.new("RGB", (32, 32)).save(nocap / "a.png")
    base = ["--model", "tiny", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "out"), "--resolution", "32", "--sample-every", "0",
            "--steps", "1"]
    cases = [(["--data", str(empty)], "empty: no images (jpg, png, webp) in this folder"),
             (["--data", str(nocap)], "a.png: no caption; write a.txt next to it"),
             (["--data", str(TOY), "--resume"], "no checkpoint to resume from"),
             (["--data", str(TOY), "--lora-targets", "nothing_here"], "match no nn.Linear")]
    for argv, message in cases:
        assert train.main(base + argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        err = [line for line in lines if line.startswith("error")]
        assert len(err) == 1 and message in err[0], err
    # a bad --resolution, no --data, no --model-dir
    for argv in (base + ["--data", str(TOY), "--resolution", "100"], base, ["--data", str(TOY)]):
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        assert e.value.code == 2
    # an --out that holds another run's checkpoints is not silently overwritten; a changed rank
    # is not resumed
    assert train.main(base + ["--data", str(TOY)]) == 0
    assert train.main(base + ["--data", str(TOY)]) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert train.main(base + ["--data", str(TOY), "--steps", "2", "--resume", "--rank", "8"]) == 2
    assert "--rank is 8 but the checkpoint was trained with 16" in capsys.readouterr().err
    # a hyper-parameter may change on resume (a lower --lr after a NaN), with a warning, and
    # takes effect
    assert train.main(base + ["--data", str(TOY), "--steps", "2", "--resume", "--lr", "5e-5"]) == 0
    assert "resuming with --lr 5e-05 (was 0.0001)" in capsys.readouterr().err
    assert [r["lr"] for r in train.read_log(tmp_path / "out")] == [1e-4, 5e-5]


def test_dev_random_builds_full_size_shapes_with_random_values(tmp_path, monkeypatch):
    """--model dev-random (GPU speed/memory runs) takes the dev/flux2/Mistral presets, fills
    values after the planner placed the meta-built DiT, and trains; here the presets are swapped
    for the tiny ones so it runs on a CPU."""
    import flux2
    monkeypatch.setitem(flux2.PRESETS, "dev", flux2.PRESETS["tiny"])
    monkeypatch.setitem(vae.AE_PRESETS, "flux2", vae.AE_PRESETS["tiny"])
    monkeypatch.setitem(text_encoder.TEXT_PRESETS, "mistral-small-3.2",
                        text_encoder.TEXT_PRESETS["tiny"])
    args = train.parse_args(["--data", str(TOY), "--model", "dev-random",
                             "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
                             "--resolution", "32", "--steps", "2", "--sample-every", "0",
                             "--save-every", "0", "--device", "cpu"])
    assert train.train(args)["steps"] == 2
    losses = log_losses(tmp_path / "out")
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    saved = load_file(tmp_path / "out" / "lora.safetensors")
    a = saved["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"]
    assert a.std() > 0 and torch.isfinite(a).all()   # filled, not uninitialised meta storage
