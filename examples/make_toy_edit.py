"""Write examples/toy_edit/: a tiny edit-LoRA dataset, made deterministically with PIL.

Each target images/<stem>.png is its reference control/<stem>.png with the shape recoloured red;
images/<stem>.txt holds the instruction. Train on it with
`python train.py --data examples/toy_edit/images --control-dir examples/toy_edit/control ...`.
"""
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
RED = (220, 30, 30)
# stem -> (shape, its colour in the reference, background)
ITEMS = {
    "square": ("square", (40, 80, 220), (245, 240, 220)),
    "circle": ("circle", (30, 160, 70), (230, 230, 235)),
    "triangle": ("triangle", (240, 200, 40), (40, 40, 60)),
    "diamond": ("diamond", (140, 60, 200), (210, 235, 240)),
    "ring": ("ring", (250, 140, 20), (25, 60, 110)),
}


def draw(shape: str, colour: tuple, background: tuple) -> Image.Image:
    """A SIZE x SIZE RGB image: one centred shape on a plain background."""
    img = Image.new("RGB", (SIZE, SIZE), background)
    d = ImageDraw.Draw(img)
    lo, mid, hi = 28, SIZE // 2, SIZE - 28
    if shape == "square":
        d.rectangle((lo, lo, hi, hi), fill=colour)
    elif shape == "circle":
        d.ellipse((lo, lo, hi, hi), fill=colour)
    elif shape == "triangle":
        d.polygon([(mid, lo), (hi, hi), (lo, hi)], fill=colour)
    elif shape == "diamond":
        d.polygon([(mid, lo), (hi, mid), (mid, hi), (lo, mid)], fill=colour)
    else:                                                           # ring
        d.ellipse((lo, lo, hi, hi), outline=colour, width=14)
    return img


def main(out: Path = Path(__file__).parent / "toy_edit") -> None:
    """Write every target, caption and reference under `out`."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "control").mkdir(parents=True, exist_ok=True)
    for stem, (shape, colour, background) in ITEMS.items():
        draw(shape, colour, background).save(out / "control" / f"{stem}.png", optimize=True)
        draw(shape, RED, background).save(out / "images" / f"{stem}.png", optimize=True)
        (out / "images" / f"{stem}.txt").write_text(f"make the {shape} red\n", encoding="utf-8")


if __name__ == "__main__":
    main()
