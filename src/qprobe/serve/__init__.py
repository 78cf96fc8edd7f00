"""`qprobe serve`: the Q-probe policy behind an OpenAI-compatible HTTP API.

    qprobe serve --probe default-code --port 8000
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")
    client.chat.completions.create(model="default-code", messages=[...],
                                   extra_body={"qprobe": {"k": 8, "return_candidates": True}})

An answer is the policy's pick among k samples (section 4.1: sample k, score each with the probe,
pick by softmax(Q/beta)); `n` picks are made from n independent sets of k samples.

- `protocol`: the request bodies (OpenAI's fields, the `qprobe` extension object), validated into a
  `PolicyRequest`; every bad request is a `RequestError` (a 4xx in OpenAI's error shape).
- `engine`: one worker thread that owns the back-end, its pool (`qprobe.generation.base`) and the
  embedder; requests wait in a bounded queue (full: 429 with Retry-After) and are cancelled when
  their client goes away.
- `responses`: the JSON bodies and the server-sent-event chunks of the answers.
- `app`: the ASGI application (starlette; run by uvicorn).
"""
