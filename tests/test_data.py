"""data.py: image modes, crops, buckets, captions, bad input, the resumable latent/text cache."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import data
import vae
from data import DataError
from util import LoadError
from vae import AE_PRESETS, AutoEncoder

RES = 32  # tiny crops keep the tiny autoencoder fast


def write(folder, name, img, caption="a caption"):
    img.save(folder / name)
    if caption is not None:
        (folder / name).with_suffix(".txt").write_text(caption)


def gradient(w, h) -> Image.Image:
    """An RGB image whose red channel is the column index and green the row index (mod 256)."""
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    return Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8), "RGB")


class Counter:
    """Counts model loads and encode calls; after `fail_after` calls it raises KeyboardInterrupt
    (a stopped process)."""

    def __init__(self, fail_after=None):
        self.fail_after, self.loads, self.calls = fail_after, 0, 0

    def wrap(self, fn):
        def call(*a):
            if self.fail_after is not None and self.calls >= self.fail_after:
                raise KeyboardInterrupt
            self.calls += 1
            return fn(*a)
        return call

    def text_loader(self):
        """A load_encoder for cache_texts."""
        def load():
            self.loads += 1
            return self.wrap(fake_text)
        return load


def ae_factory(fail_after=None):
    """(load_ae for cache_latents: the tiny autoencoder with a counted encode, its Counter)."""
    counter, ae = Counter(fail_after), AutoEncoder(AE_PRESETS["tiny"]).eval()

    def load():
        counter.loads += 1
        ae.encode = counter.wrap(AutoEncoder.encode.__get__(ae))
        return ae
    return load, counter


def fake_text(prompts):
    """Deterministic 'text features' [N, 512, 8] that differ per prompt."""
    return torch.stack([torch.full((data.TEXT_LENGTH, 8), float(sum(map(ord, p))))
                        for p in prompts])


# --------------------------------------------------------------------------------------------------

def test_every_mode_becomes_rgb(tmp_path):
    grey = Image.fromarray(np.full((8, 8), 77, np.uint8), "L")
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))   # fully transparent -> white background
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    deep = Image.fromarray(np.full((8, 8), 257 * 128, np.uint16))   # 16-bit grey: PIL clips it
    cases = {"l.png": (grey, (77, 77, 77)), "rgba.png": (rgba, (255, 255, 255)),
             "p.png": (pal, (200, 100, 50)), "g16.png": (deep, (128, 128, 128))}
    for name, (img, expect) in cases.items():
        img.save(tmp_path / name)
        out = data.load_image(tmp_path / name)
        assert out.mode == "RGB" and out.getpixel((3, 3)) == expect, name
    assert data.load_image(tmp_path / "rgba.png").getpixel((0, 0)) == (10, 20, 30)
    floats = Image.fromarray(np.full((8, 8), 0.5, np.float32))      # mode F, values in [0, 1]
    assert floats.mode == "F" and data.to_rgb(floats).getpixel((0, 0)) == (128, 128, 128)
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")    # really a 16-bit file


def test_center_crop_resize_matches_explicit_crop():
    img = gradient(200, 100)
    same = data.center_crop_resize(img, 100, 100)       # no scaling: exactly the middle 100 columns
    assert np.array_equal(np.asarray(same), np.asarray(img.crop((50, 0, 150, 100))))
    small = data.center_crop_resize(img, 48, 48)
    ref = img.crop((50, 0, 150, 100)).resize((48, 48), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(small), np.asarray(ref))
    wide = data.center_crop_resize(gradient(100, 200), 64, 32)  # portrait to landscape: middle rows
    ref = gradient(100, 200).crop((0, 75, 100, 125)).resize((64, 32), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(wide), np.asarray(ref))
    t = vae.to_pixels(same)
    assert t.shape == (3, 100, 100) and t.min() >= -1 and t.max() <= 1
    assert torch.allclose(t[0, 0, :3], torch.tensor([50, 51, 52]) / 127.5 - 1)


@pytest.mark.parametrize("res", [256, 512, 1024])
def test_buckets_are_multiples_of_16_near_res_squared(res):
    sizes = data.bucket_sizes(res)
    assert (res, res) in sizes and len(sizes) > 5
    for w, h in sizes:
        assert w % 16 == 0 and h % 16 == 0
        assert 1 - 16 * math.sqrt(2) / res < w * h / res ** 2 <= 1    # under a 16-px strip short
        assert max(w / h, h / w) <= 2
    assert data.pick_size(1000, 1000, res, True) == (res, res)
    w, h = data.pick_size(2000, 1000, res, True)
    assert abs(w / h - 2) < 0.15
    w, h = data.pick_size(600, 800, res, True)
    assert h > w and abs(w / h - 0.75) < 0.06
    assert data.pick_size(2000, 1000, res, False) == (res, res)


def test_captions_from_txt_metadata_and_default(tmp_path):
    write(tmp_path, "b.png", gradient(8, 8), "from txt")
    write(tmp_path, "a.jpg", gradient(8, 8), None)
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "c.webp", gradient(8, 8), None)
    meta = [json.dumps({"file_name": "a.jpg", "text": "from jsonl"}), "",   # blank lines: skipped
            json.dumps({"file_name": "sub/c.webp", "text": "nested"})]
    (tmp_path / "metadata.jsonl").write_text("\n".join(meta) + "\n")
    found = [(p.relative_to(tmp_path).as_posix(), c) for p, c in data.find_images(tmp_path)]
    assert found == [("a.jpg", "from jsonl"), ("b.png", "from txt"), ("sub/c.webp", "nested")]
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.jpg"}\n')
    with pytest.raises(DataError, match=r"metadata.jsonl:1: .*\"text\""):
        data.find_images(tmp_path)
    (tmp_path / "metadata.jsonl").unlink()
    with pytest.raises(DataError, match=r"a.jpg: no caption; write a.txt .* --default-caption"):
        data.find_images(tmp_path)
    assert data.find_images(tmp_path, default_caption="x")[0][1] == "x"


def test_bad_input_messages(tmp_path):
    load, _ = ae_factory()
    kw = dict(cache_dir=tmp_path / "cache", ae_id="t", load_ae=load, resolution=RES)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"empty: no images \(jpg, png, webp\) in this folder"):
        data.cache_latents(empty, **kw)
    assert issubclass(DataError, LoadError) and issubclass(DataError, ValueError)
    with pytest.raises(DataError, match="no such folder"):
        data.cache_latents(tmp_path / "missing", **kw)
    with pytest.raises(DataError, match="multiple of 16"):
        data.cache_latents(empty, **{**kw, "resolution": 100})

    bad = tmp_path / "bad"
    bad.mkdir()
    write(bad, "good.png", gradient(40, 40))
    (bad / "garbage.png").write_bytes(b"\x89PNG not really an image")
    (bad / "garbage.txt").write_text("c")
    gradient(64, 64).save(bad / "cut.jpg", quality=95)
    (bad / "cut.jpg").write_bytes((bad / "cut.jpg").read_bytes()[:600])  # header intact, pixels cut
    (bad / "cut.txt").write_text("c")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\).*cut.jpg.*garbage.png"):
        items = data.cache_latents(bad, **kw)
    assert [it.path.name for it in items] == ["good.png"]
    (bad / "good.png").unlink()
    with pytest.warns(UserWarning), \
            pytest.raises(DataError, match=r"bad: no usable image \(2 unreadable\)"):
        data.cache_latents(bad, **kw)


def test_latent_cache_is_reused_keyed_and_resumable(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        write(folder, f"{i}.png", gradient(40 + 8 * i, 40), f"caption {i}")
    cache = tmp_path / "cache"
    load, counter = ae_factory(fail_after=2)
    with pytest.raises(KeyboardInterrupt):                          # interrupted after two images
        data.cache_latents(folder, cache_dir=cache, ae_id="ae1", load_ae=load, resolution=RES)
    assert len(list((cache / "latents").glob("*.safetensors"))) == 2
    assert not list((cache / "latents").glob("*.tmp"))              # nothing half-written

    load, counter = ae_factory()
    items = data.cache_latents(folder, cache_dir=cache, ae_id="ae1", load_ae=load, resolution=RES)
    assert (counter.loads, counter.calls) == (1, 2)                 # only the two missing ones
    load, counter = ae_factory()
    again = data.cache_latents(folder, cache_dir=cache, ae_id="ae1", load_ae=load, resolution=RES)
    assert again == items and (counter.loads, counter.calls) == (0, 0)   # the AE is never loaded

    # the cached latent is the autoencoder's encoding of the centre crop
    ae = AutoEncoder(AE_PRESETS["tiny"]).eval()
    load_same = lambda: ae                                          # noqa: E731
    fresh = data.cache_latents(folder, cache_dir=tmp_path / "c2", ae_id="x", load_ae=load_same,
                               resolution=RES)
    z = data.load_file(data.latent_path(tmp_path / "c2", fresh[3]))["latent"]
    crop = data.center_crop_resize(data.load_image(folder / "3.png"), RES, RES)
    with torch.no_grad():
        ref = ae.encode(vae.to_pixels(crop)[None])
    assert z.shape == (128, RES // 16, RES // 16) and torch.equal(z, ref[0])

    # another model, resolution or file content is another key
    for kw in ({"ae_id": "ae2", "resolution": RES}, {"ae_id": "ae1", "resolution": 2 * RES}):
        load, counter = ae_factory()
        data.cache_latents(folder, cache_dir=cache, load_ae=load, **kw)
        assert counter.calls == 4
    write(folder, "0.png", gradient(41, 40), "caption 0")
    load, counter = ae_factory()
    data.cache_latents(folder, cache_dir=cache, ae_id="ae1", load_ae=load, resolution=RES)
    assert counter.calls == 1


def test_text_cache_is_reused_and_resumable(tmp_path):
    texts = [f"prompt {i}" for i in range(5)] + ["prompt 0"]        # duplicates are encoded once
    with pytest.raises(KeyboardInterrupt):
        data.cache_texts(texts, cache_dir=tmp_path, text_id="te",
                         load_encoder=Counter(1).text_loader(), batch_size=2)
    enc = Counter()
    data.cache_texts(texts, cache_dir=tmp_path, text_id="te", load_encoder=enc.text_loader(),
                     batch_size=2)
    assert (enc.loads, enc.calls) == (1, 2)                         # 3 of 5 left, in batches of 2
    enc = Counter()
    data.cache_texts(texts, cache_dir=tmp_path, text_id="te", load_encoder=enc.text_loader())
    assert enc.loads == 0
    for t in texts:
        assert torch.equal(data.load_text(tmp_path, t, "te"), fake_text([t])[0])
    data.cache_texts(texts, cache_dir=tmp_path, text_id="other", load_encoder=enc.text_loader())
    assert enc.loads == 1


def test_loader_order_is_seeded_bucketed_and_resumable(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (w, h) in enumerate([(64, 32)] * 3 + [(32, 64)] * 2 + [(40, 40)] * 2):
        write(folder, f"{i}.png", gradient(w, h), f"caption {i}")
    ae = AutoEncoder(AE_PRESETS["tiny"]).eval()
    items = data.cache_latents(folder, cache_dir=tmp_path, ae_id="a", load_ae=lambda: ae,
                               resolution=RES, buckets=True)
    assert {it.size for it in items} == {data.pick_size(64, 32, RES, True),
                                         data.pick_size(32, 64, RES, True), (RES, RES)}
    data.cache_texts([it.caption for it in items], cache_dir=tmp_path, text_id="t",
                     load_encoder=lambda: fake_text)

    def run(loader, n):
        return [tuple(b["captions"]) for b in (next(loader) for _ in range(n))]

    def make(seed):
        return data.Loader(items, cache_dir=tmp_path, text_id="t", batch_size=2, repeats=2,
                           seed=seed)

    a = make(0)
    first = run(a, 7)                                       # 14 samples = 7 batches = one epoch
    assert sorted(c for b in first for c in b) == sorted(2 * [it.caption for it in items])
    by_caption = {it.caption: it.size for it in items}
    assert all(len({by_caption[c] for c in b}) == 1 for b in first)  # one bucket per batch
    batch = next(iter(make(0)))
    assert batch["latents"].shape[0] == len(batch["captions"])
    assert batch["ctx"].shape[1:] == (data.TEXT_LENGTH, 8)
    assert run(make(0), 7) == first and run(make(1), 7) != first
    state = a.state_dict()
    rest = run(a, 5)
    b = make(0)
    b.load_state_dict(state)
    assert run(b, 5) == rest and rest != first[:5]
