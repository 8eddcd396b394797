"""Stream an answer from tokenwire with the official ``openai`` SDK: only ``base_url`` changes.

Start a server (``tokenwire serve --provider scripted`` needs no model), then run
``python examples/openai_sdk.py [http://127.0.0.1:8000/v1]``. ``api_key`` is one of the server's
keys, or any string when it has none.
"""

import sys

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/v1", api_key="unused")
stream = client.chat.completions.create(
    model="any",  # the server's model; with a routes file, one of those GET /v1/models lists
    messages=[{"role": "user", "content": "Say hello in five words."}],
    stream=True,
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
