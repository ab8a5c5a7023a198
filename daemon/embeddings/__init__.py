"""Model servers for embedding models and cross-encoder rerankers: one process per model
(`process`), run by the wrapper like a chat model's server and reached only through the relay.

It serves sentence-transformers bi-encoders (BERT, RoBERTa, XLM-R: all-MiniLM, bge, bge-m3, e5),
decoder embedding models (Qwen3-Embedding, gte-Qwen2; quantized MLX folders too) and BERT/XLM-R
cross-encoders (ms-marco-MiniLM, bge-reranker); `mlxgate.model_kinds` says which a folder holds.

    POST /v1/embeddings  {"input": str | [str] | [int] | [[int]], "model"?,
                          "encoding_format"?: "float" | "base64", "dimensions"?: N,
                          "input_type"?: "query" | "document" (the model's sentence-transformers prompt),
                          "truncate"?: bool | "NONE" | "END" | "START", "truncate_prompt_tokens"?: N | -1}
      -> {"object": "list", "model", "data": [{"object": "embedding", "index", "embedding": [float] | base64}],
          "usage": {"prompt_tokens", "total_tokens"}}
    POST /v1/rerank (also /rerank, /v2/rerank)
                         {"query": str, "documents": [str | {"text": str}], "top_n"?: N,
                          "return_documents"?: bool (default true), "truncate"?: (default true),
                          "max_tokens_per_doc"?: N}
      -> {"id", "model", "results": [{"index", "relevance_score", "document"?: {"text"}}] (best first),
          "usage": {"prompt_tokens", "total_tokens"}}
    GET /health -> {"status": "ok", "model", "kind", "pooling", "dimensions", "window", ...}
    GET /mlxgate/alive -> {"generation", "idle_s", "queued", "batches", ..., "mlx_active", "mlx_cache", "mlx_peak"}

Vectors are L2-normalised float32; base64 is their little-endian bytes. `dimensions` shortens them
(and normalises again) only for a model trained for it (`matryoshka_dimensions` or `is_matryoshka`
in config.json). An input longer than the model's window is refused (400 `context_length_exceeded`
naming the item) unless truncation is asked for. Rerank scores are a cross-encoder's (through a
sigmoid unless the model says Identity), or for an embedding model the cosine of the query's vector
(with the query prompt) and each document's. Errors are OpenAI's `{"error": {"message", "type",
"param", "code"}}`: 400 for a request the model cannot serve, 403 without the secret, 413 for a body
over 64 MiB, 500 when the model fails.
"""
