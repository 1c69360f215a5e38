"""OCR calibration data: a SynthDog-style loader and a synthetic generator.

A sample is an image plus its text boxes ``(text, (x0, y0, x1, y1))`` in the
image's own pixels, ``x1``/``y1`` inclusive as in the reference's regions.

Folder format (what :func:`generate_ocr_images` writes and :func:`load_ocr_folder`
reads): images plus ``annotations.jsonl``, one line per image::

    {"image": "0000.png", "boxes": [{"text": "word", "box": [x0, y0, x1, y1]}]}

The SynthDog layout the authors' script produces (``2_coord``: a list of
``{"chunk": text, "coord": [[x0, y0], [x1, y1]]}``) is read as well.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

ANNOTATIONS = "annotations.jsonl"
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts")


@dataclass(frozen=True)
class OcrSample:
    image: Path
    boxes: tuple[tuple[str, tuple[int, int, int, int]], ...]

    def load_image(self):
        from PIL import Image
        return Image.open(self.image).convert("RGB")


def _parse(record: dict, folder: Path) -> OcrSample:
    image = record.get("image") or record.get("image_name")
    if image is None:
        raise ValueError(f"annotation without an image name: {record!r:.100}")
    boxes = []
    for item in record.get("boxes", []):
        boxes.append((str(item["text"]), tuple(int(v) for v in item["box"])))
    for item in record.get("2_coord", []):
        (x0, y0), (x1, y1) = item["coord"]
        boxes.append((str(item["chunk"]), (int(x0), int(y0), int(x1), int(y1))))
    if not boxes:
        raise ValueError(f"{image}: no text boxes")
    return OcrSample(folder / image, tuple(boxes))


def load_ocr_folder(folder: str | Path) -> list[OcrSample]:
    """Samples from ``annotations.jsonl`` (or a JSON list in ``annotations.json``)."""
    folder = Path(folder)
    lines = folder / ANNOTATIONS
    listing = folder / "annotations.json"
    if lines.is_file():
        records = [json.loads(l) for l in lines.read_text().splitlines()
                   if l.strip()]
    elif listing.is_file():
        records = json.loads(listing.read_text())
    else:
        raise FileNotFoundError(
            f"{folder}: no {ANNOTATIONS} or annotations.json; generate data "
            f"with `vllm-sparsemm chase --generate N` or see "
            f"vllm_sparsemm/chase/data.py for the format")
    return [_parse(r, folder) for r in records]


def _fonts() -> list[str]:
    found = []
    for directory in FONT_DIRS:
        found += sorted(str(p) for p in Path(directory).rglob("*.ttf"))
    return found


def _word(rng: random.Random) -> str:
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "".join(rng.choice(letters) for _ in range(rng.randint(3, 9)))


def generate_ocr_images(folder: str | Path, count: int, seed: int = 0,
                        size: tuple[int, int] = (672, 448),
                        words_per_image: tuple[int, int] = (3, 8)
                        ) -> list[OcrSample]:
    """Render ``count`` images of random words with exact boxes, and annotate them."""
    from PIL import Image, ImageDraw, ImageFont
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    fonts = _fonts()
    records = []
    for n in range(count):
        image = Image.new("RGB", size, (255, 255, 255))
        draw = ImageDraw.Draw(image)
        taken, boxes = [], []
        for _ in range(rng.randint(*words_per_image)):
            font_size = rng.randint(18, 48)
            font = (ImageFont.truetype(rng.choice(fonts), font_size) if fonts
                    else ImageFont.load_default(size=font_size))
            text = _word(rng)
            for _try in range(20):  # find a free spot
                x, y = rng.randint(0, size[0] - 40), rng.randint(0, size[1] - 40)
                x0, y0, x1, y1 = draw.textbbox((x, y), text, font=font)
                inside = x1 < size[0] and y1 < size[1]
                if inside and not any(x0 <= b[2] and b[0] <= x1 and
                                      y0 <= b[3] and b[1] <= y1 for b in taken):
                    break
            else:
                continue
            color = tuple(rng.randint(0, 90) for _ in range(3))
            draw.text((x, y), text, font=font, fill=color)
            taken.append((x0, y0, x1, y1))
            boxes.append({"text": text, "box": [x0, y0, x1, y1]})
        name = f"{n:05d}.png"
        image.save(folder / name)
        records.append({"image": name, "boxes": boxes})
    (folder / ANNOTATIONS).write_text(
        "".join(json.dumps(r) + "\n" for r in records))
    return [_parse(r, folder) for r in records]
