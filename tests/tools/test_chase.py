"""Chasing visual heads: data, box-to-token maps, a rigged head, the whole run."""

import json

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from vllm_sparsemm.tools.chase import (OcrSample, chase, generate_ocr_images,
                                       load_model, load_ocr_folder,
                                       prepare_model, score_image)
from vllm_sparsemm.tools.chase.regions import box_tokens
from vllm_sparsemm.core.scores import load_head_scores
from vllm_sparsemm.testing import checkpoints, tiny


def test_generated_images_come_with_exact_boxes(tmp_path):
    samples = generate_ocr_images(tmp_path, 3, seed=1, size=(320, 200))
    assert load_ocr_folder(tmp_path) == samples
    for sample in samples:
        image = sample.load_image()
        assert image.size == (320, 200) and sample.boxes
        for text, (x0, y0, x1, y1) in sample.boxes:
            inside = image.crop((x0, y0, x1 + 1, y1 + 1)).convert("L")
            assert inside.getextrema()[0] < 128  # ink inside the box
            assert text.isalnum()


def test_synthdog_layout_is_read(tmp_path):
    Image.new("RGB", (50, 40), "white").save(tmp_path / "a.png")
    (tmp_path / "annotations.json").write_text(json.dumps([
        {"image_name": "a.png",
         "2_coord": [{"chunk": "hi", "coord": [[1, 2], [30, 20]]}]}]))
    (sample, ) = load_ocr_folder(tmp_path)
    assert sample.boxes == (("hi", (1, 2, 30, 20)), )
    with pytest.raises(FileNotFoundError, match="annotations"):
        load_ocr_folder(tmp_path / "nothing")


def test_llava_box_tokens_follow_resize_and_center_crop():
    # 448 x 224 image -> short side to 112 (scale 1/2): 224 x 112, crop 112
    # from x = 56; tokens are 8 x 8 patches of 14 px after the crop.
    processor = checkpoints.llava_processor(112, 256, 250)
    config = tiny.tiny_llava(image_size=112).config
    inputs = {"input_ids": torch.tensor([[1, 5] + [250] * 64 + [7]])}
    # x 240..279 -> 120..139.5 -> cropped 64..83.5 -> columns 4, 5;
    # y 0..55 -> 0..27.5 -> rows 0, 1
    got = box_tokens(processor, config, inputs, (448, 224), (240, 0, 279, 55))
    assert got == [2 + 0 * 8 + 4, 2 + 0 * 8 + 5, 2 + 1 * 8 + 4, 2 + 1 * 8 + 5]
    # entirely in the cropped-away margin: no tokens
    assert box_tokens(processor, config, inputs, (448, 224), (0, 0, 100, 50)) == []


def test_qwen2_vl_box_tokens_use_the_merged_grid():
    processor = checkpoints.qwen2_vl_processor(400, {
        "image": 390, "video": 391, "vision_start": 392, "vision_end": 393})
    config = tiny.tiny_qwen2_vl().config
    # grid 8 x 12 patches -> 4 x 6 merged tokens over a 336 x 224 image (56 px each)
    inputs = {"input_ids": torch.tensor([[1, 392] + [390] * 24 + [393]]),
              "image_grid_thw": torch.tensor([[1, 8, 12]])}
    got = box_tokens(processor, config, inputs, (336, 224), (60, 0, 120, 60))
    assert got == [2 + 0 * 6 + 1, 2 + 0 * 6 + 2, 2 + 1 * 6 + 1, 2 + 1 * 6 + 2]


def test_llava_onevision_box_tokens_skip_the_base_image_and_newlines():
    model = tiny.tiny_llava_onevision(image_size=112)
    processor = checkpoints.llava_onevision_processor(112, 400, 390, 391)
    image = Image.new("RGB", (224, 112), "white")  # best grid: 1 x 2 tiles
    inputs = processor(images=image, text="<|im_start|>user <image>\nx",
                       return_tensors="pt")
    assert int((inputs["input_ids"] == 390).sum()) == 64 + 8 * (16 + 1)
    start = int((inputs["input_ids"][0] == 390).nonzero()[0])
    got = box_tokens(processor, model.config, inputs, (224, 112),
                     (0, 0, 20, 10))  # top-left corner of the hi-res grid
    assert got == [start + 64 + c for c in (0, 1)]


def test_qwen3_vl_box_tokens_use_its_16_px_patches():
    """Qwen3-VL's processor cuts 16 px patches, merged 2 x 2 into 32 px
    tokens: a 320 x 192 image is 12 x 20 patches, 6 x 10 tokens."""
    processor = checkpoints.qwen2_vl_processor(400, {
        "image": 390, "video": 391, "vision_start": 392, "vision_end": 393},
        version="3")
    config = tiny.tiny_qwen3_vl().config
    image = Image.new("RGB", (320, 192), "white")
    inputs = processor(images=image, text="<|vision_start|><|image_pad|>"
                       "<|vision_end|>x", return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 12, 20]]
    start = int((inputs["input_ids"][0] == 390).nonzero()[0])
    # pixels x 64..95 are token column 2, y 32..63 token row 1
    got = box_tokens(processor, config, inputs, (320, 192), (70, 40, 90, 60))
    assert got == [start + 1 * 10 + 2]


def test_internvl_box_tokens_cross_tiles_and_skip_the_thumbnail():
    """112 px tiles of 4 x 4 tokens, 28 px each. A 448 x 224 image matches
    2:1 grids 2 x 1 and 4 x 2 equally; the processor takes 4 x 2, whose
    canvas is the image itself: 16 x 8 tokens, then a thumbnail."""
    model = tiny.tiny_internvl(image_size=112)
    processor = checkpoints.internvl_processor_of(model.config)
    image = Image.new("RGB", (448, 224), "white")
    inputs = processor(images=image, text="<|im_start|>user <IMG_CONTEXT>\nx",
                       return_tensors="pt")
    ids = inputs["input_ids"][0]
    assert int((ids == 390).sum()) == (4 * 2 + 1) * 16
    start = int((ids == 390).nonzero()[0])
    assert ids[start - 1] == 392  # <img>
    # x 100..120 -> token columns 3, 4; y 100..120 -> token rows 3, 4: the
    # corners of tiles 0, 1 (top row) and 4, 5 (second row)
    got = box_tokens(processor, model.config, inputs, (448, 224),
                     (100, 100, 120, 120))
    assert got == [start + 0 * 16 + 3 * 4 + 3, start + 1 * 16 + 3 * 4 + 0,
                   start + 4 * 16 + 0 * 4 + 3, start + 5 * 16 + 0 * 4 + 0]
    # a 300 x 150 image goes on a 2 x 1 grid (224 x 112 px): x 160..170
    # is 119.5..127 px there, column 4 (tile 1, its column 0); y 40..45 is
    # 29.9..33.6 px, row 1
    image = Image.new("RGB", (300, 150), "white")
    inputs = processor(images=image, text="<IMG_CONTEXT>", return_tensors="pt")
    assert int((inputs["input_ids"] == 390).sum()) == (2 + 1) * 16
    start = int((inputs["input_ids"][0] == 390).nonzero()[0])
    got = box_tokens(processor, model.config, inputs, (300, 150),
                     (160, 40, 170, 45))
    assert got == [start + 16 + 1 * 4 + 0]


def test_llava_next_box_tokens_skip_the_base_image_and_newlines():
    model = tiny.tiny_llava_next(image_size=112)
    processor = checkpoints.llava_next_processor(112, 256, 250)
    image = Image.new("RGB", (224, 112), "white")  # best grid: 1 x 2 tiles
    inputs = processor(images=image, text="USER: <image>\nx ASSISTANT:",
                       return_tensors="pt")
    num_image = int((inputs["input_ids"] == 250).sum())
    assert num_image == 64 + 8 * (16 + 1)  # base 8x8, then 8 rows of 16 + newline
    start = int((inputs["input_ids"][0] == 250).nonzero()[0])
    got = box_tokens(processor, model.config, inputs, (224, 112),
                     (200, 100, 223, 111))  # bottom-right corner
    assert got == [start + 64 + 7 * 17 + c for c in (14, 15)]


def _rig(model, layer: int, head: int):
    """Make ``head`` of ``layer`` look at inked image patches and the model emit token 0.

    The CLIP tower reduces to "how much ink is in this patch" (0 on white),
    the projector writes it into hidden dim ``d``; the head's query is a
    constant bias on RoPE's slowest pair and its key reads dim ``d``, so its
    top-1 key is always an inked patch. A zero final norm makes every logit 0.
    """
    vision = model.model.vision_tower
    emb = vision.embeddings
    patch = emb.patch_embedding.weight.shape[-1]
    white = torch.tensor([(1 - m) / s for m, s in zip(
        [0.48145466, 0.4578275, 0.40821073],
        [0.26862954, 0.26130258, 0.27577711])]).mean()
    with torch.no_grad():
        for p in list(emb.parameters()) + list(model.model.multi_modal_projector.parameters()):
            p.zero_()
        emb.patch_embedding.weight[0] = -1.0 / (3 * patch * patch)
        emb.patch_embedding.weight[1] = 1.0 / (3 * patch * patch)
        emb.position_embedding.weight[:, 0] = white
        emb.position_embedding.weight[:, 1] = -white
        for enc in vision.encoder.layers:
            enc.self_attn.out_proj.weight.zero_()
            enc.self_attn.out_proj.bias.zero_()
            enc.mlp.fc2.weight.zero_()
            enc.mlp.fc2.bias.zero_()
        d = 5
        proj = model.model.multi_modal_projector
        proj.linear_1.weight[0, 0] = 1.0
        proj.linear_2.weight[d, 0] = 1.0
        text = model.model.language_model
        text.embed_tokens.weight[:, d] = 0
        attn = text.layers[layer].self_attn
        dim = attn.head_dim
        slow = head * dim + dim // 2 - 1  # RoPE's slowest-rotating pair
        rows = slice(head * dim, (head + 1) * dim)
        attn.q_proj.weight[rows] = 0
        attn.q_proj.bias[rows] = 0
        attn.q_proj.bias[slow] = 50.0
        attn.k_proj.weight[rows] = 0
        attn.k_proj.bias[rows] = 0
        attn.k_proj.weight[slow, d] = 1.0
        text.norm.weight.zero_()


def test_rigged_head_gets_the_top_score(tmp_path):
    from transformers import CLIPImageProcessor, LlavaProcessor
    model = tiny.tiny_llava(num_layers=2, num_heads=4, num_kv_heads=4,
                            head_dim=16, image_size=112, attention_bias=True)
    _rig(model, layer=1, head=2)
    prepare_model(model)
    # token id 0 is the character "0"
    tokenizer = checkpoints.char_tokenizer(
        256, {"<unk>": 3, "<s>": 1, "</s>": 2, "<image>": 250}, bos="<s>",
        eos="</s>", unk="<unk>")
    assert tokenizer.decode([0]) == "0"
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112}),
        tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=checkpoints.LLAVA_TEMPLATE, image_token="<image>",
        num_additional_image_tokens=1)
    image = Image.new("RGB", (112, 112), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=28)
    box = draw.textbbox((20, 40), "A0Z", font=font)
    draw.text((20, 40), "A0Z", font=font, fill="black")
    image.save(tmp_path / "rig.png")
    sample = OcrSample(tmp_path / "rig.png", (("A0Z", box), ))

    result = score_image(model, processor, sample, max_new_tokens=6)
    assert result.tokens == [0] * 6 and result.matched == 6
    region = box_tokens(processor, model.config, {"input_ids": torch.tensor(
        [[250] * 64])}, image.size, box)
    scores = result.scores
    assert scores[1, 2] == pytest.approx(6 / len(region))
    assert divmod(int(scores.argmax()), 4) == (1, 2)
    assert float(scores.flatten().topk(2).values[1]) < float(scores[1, 2])


@pytest.mark.parametrize("version", ["2", "2.5", "3", "onevision",
                                     "internvl"])
def test_chase_run_writes_the_authors_format_and_resumes(tmp_path, version):
    generate_ocr_images(tmp_path / "data", 3, seed=2, size=(224, 168))
    if version == "onevision":  # LLaVA-OneVision, under the same folder name
        checkpoints.save_tiny_llava_onevision(tmp_path / "qwen", num_layers=3,
                                              num_heads=4, num_kv_heads=2)
    elif version == "internvl":  # InternVL3, likewise
        checkpoints.save_tiny_internvl(tmp_path / "qwen", num_layers=3,
                                       num_heads=4, num_kv_heads=2)
    else:
        checkpoints.save_tiny_qwen2_vl(tmp_path / "qwen", version=version)
    model, processor = load_model(str(tmp_path / "qwen"), "cpu")
    out = tmp_path / "scores" / "qwen.json"
    first = chase(model, processor, tmp_path / "data", out, max_images=2,
                  max_new_tokens=4, save_every=1, model_name="tiny-qwen",
                  progress=False)
    assert list(first)[:3] == ["0-0", "0-1", "0-2"] and len(first) == 3 * 4
    assert all(len(v) == 2 for v in first.values())
    meta = json.loads((tmp_path / "scores" / "qwen.meta.json").read_text())
    assert meta["images"] == ["00000.png", "00001.png"]
    assert meta["model"] == "tiny-qwen" and meta["tool"].startswith("vllm-sparsemm")
    again = chase(model, processor, tmp_path / "data", out, max_new_tokens=4,
                  progress=False)  # resumes: only the third image is new
    assert all(len(v) == 3 for v in again.values())
    assert [v[:2] for v in again.values()] == list(first.values())
    if any(x > 0 for v in again.values() for x in v):
        assert load_head_scores(out).shape == (3, 4)


def test_cli_plots_the_shipped_scores(tmp_path):
    from vllm_sparsemm.tools.cli import main
    out = tmp_path / "vicuna.png"
    assert main(["plot", "head_scores/llava-v1.6-vicuna-7b.json", "--out",
                 str(out), "--budget", "64"]) == 0
    image = Image.open(out)
    assert image.size[0] > 1000 and image.format == "PNG"


def test_cli_chase_generates_data_and_scores(tmp_path, capsys):
    from vllm_sparsemm.tools.cli import main
    checkpoints.save_tiny_llava(tmp_path / "llava")
    assert main(["chase", "--model", str(tmp_path / "llava"), "--data",
                 str(tmp_path / "data"), "--out", str(tmp_path / "s.json"),
                 "--generate", "2", "--max-new-tokens", "3",
                 "--device", "cpu"]) == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    assert len(scores) == 3 * 4 and all(len(v) == 2 for v in scores.values())
    assert "wrote" in capsys.readouterr().out


def test_chase_with_random_weights_on_a_weightless_llava_15_folder(tmp_path,
                                                                   capsys):
    """The timing mode: a real LLaVA-1.5 layout (576 image tokens), no weights."""
    from vllm_sparsemm.tools.cli import main
    folder = checkpoints.write_dummy_llava_15_7b(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"].update(hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=4)  # keep CPU time small
    config["vision_config"].update(hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2)
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["chase", "--model", str(folder), "--data", str(tmp_path / "d"),
                 "--out", str(tmp_path / "s.json"), "--generate", "2",
                 "--max-new-tokens", "2", "--device", "cpu",
                 "--random-weights"]) == 0
    assert "2 images" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "s.json").read_text())) == 2 * 4
