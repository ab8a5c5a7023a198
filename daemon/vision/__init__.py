"""Images in the three APIs, answered by vision-language models (docs/vision.md).

- `images`: the gateway's side. Every API's image (an Anthropic `image` block, an OpenAI
  `image_url` part, a Responses `input_image`) is translated once into an OpenAI `image_url`
  part; `resolve` then turns each into a checked data URL (media type sniffed from the
  bytes, size, count and pixel caps; http(s) URLs fetched with a timeout and a size cap,
  never from loopback, link-local or private addresses unless `image_fetch_allow` says so).
- `tokens`: how many prompt tokens an image becomes for a model, from its width and height
  and the model's processor config (the same `max_pixels` cap the model server applies).
- `process`: the entry of a vision model's server, mlx-vlm's generation API behind the
  model-process contract (secret on stdin, dies with its parent, `GET /mlxgate/alive`),
  answering OpenAI chat completions in `mlx_lm.server`'s chunk format.
"""
