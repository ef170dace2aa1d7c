"""A few dozen generated 1024x1024 training images with captions (shapes and colours), for the
full-size train.py runs of bench/RESULTS.md.

    python bench/gen_images.py imgs
"""
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
rng = random.Random(0)
colours = ["red", "green", "blue", "orange", "purple", "yellow"]
for i in range(24):
    c = rng.choice(colours)
    bg = rng.choice(["white", "black", "grey"])
    shape = rng.choice(["circle", "square"])
    im = Image.new("RGB", (1024, 1024), bg)
    d = ImageDraw.Draw(im)
    x, y, r = rng.randint(200, 800), rng.randint(200, 800), rng.randint(80, 200)
    (d.ellipse if shape == "circle" else d.rectangle)((x - r, y - r, x + r, y + r), fill=c)
    im.save(out / f"{i:02d}.png")
    (out / f"{i:02d}.txt").write_text(f"a {c} {shape} on a {bg} background")
