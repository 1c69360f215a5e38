"""Which prompt positions hold the image tokens that cover a text box.

One function per model family, following the authors' mapping (pixels per
token along each axis; a box covers the columns ``x0 // pw .. x1 // pw`` and
rows alike) but computed in float pixels-per-token, which also works when the
image is smaller than its token grid (the reference's integer division then
divides by zero).

* LLaVA-1.5: the processor resizes the short side and centre-crops; the grid is
  ``crop / patch`` square, row-major.
* LLaVA-NeXT and LLaVA-OneVision: only the hi-res any-res grid counts (the
  base image's tokens come first and are excluded, as in the reference); its
  rows end with a newline token.
* Qwen2-VL and Qwen2.5-VL: the processor resizes to ``grid * 14`` pixels;
  tokens are 2x2 merged patches, 28 pixels a side (Qwen3-VL: 16 px patches,
  32 px tokens; the mapping reads the grid, so it is the same).
* InternVL: the processor resizes the image onto a grid of tiles (448 px on
  the hub) and cuts it tile by tile, row-major; pixel shuffle merges 2x2
  patches, so a tile is a row-major square of tokens (16 x 16 on the hub).
  With several tiles a thumbnail of the whole image follows them; like
  LLaVA-NeXT's base image it is excluded.
"""

from __future__ import annotations

import math

import torch


def _cells(box, scale_x, scale_y, shift_x, shift_y, cols, rows):
    """Grid cells (row, col) under a box after ``x * scale - shift``; clipped."""
    x0, y0, x1, y1 = box
    c0 = max(math.floor(x0 * scale_x - shift_x), 0)
    c1 = min(math.floor(x1 * scale_x - shift_x), cols - 1)
    r0 = max(math.floor(y0 * scale_y - shift_y), 0)
    r1 = min(math.floor(y1 * scale_y - shift_y), rows - 1)
    return [(r, c) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]


def _first(input_ids: torch.Tensor, token_id: int) -> int:
    hits = (input_ids.flatten() == token_id).nonzero()
    if hits.numel() == 0:
        raise ValueError("the prompt holds no image token")
    return int(hits[0])


def llava_box_tokens(processor, config, inputs, image_size, box) -> list[int]:
    width, height = image_size
    images = processor.image_processor
    short = images.size["shortest_edge"]
    crop_h, crop_w = images.crop_size["height"], images.crop_size["width"]
    scale = short / min(width, height)
    resized_w = short if width <= height else int(short * width / height)
    resized_h = short if height <= width else int(short * height / width)
    patch = config.vision_config.patch_size
    left, top = (resized_w - crop_w) // 2, (resized_h - crop_h) // 2
    cols, rows = crop_w // patch, crop_h // patch
    cells = _cells(box, scale / patch, scale / patch, left / patch, top / patch,
                   cols, rows)
    start = _first(inputs["input_ids"], config.image_token_index)
    return [start + r * cols + c for r, c in cells]


def llava_next_box_tokens(processor, config, inputs, image_size,
                          box) -> list[int]:
    from transformers.image_processing_utils import select_best_resolution
    width, height = image_size
    tile = config.vision_config.image_size
    grid = tile // config.vision_config.patch_size
    best_h, best_w = select_best_resolution(
        [height, width], config.image_grid_pinpoints)
    features, rows = processor._get_unpadded_features(
        height, width, grid, grid, best_h // tile, best_w // tile)
    cols = features // rows  # it returns (rows * cols, rows)
    cells = _cells(box, cols / width, rows / height, 0, 0, cols, rows)
    start = _first(inputs["input_ids"], config.image_token_index) + grid * grid
    return [start + r * (cols + 1) + c for r, c in cells]


def qwen2_vl_box_tokens(processor, config, inputs, image_size,
                        box) -> list[int]:
    width, height = image_size
    _, grid_h, grid_w = (int(v) for v in inputs["image_grid_thw"][0])
    merge = config.vision_config.spatial_merge_size
    cols, rows = grid_w // merge, grid_h // merge
    cells = _cells(box, cols / width, rows / height, 0, 0, cols, rows)
    start = _first(inputs["input_ids"], config.image_token_id)
    return [start + r * cols + c for r, c in cells]


def internvl_box_tokens(processor, config, inputs, image_size,
                       box) -> list[int]:
    width, height = image_size
    vision = config.vision_config
    side = int(vision.image_size[0] // vision.patch_size[0]
               * config.downsample_ratio)  # tokens a tile side
    start = _first(inputs["input_ids"], config.image_token_id)
    count = int((inputs["input_ids"] == config.image_token_id).sum())
    cols, rows = _internvl_grid(processor.image_processor, width, height,
                                count // (side * side))
    cells = _cells(box, cols * side / width, rows * side / height, 0, 0,
                   cols * side, rows * side)
    return [start + ((r // side) * cols + c // side) * side * side
            + (r % side) * side + c % side for r, c in cells]


def _internvl_grid(images, width, height, tiles) -> tuple[int, int]:
    """(columns, rows) of tiles: one tile is the whole image; more are the
    processor's grid and a thumbnail."""
    from transformers.models.got_ocr2.image_processing_got_ocr2 import \
        get_optimal_tiled_canvas
    if tiles == 1:
        return 1, 1
    tile = images.size["height"], images.size["width"]
    cols, rows = get_optimal_tiled_canvas((height, width), tile,
                                          images.min_patches,
                                          images.max_patches)
    if cols * rows + 1 != tiles:
        raise ValueError(f"the prompt holds {tiles} tiles, the processor's "
                         f"grid {cols} x {rows} and a thumbnail")
    return cols, rows


BOX_TOKENS = {
    "llava": llava_box_tokens,
    "llava_next": llava_next_box_tokens,
    # the same layout (base image, then the unpadded any-res grid, a newline
    # a row); its processor also counts the anyres_max_9 downsampling
    "llava_onevision": llava_next_box_tokens,
    "qwen2_vl": qwen2_vl_box_tokens,
    "qwen2_5_vl": qwen2_vl_box_tokens,  # same 14 px patches, 2x2 merge
    "qwen3_vl": qwen2_vl_box_tokens,  # 16 px patches: read from the grid
    "internvl": internvl_box_tokens,
}


def box_tokens(processor, config, inputs, image_size, box) -> list[int]:
    """Absolute prompt positions of the image tokens under ``box``."""
    try:
        mapper = BOX_TOKENS[config.model_type]
    except KeyError:
        raise ValueError(f"no box-to-token mapping for {config.model_type!r}; "
                         f"supported: {sorted(BOX_TOKENS)}") from None
    return mapper(processor, config, inputs, image_size, box)
