"""Training data for FLUX.2 LoRA: image folders with captions, crops and aspect buckets, and an
on-disk cache of VAE latents and text features so the text encoder runs once per caption and never
shares the GPU with the DiT.

Follows docs/flux2_reference.md §5.4 (the latent the DiT trains on: VAE mean -> 2x2 patchify ->
BN-normalised, 128 channels at /16) and §6.1 / §8 (identical text preprocessing in training and
sampling). Images are centre-cropped and resized (the report's CenterCrop + resize); with buckets,
to the bucket of the closest aspect ratio instead of a square. Edit runs add reference images per
target (§7.3), prepared by prepare_ref exactly as sample.py prepares them.

    folder/ a.png + a.txt, b.jpg + b.txt, ...
    folder/ *.png + metadata.jsonl {"file_name", "text"}            (either layout)
    control/ a.png, a_1.png, ... (references of folder/a.*)  or  "control": [...] in metadata
    cache/latents/<hash>.safetensors  latent [128, h/16, w/16]
                                      hash of (image bytes, AE, size, crop method); references the
                                      same, with their prepared size
    cache/text/<hash>.safetensors     ctx [512, ctx_dim]
                                      hash of (caption, text encoder, length)

Under torchrun the ranks fill one shared cache: rank r encodes items r, r + N, r + 2N, ... of the
(identically ordered) list, all wait at a barrier, then each reads the whole cache. The Loader walks
the same global batches on every rank and hands each rank its contiguous share of every batch.
"""
import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageOps
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

import vae
from util import LoadError, atomic_write, ceil_div, free_cuda, read_text

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
CROP_METHOD = "center-crop+lanczos-v1"  # in the latent cache key: change it with the preprocessing
TEXT_LENGTH = 512                       # FLUX.2 [dev] pads every prompt to 512 tokens (ref. §6.1)
# what PIL raises for a file it will not decode: corrupt, unknown, truncated or over its pixel limit
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class DataError(LoadError):
    """A dataset the trainer cannot use; the message names the file and the fix."""


@dataclass(frozen=True)
class Reference:
    """One reference image of an edit item: its file, content hash, the area cap it is prepared
    with (prepare_ref) and the (width, height) that gives."""
    path: Path
    digest: str
    limit: int
    size: tuple[int, int]


@dataclass(frozen=True)
class Item:
    """One training image: its file, caption, content hash and the (width, height) it trains at;
    in an edit run also its reference images, in the order of their time ids 10, 20, ..."""
    path: Path
    caption: str
    digest: str
    size: tuple[int, int]
    refs: tuple[Reference, ...] = ()


# --------------------------------------------------------------------------------------------------
# Finding images and captions

def _metadata_rows(folder: Path) -> dict[str, dict]:
    """file_name -> its line of metadata.jsonl, each a JSON object with "file_name" and "text"
    naming an image that exists (empty when the file is absent)."""
    file = folder / "metadata.jsonl"
    if not file.is_file():
        return {}
    rows = {}
    for n, line in enumerate(read_text(file).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[str(row["file_name"])] = {**row, "text": str(row["text"])}
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{file}:{n}: expected a JSON object with \"file_name\" and \"text\"; "
                            f"fix that line")
    for name in rows:
        if not (folder / name).is_file():
            raise DataError(f"{file}: lists {name!r}, which is not in {folder}; remove the line or "
                            f"add the image")
    return rows


def find_images(folder, default_caption: str | None = None) -> list[tuple[Path, str]]:
    """(image path, caption) for every image in `folder`, sorted by name; captions come from
    metadata.jsonl, else a same-stem .txt, else `default_caption`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; pass --data a folder of images with .txt "
                        f"captions")
    meta = {name: row["text"] for name, row in _metadata_rows(folder).items()}
    images = {p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS}
    images = sorted(images | {folder / name for name in meta})  # metadata may name subfolders
    if not images:
        raise DataError(f"{folder}: no images (jpg, png, webp) in this folder; put the training "
                        f"images there")
    out = []
    for path in images:
        txt, name = path.with_suffix(".txt"), path.relative_to(folder).as_posix()
        if name in meta:
            caption = meta[name]
        elif txt.is_file():
            caption = read_text(txt).strip()
        elif default_caption is not None:
            caption = default_caption
        else:
            raise DataError(f"{path}: no caption; write {txt.name} next to it, list it in "
                            f"metadata.jsonl, or pass --default-caption")
        out.append((path, caption))
    return out


def _control_lists(folder: Path) -> dict[str, list[str]]:
    """file_name -> its "control" list (paths relative to `folder`) from metadata.jsonl, for the
    lines that have one."""
    file = folder / "metadata.jsonl"
    lists = {name: row["control"] for name, row in _metadata_rows(folder).items()
             if "control" in row}
    for name, refs in lists.items():
        if not (isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs)):
            raise DataError(f"{file}: \"control\" of {name!r} must be a list of image paths "
                            f"relative to {folder}; fix that line")
        for r in refs:
            if not (folder / r).is_file():
                raise DataError(f"{file}: {name!r} names the reference {r!r}, which is not in "
                                f"{folder}; fix the path or add the image")
    return lists


def _control_index(control_dir: Path) -> dict[str, list[Path]]:
    """'sub/stem' -> the image files of that name under control_dir (any image extension)."""
    index = {}
    for p in sorted(control_dir.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            index.setdefault(p.relative_to(control_dir).with_suffix("").as_posix(), []).append(p)
    return index


def _numbered(index: dict[str, list[Path]], stem: str) -> list[Path]:
    """The references named stem.*, stem_1.*, stem_2.*, ... in the control index, in order, up to
    the first missing number."""
    found = []
    for k in range(MAX_REFS + 1):
        files = index.get(stem if k == 0 else f"{stem}_{k}", [])
        if not files:
            break
        if len(files) > 1:
            raise DataError(f"{files[0].parent}: {', '.join(p.name for p in files)} are the same "
                            f"reference in two formats; keep one")
        found.append(files[0])
    return found


def find_references(folder, images: list[Path], control_dir=None) -> list[list[Path]]:
    """The reference images of each image of `folder`: its metadata.jsonl "control" list, else
    control_dir/sub/stem.*, then stem_1.*, stem_2.*, ... for folder/sub/stem.ext. Without
    control_dir and "control" lists: no references (text-to-image). Otherwise it is an edit run
    and every image needs one to MAX_REFS references; train an image without one in a separate
    text-to-image run."""
    folder = Path(folder)
    listed = _control_lists(folder)
    if control_dir is None and not listed:
        return [[] for _ in images]
    index = {}
    if control_dir is not None:
        if not Path(control_dir).is_dir():
            raise DataError(f"--control-dir {control_dir}: no such folder; pass the folder of "
                            f"reference images (stem.png, stem_1.png, ... per target)")
        index = _control_index(Path(control_dir))
    out = []
    for path in images:
        name = path.relative_to(folder).as_posix()
        refs = ([folder / r for r in listed[name]] if name in listed
                else _numbered(index, Path(name).with_suffix("").as_posix()))
        if not refs:
            where = f"{control_dir}/{Path(name).with_suffix('')}.png" if control_dir else \
                "a \"control\" list in metadata.jsonl"
            raise DataError(f"{path}: no reference image; add {where} (more as _1, _2, ...) or "
                            f"move this image to a text-to-image run")
        if len(refs) > MAX_REFS:
            raise DataError(f"{path}: {len(refs)} reference images; FLUX.2 takes at most "
                            f"{MAX_REFS}")
        out.append(refs)
    return out


# --------------------------------------------------------------------------------------------------
# Sizes: square crops or aspect-ratio buckets

def bucket_sizes(resolution: int, max_ratio: float = 2.0, step: int = 16) -> list[tuple[int, int]]:
    """(width, height) pairs with sides multiples of `step`, width*height <= resolution^2 and as
    close to it as the grid allows, aspect ratios up to `max_ratio`."""
    area = resolution * resolution
    sizes = []
    for w in range(step, int(resolution * math.sqrt(max_ratio)) + step, step):
        h = area // w // step * step    # round down: a bucket never costs more memory than res^2
        if h >= step and max(w / h, h / w) <= max_ratio:
            sizes.append((w, h))
    return sizes


def pick_size(width: int, height: int, resolution: int, buckets: bool) -> tuple[int, int]:
    """The training size of a width x height image: res x res, or the bucket of the closest
    aspect ratio."""
    if not buckets:
        return resolution, resolution
    aspect = math.log(width / height)
    return min(bucket_sizes(resolution), key=lambda s: abs(math.log(s[0] / s[1]) - aspect))


# --------------------------------------------------------------------------------------------------
# Pixels

def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB with EXIF rotation applied: 16-bit and float greys are rescaled
    (PIL would clip them), alpha is composited on white (transparent areas are usually meant as
    background)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode != "F":
            a = a / 257.0                        # integer greys hold 16-bit values: 65535 -> 255
        elif a.max() <= 1.0:
            a = a * 255.0                        # float greys in [0, 1]
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def load_image(path) -> Image.Image:
    """Decode an image file fully as RGB; raises OSError/ValueError for corrupt or truncated
    files."""
    with Image.open(path) as img:
        img.load()                      # the full decode: truncated files fail here, not later
        return to_rgb(img)


def center_crop_resize(img: Image.Image, width: int, height: int) -> Image.Image:
    """The largest centred box of aspect width:height, resized to width x height (Lanczos)."""
    w, h = img.size
    scale = min(w / width, h / height)
    cw, ch = width * scale, height * scale
    box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    return img.resize((width, height), Image.Resampling.LANCZOS, box=box)


# --------------------------------------------------------------------------------------------------
# Reference images for editing (reference §7.3): prepared the same way in training and sampling

REF_LIMIT_ONE = 2024 ** 2   # area cap of a lone reference (sic: the reference's number, not 2048)
REF_LIMIT_EACH = 1024 ** 2  # area cap of each of several references
MAX_REFS = 10               # the most references per image BFL announces for FLUX.2
REF_METHOD = "prepare_ref-v1"   # in the reference latent cache key: change it with prepare_ref


def _capped(width: int, height: int, limit: int) -> tuple[int, int]:
    """The size after capping the area at `limit`, sides truncated as the reference does."""
    if width * height <= limit:
        return width, height
    s = math.sqrt(limit / (width * height))
    return int(width * s), int(height * s)


def ref_size(width: int, height: int, limit: int) -> tuple[int, int]:
    """The (width, height) prepare_ref gives a width x height image: area capped at `limit`,
    then cropped to multiples of 16."""
    width, height = _capped(width, height, limit)
    return width // 16 * 16, height // 16 * 16


def check_ref_size(width: int, height: int, name: str) -> None:
    """Refuse a reference the reference refuses: a side under 64 px or an aspect ratio over 8."""
    if min(width, height) < 64 or max(width / height, height / width) > 8:
        raise LoadError(f"{name}: {width}x{height} is too small or too elongated; "
                        f"use sides >= 64 px and an aspect ratio <= 8")


def prepare_ref(img: Image.Image, limit: int, name: str = "reference image") -> torch.Tensor:
    """A reference image as the reference prepares it: RGB, area capped at `limit` (LANCZOS),
    centre-cropped to multiples of 16 -> pixels [3, H, W] in [-1, 1], float32."""
    img = img.convert("RGB")
    w, h = img.size
    check_ref_size(w, h, name=name)
    if w * h > limit:
        img = img.resize(_capped(w, h, limit), Image.Resampling.LANCZOS)
        w, h = img.size
    left, top = (w - w // 16 * 16) // 2, (h - h // 16 * 16) // 2
    img = img.crop((left, top, left + w // 16 * 16, top + h // 16 * 16))
    return vae.to_pixels(img)


def ref_limit(count: int) -> int:
    """The sampling rule's area cap for each of `count` references of one image."""
    return REF_LIMIT_ONE if count == 1 else REF_LIMIT_EACH


def prepare_refs(images: list[Image.Image], names: list[str] | None = None) -> list[torch.Tensor]:
    """All reference images of one call; the area cap is 2024^2 (sic) for a single one, 1024^2
    each for several."""
    names = names or ["reference image"] * len(images)
    return [prepare_ref(img, ref_limit(len(images)), name) for img, name in zip(images, names)]


# --------------------------------------------------------------------------------------------------
# The cache: one safetensors file per item, written atomically, named by a content hash

def _hash(*parts) -> str:
    """A cache key: SHA-256 over the parts (bytes as they are, the rest as text), NUL-separated."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def text_key(caption: str, text_id: str) -> str:
    """Cache key of a caption's text features."""
    return _hash("text", caption, text_id, TEXT_LENGTH)


def fingerprint(items: list[Item]) -> str:
    """A short hash of what a run trains on: every item's (and reference's) content hash and
    caption, in order; it changes when an image, a caption or the set of images does."""
    parts = [part for it in items for part in (it.digest, it.caption, *(r.digest for r in it.refs))]
    return _hash("dataset", *parts)[:16]


def _size(img: Image.Image) -> tuple[int, int]:
    """(width, height) after EXIF rotation, read from the header without decoding pixels."""
    w, h = img.size
    rotated = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)      # 90- and 270-degree orientations
    return (h, w) if rotated else (w, h)


def _barrier(world: int) -> None:
    """Wait until every rank's cache entries are written (a no-op for one process)."""
    if world > 1:
        dist.barrier()


def cache_latents(folder, *, cache_dir, ae_id: str, load_ae: Callable, resolution: int,
                  buckets: bool = False, default_caption: str | None = None, device="cpu",
                  rank: int = 0, world: int = 1, control_dir=None,
                  control_resolution: int | None = None) -> list[Item]:
    """Encode every image of `folder` (and its references, find_references) not yet in the cache;
    return the usable items in name order. References are capped at control_resolution^2 pixels,
    else as sampling caps them (ref_limit). `load_ae()` is called only if something is missing.
    Unreadable images are skipped with one warning listing them. With world > 1 (a process group
    is required) this rank handles images rank, rank + world, ... and the call returns once every
    rank is done, each rank warning about the unreadable images it handled."""
    if resolution % 16:
        raise DataError(f"--resolution {resolution}: must be a multiple of 16 (the VAE's x8 and "
                        f"the 2x2 patch)")
    found, items, bad, todo = find_images(folder, default_caption), [], [], []
    refs = find_references(folder, [path for path, _ in found], control_dir)
    for i, ((path, caption), ref_paths) in enumerate(zip(found, refs)):
        mine = i % world == rank        # by place in the full list: every rank sees the same list
        try:
            item = _item(path, caption, ae_id=ae_id, resolution=resolution, buckets=buckets,
                         refs=ref_paths, control_resolution=control_resolution)
        except UNREADABLE as e:
            if mine:
                bad.append(_unreadable(path, e))
            continue
        items.append(item)
        if mine:
            todo += [x for x in (item, *item.refs) if not latent_path(cache_dir, x).is_file()]
    todo = list({x.digest: x for x in todo}.values())      # a shared reference is encoded once
    bad += _encode_latents(todo, cache_dir=cache_dir, load_ae=load_ae, device=device)
    _barrier(world)
    items = [it for it in items                             # minus undecodable ones
             if all(latent_path(cache_dir, x).is_file() for x in (it, *it.refs))]
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image(s) in {folder}: " + "; ".join(bad),
                      stacklevel=2)
    if not items:
        raise DataError(f"{folder}: no usable image ({len(found)} unreadable); check the files")
    return sorted(items, key=lambda it: it.path)


def _item(path: Path, caption: str, *, ae_id: str, resolution: int, buckets: bool,
          refs: list[Path] = (), control_resolution: int | None = None) -> Item:
    """An image's Item: the training size from its header alone, the cache key from its bytes;
    the same for its references."""
    raw = path.read_bytes()
    with Image.open(path) as img:
        size = _size(img)
    w, h = pick_size(*size, resolution, buckets)
    limit = control_resolution ** 2 if control_resolution else ref_limit(len(refs))
    return Item(path, caption, _hash("latent", raw, ae_id, w, h, CROP_METHOD), (w, h),
                tuple(_reference(r, ae_id=ae_id, limit=limit) for r in refs))


def _reference(path: Path, *, ae_id: str, limit: int) -> Reference:
    """A reference image's Reference: its prepared size from the header (as sampling reads it:
    no EXIF rotation), the cache key from its bytes."""
    raw = path.read_bytes()
    with Image.open(path) as img:
        check_ref_size(*img.size, name=str(path))
        w, h = ref_size(*img.size, limit)
    return Reference(path, _hash("reference", raw, ae_id, w, h, REF_METHOD), limit, (w, h))


def _unreadable(path: Path, error: Exception) -> str:
    """How the skipped-images warning names a file that failed to open or decode."""
    return f"{path.name} ({type(error).__name__}: {error})"


def _pixels(entry: Item | Reference) -> torch.Tensor:
    """The pixels [3, H, W] in [-1, 1] a target (cropped to its size) or a reference
    (prepare_ref, as sampling) is encoded from."""
    if isinstance(entry, Reference):
        with Image.open(entry.path) as img:
            return prepare_ref(img, entry.limit, name=str(entry.path))
    return vae.to_pixels(center_crop_resize(load_image(entry.path), *entry.size))


def _encode_latents(items: list[Item | Reference], *, cache_dir, load_ae: Callable,
                    device) -> list[str]:
    """Cache the latents of `items` (targets and references), loading the autoencoder for the
    first image that decodes, and free it; returns the images that failed to decode (a truncated
    file passes the header read)."""
    ae, bad = None, []
    for item in items:
        try:
            pixels = _pixels(item)
        except UNREADABLE as e:
            bad.append(_unreadable(item.path, e))
            continue
        if ae is None:
            ae = load_ae()
        dtype = next(ae.parameters()).dtype
        with torch.no_grad():
            z = ae.encode(pixels[None].to(device, dtype))[0]            # [128, h/16, w/16]
        atomic_write(latent_path(cache_dir, item),
                     lambda f: write_tensors(f, latent=z.float().cpu().contiguous()))
    del ae
    free_cuda()
    return bad


def cache_texts(texts: list[str], *, cache_dir, text_id: str, load_encoder: Callable,
                batch_size: int | None = None, rank: int = 0, world: int = 1) -> None:
    """Encode every distinct text not yet in the cache. `load_encoder()` -> a function list[str] ->
    [B, 512, ctx]; it is called only if something is missing, and freed before returning (the DiT
    must not meet it on the GPU). batch_size None: all missing texts in one call, one sweep of an
    encoder that runs layer by layer. With world > 1 this rank encodes distinct texts rank, rank +
    world, ...; returns once every rank is done."""
    missing = [t for i, t in enumerate(dict.fromkeys(texts))
               if i % world == rank and not text_path(cache_dir, t, text_id).is_file()]
    if missing:
        encode = load_encoder()
        batch_size = batch_size or len(missing)
        for i in range(0, len(missing), batch_size):
            chunk = missing[i:i + batch_size]
            with torch.no_grad():
                ctx = encode(chunk)                                      # [b, 512, ctx_dim]
            for text, c in zip(chunk, ctx):
                atomic_write(text_path(cache_dir, text, text_id),
                             lambda f: write_tensors(f, ctx=c.cpu().contiguous()))
        del encode
        free_cuda()
    _barrier(world)


def write_tensors(path, **tensors: torch.Tensor) -> None:
    """A safetensors file written through Python's file API: a full disk raises OSError
    (safetensors' own writer can lose the last buffered bytes silently)."""
    Path(path).write_bytes(safetensors_bytes(tensors))


def latent_path(cache_dir, item: Item | Reference) -> Path:
    """Where an item's (or a reference's) latent is cached."""
    return Path(cache_dir) / "latents" / f"{item.digest}.safetensors"


def text_path(cache_dir, text: str, text_id: str) -> Path:
    """Where a caption's text features are cached."""
    return Path(cache_dir) / "text" / f"{text_key(text, text_id)}.safetensors"


def load_text(cache_dir, text: str, text_id: str) -> torch.Tensor:
    """Cached text features [512, ctx_dim] of one text."""
    return load_file(text_path(cache_dir, text, text_id))["ctx"]


# --------------------------------------------------------------------------------------------------
# Batches in a deterministic, resumable order

class Loader:
    """Endless batches of cached (latent, text) pairs. Each epoch is a seeded shuffle, grouped so a
    batch holds one shape: items share a group when their targets have the same bucket size and
    their references the same count and sizes, in order (shape_key). The position (epoch, batch
    index) is the whole state, so resuming repeats the exact order. batch_size is the global
    batch: rank r of `world` gets rows r*m .. r*m + m-1 of each batch (m = its size / world,
    rounded up), so the order and the state do not depend on the number of ranks."""

    def __init__(self, items: list[Item], *, cache_dir, text_id: str, batch_size: int,
                 repeats: int = 1, seed: int = 0, rank: int = 0, world: int = 1):
        self.items = [it for it in items for _ in range(repeats)]
        self.cache_dir, self.text_id, self.batch_size = cache_dir, text_id, batch_size
        self.seed = seed
        self.rank, self.world = rank, world
        self.epoch, self.pos = 0, 0
        self._plan = self._epoch_plan(0)

    def _epoch_plan(self, epoch: int) -> list[list[int]]:
        """The epoch's batches (indices into items): a seeded shuffle, split by size, in a seeded
        order."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        by_size = {}
        for i in torch.randperm(len(self.items), generator=g).tolist():
            by_size.setdefault(shape_key(self.items[i]), []).append(i)
        batches = [idx[j:j + self.batch_size]
                   for idx in by_size.values() for j in range(0, len(idx), self.batch_size)]
        return [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]

    def state_dict(self) -> dict:
        """The position of the next batch."""
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position saved by state_dict()."""
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._plan = self._epoch_plan(self.epoch)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        """This rank's rows of the next batch: {"latents" [m, 128, h, w], "ctx" [m, 512, ctx_dim],
        "captions", "index" [m] (the rows' positions in the global batch), "total" (the global
        batch's size), "refs" (one [m, 128, h_r, w_r] per reference slot; empty without
        references)}. Rows at positions >= total pad a short last batch of a bucket (they repeat
        its last item); one rank gets it all."""
        if self.pos >= len(self._plan):
            self.epoch, self.pos = self.epoch + 1, 0
            self._plan = self._epoch_plan(self.epoch)
        batch = [self.items[i] for i in self._plan[self.pos]]
        self.pos += 1
        total = len(batch)
        m = ceil_div(total, self.world)
        index = torch.arange(self.rank * m, self.rank * m + m)
        batch = [batch[min(i, total - 1)] for i in index.tolist()]
        latents = [load_file(latent_path(self.cache_dir, it))["latent"] for it in batch]
        ctx = [load_text(self.cache_dir, it.caption, self.text_id) for it in batch]
        refs = [torch.stack([load_file(latent_path(self.cache_dir, it.refs[k]))["latent"]
                             for it in batch]) for k in range(len(batch[0].refs))]
        return {"latents": torch.stack(latents), "ctx": torch.stack(ctx),
                "captions": [it.caption for it in batch], "index": index, "total": total,
                "refs": refs}


def shape_key(item: Item) -> tuple:
    """What must match for items to share a micro-batch: the target's size and the references'
    sizes, in order."""
    return item.size, tuple(r.size for r in item.refs)
