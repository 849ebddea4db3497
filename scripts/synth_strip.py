"""Draw a strip of synthetic images with their ground-truth boxes (the picture in docs/RESULTS.md).

    python scripts/synth_strip.py --profile objects --out docs/results/synth_objects.png
    python scripts/synth_strip.py --profile shapes --out docs/results/synth_shapes.png

Generates a few validation images with `msad data synth`'s generator (seed 0, 128 px) into a
temporary folder, enlarges them 3x (nearest neighbour, so the pixels a detector sees stay visible)
and draws each box in its class colour with the class name.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from msad_deploy.data.synth import SYNTH_PROFILES, generate_synthetic_coco

SCALE = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=SYNTH_PROFILES, default="objects", help="scene profile")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--images", type=int, default=6, help="images in the strip (default 6)")
    parser.add_argument("--size", type=int, default=128, help="long side of the images (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        generate_synthetic_coco(tmp, 0, args.images, args.size, args.seed, progress=False, profile=args.profile)
        data = json.loads((Path(tmp) / "annotations" / "instances_val.json").read_text())
        names = {cat["id"]: cat["name"] for cat in data["categories"]}
        hues = {cat_id: i / len(names) for i, cat_id in enumerate(sorted(names))}
        cell = args.size * SCALE
        strip = Image.new("RGB", (cell * len(data["images"]) + 4 * (len(data["images"]) - 1), cell), "white")
        for i, image in enumerate(data["images"]):
            with Image.open(Path(tmp) / "val" / image["file_name"]) as png:
                tile = png.convert("RGB").resize((png.width * SCALE, png.height * SCALE), Image.NEAREST)
            draw = ImageDraw.Draw(tile)
            for ann in data["annotations"]:
                if ann["image_id"] != image["id"]:
                    continue
                x, y, w, h = (v * SCALE for v in ann["bbox"])
                colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hues[ann["category_id"]], 1.0, 1.0))
                draw.rectangle([x, y, x + w - 1, y + h - 1], outline=colour, width=2)
                label = names[ann["category_id"]]
                draw.rectangle([x, max(y - 11, 0), x + 6 * len(label) + 2, max(y - 11, 0) + 10], fill="black")
                draw.text((x + 1, max(y - 11, 0)), label, fill=colour)
            strip.paste(tile, (i * (cell + 4), 0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    strip.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
