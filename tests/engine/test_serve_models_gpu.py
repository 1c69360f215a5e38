"""`vllm serve` of each 7B/8B-shaped model folder the plugin supports (real
config, dummy weights) under sparsemm, answering an OpenAI image chat: the
server starts, the image is in the prompt, and the prompt is compressed.
Score files as the serve benchmark picks them (``sparsemm_defaults``). vLLM's
default compile mode, with a fixed KV pool and few CUDA-graph sizes, so that
several of these servers and the small engine tests share one GPU
(tests/gpu/run_all.sh ``JOBS``)."""

import json

import pytest

from scripts import load_script
from serving import (SEVEN_B_POOL, after_compressions, fixed_pool,
                     image_data_url, late_sparsemm_builds, post, serve_log,
                     served)

pytestmark = pytest.mark.gpu

serve_matrix = load_script("serve_matrix")
QUESTION = "Describe this picture in detail: its colours and its shapes."


@pytest.mark.parametrize("name", sorted(serve_matrix.MODELS))
def test_each_model_folder_serves_an_image_chat(tmp_path, name):
    _, model = serve_matrix.model_folder(name, tmp_path)
    settings = {"budget": 64, **serve_matrix.sparsemm_defaults(model)}
    with served(model, "--load-format", "dummy", "--attention-backend",
                "sparsemm", "--additional-config",
                json.dumps({"sparsemm": settings}), "--max-model-len", "4096",
                *fixed_pool(SEVEN_B_POOL), "--max-num-seqs", "16",
                "--served-model-name", "m",
                log_path=serve_log(tmp_path, f"_{name}")) as server:
        reply = post(f"{server.url}/v1/chat/completions", {
            "model": "m", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(1)}},
                {"type": "text", "text": QUESTION}]}]})
        prompt = reply["usage"]["prompt_tokens"]
        text_only = post(f"{server.url}/v1/chat/completions", {
            "model": "m", "max_tokens": 1, "messages": [
                {"role": "user", "content": QUESTION}]})
        counts = after_compressions(server.port, 1)
        kept = counts["vllm:sparsemm_prompt_tokens_kept_total"]
        print(f"served: {name}: prompt {prompt} tokens, kept {kept:.1f} "
              f"per head")
        assert reply["usage"]["completion_tokens"] == 8
        assert isinstance(reply["choices"][0]["message"]["content"], str)
        # the image's tokens are in the prompt, and more than B of them
        assert prompt - text_only["usage"]["prompt_tokens"] > 64
        assert 0 < kept < prompt
        assert not late_sparsemm_builds(server.log_text())
