"""Structured output: the model server holds an answer to a JSON Schema, any JSON object, or valid
tool calls, by masking at every step the tokens a grammar (llguidance) does not allow.

What the model server reads in an OpenAI chat body (the relay translates the other APIs into it):

- `response_format: {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`: the
  answer is one JSON value valid under `schema`, whatever `strict` says (there is no
  best-effort mode). `{"type": "json_object"}`: any JSON object. `{"type": "text"}`: free.
- `tools[i].function.strict: true`: a call of that tool has arguments valid under its
  `parameters`; a call of a tool that is not strict has any JSON object as arguments.
- `tool_choice: "required"`: the answer is tool calls only (one, if `parallel_tool_calls` is
  false); `{"type": "function", "function": {"name": N}}`: calls of N only; `"auto"` (the
  default): with a strict tool, free text whose every `<tool_call>` is held to a valid call;
  with `response_format` too, the answer is JSON or tool calls. `"none"`: tools are not held.

The JSON is written as json.dumps writes it (", " and ": ", no other whitespace); once the
grammar is complete only end tokens are allowed (finish_reason "stop", or "tool_calls"). A
prompt that leaves the model inside a reasoning block keeps the reasoning free; the grammar
holds the text after it. Tool calls are held for models whose calls are mlx_lm `json_tools`
calls (Qwen2.5/Hermes `<tool_call>` JSON); for other models they are not held (logged).

Refused with 400 (`UnsupportedSchema`, code "unsupported_schema_feature", naming the keyword and
where it is): uniqueItems, contains / minContains / maxContains, propertyNames,
dependentRequired, dependentSchemas, not, if/then/else, unevaluatedProperties / Items,
$dynamicRef, a oneOf whose branches cannot be proven disjoint, a format llguidance does not know,
a $ref outside the schema, a pattern with look-around or backreferences. `InvalidSchema` (code
"invalid_schema"): not a JSON Schema, a $ref to nothing, a schema no value matches. Refusals come
before anything is queued (the relay can refuse before it streams: `schemas.check_request`).

`schemas`: what a body asks for and whether it can be held (no MLX). `decoding`: the grammar and
the logits processor (MLX). `serve`: the patch of mlx_lm.server.
"""
