"""Ask a running ``vllm serve ... --attention-backend sparsemm`` about an image.

    python examples/openai_chat_client.py --port 8000 --image photo.jpg
"""

import argparse
import base64
import io

import numpy as np
from openai import OpenAI
from PIL import Image


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--image", help="image file (default: random pixels)")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    image = (Image.open(args.image).convert("RGB") if args.image else
             Image.fromarray((np.random.default_rng(0).random((336, 448, 3))
                              * 255).astype(np.uint8)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    client = OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="none")
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model, max_tokens=args.max_tokens, temperature=0,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "What is in this picture?"}]}])
    print(reply.choices[0].message.content)
    print(reply.usage)


if __name__ == "__main__":
    main()
