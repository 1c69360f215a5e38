"""Ask a vLLM server running sparsemm about an image, with the OpenAI client.

    bash examples/serve.sh llava-hf/llava-v1.6-vicuna-7b-hf  # in another shell
    python examples/openai_client.py --image photo.jpg
    python examples/openai_client.py --image-url https://example.com/cat.png \
        --stream --budget 128

The image goes as a URL (the server fetches it) or as a base64 data URL
(a local file, or random pixels by default). ``--budget`` sets this
request's own SparseMM budget through vLLM's ``vllm_xargs`` (``off``: no
compression for it).
"""

from __future__ import annotations

import argparse
import base64
import io
import sys


def image_part(url: str | None = None, path: str | None = None) -> dict:
    """An ``image_url`` content part: the URL as given, or the image (a
    file, else random pixels) inline as a base64 data URL."""
    if url is None:
        from PIL import Image
        if path is not None:
            image = Image.open(path).convert("RGB")
        else:
            import numpy as np
            pixels = np.random.default_rng(0).random((336, 448, 3)) * 255
            image = Image.fromarray(pixels.astype(np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(
            buffer.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def chat_request(model: str, question: str, image: dict, max_tokens: int,
                 stream: bool, budget: str | None) -> dict:
    """The keyword arguments of ``client.chat.completions.create``."""
    request = {
        "model": model, "max_tokens": max_tokens, "temperature": 0,
        "stream": stream,
        "messages": [{"role": "user", "content": [
            image, {"type": "text", "text": question}]}]}
    if budget is not None:  # this request's own budget (vLLM's vllm_xargs)
        value = budget if budget == "off" else int(budget)
        request["extra_body"] = {"vllm_xargs": {"sparsemm_budget": value}}
    return request


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--image", help="an image file, sent as base64 "
                        "(default: random pixels)")
    source.add_argument("--image-url", help="an image URL the server fetches")
    parser.add_argument("--question", default="What is in this picture?")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--stream", action="store_true",
                        help="print the answer as it arrives")
    parser.add_argument("--budget", default=None,
                        help="this request's SparseMM budget, or off "
                        "(default: the server's)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    import openai
    args = parse_args(argv)
    client = openai.OpenAI(base_url=args.base_url, api_key="none")
    try:
        model = client.models.list().data[0].id
        request = chat_request(model, args.question,
                               image_part(args.image_url, args.image),
                               args.max_tokens, args.stream, args.budget)
        reply = client.chat.completions.create(**request)
        if args.stream:
            for chunk in reply:
                if chunk.choices and chunk.choices[0].delta.content:
                    print(chunk.choices[0].delta.content, end="", flush=True)
            print()
        else:
            print(reply.choices[0].message.content)
            print(reply.usage)
    except openai.APIConnectionError:
        print(f"openai_client.py: no server at {args.base_url}: start one "
              f"with `bash examples/serve.sh MODEL`", file=sys.stderr)
        return 2
    except openai.APIStatusError as e:  # e.g. a bad budget: HTTP 400
        message = e.body.get("message") if isinstance(e.body, dict) else e
        print(f"openai_client.py: the server refused the request "
              f"({e.status_code}): {message}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"openai_client.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
