"""Embeddings and reranking through the gateway, as a user meets them: the official OpenAI SDK
(floats, base64, `dimensions`), LangChain's OpenAIEmbeddings, a reranker in the Cohere / Jina
shape, OpenAI's embedding names served by `embedding_model`, the wrong kind of model refused
with a 400 that says which route serves it, and every answer the same as the model's own
engine gives in-process.

One daemon for the module (HTTP only): default model tiny-a, and beside it a BERT embedding
model (`embedding_model`), Qwen3-Embedding's layout (Matryoshka dimensions) and a cross-encoder,
built offline by `mlxgate demo-model --kind`.
"""

from __future__ import annotations

import base64
import os
import shutil

import httpx
import numpy as np
import openai
import pytest

from support import Gateway, gpt, mlxgate

TEXTS = ["The cat sat on the mat.", "A dog barked at the mailman.", "def add(a, b): return a + b"]


@pytest.fixture(scope="module")
def gw(models_dir, tmp_path_factory):
    models = tmp_path_factory.mktemp("embedding-models")
    shutil.copytree(models_dir / "tiny-a", models / "tiny-a")
    env = dict(os.environ)
    for name, kind in (("minilm", "embedding"), ("qwen3-embedding", "decoder-embedding"), ("ms-marco", "reranker")):
        mlxgate("demo-model", str(models / name), "--kind", kind, env=env, check=True)
    running = Gateway(tmp_path_factory.mktemp("embedding-home"), models, "--default-model", "tiny-a", https=False)
    running.models = models
    (running.home / "gateway.yaml").write_text("embedding_model: minilm\n")
    running.start()
    yield running
    running.stop()


def in_process(folder, texts: list[str]) -> np.ndarray:
    """The same model's vectors from its engine in this process (no gateway, no server)."""
    from mlxgate.embeddings.engine import Engine

    engine = Engine.load(folder)
    return engine.shorten(engine.run(engine.encode_texts(texts)), None)


def test_the_openai_sdk_gets_one_vector_per_input_in_order_as_floats_and_as_base64(gw):
    client = gpt(gw)
    floats = client.embeddings.create(model="minilm", input=TEXTS)
    assert [d.index for d in floats.data] == [0, 1, 2] and floats.object == "list"
    vectors = np.array([d.embedding for d in floats.data])
    assert vectors.shape == (3, 64)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5), "normalized, as OpenAI's are"
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > len(TEXTS)
    raw = httpx.post(gw.url + "/v1/embeddings", headers={"Authorization": f"Bearer {gw.api_key}"}, timeout=60,
                     json={"model": "minilm", "input": TEXTS, "encoding_format": "base64"}).json()
    decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]])
    assert np.array_equal(decoded.astype(np.float32), vectors.astype(np.float32))
    # the SDK asks for base64 by default when encoding_format is not given, and decodes it itself
    again = client.embeddings.create(model="minilm", input=TEXTS[0])
    assert np.allclose(again.data[0].embedding, vectors[0], atol=1e-6)


def test_the_vectors_are_the_engines_own(gw):
    served = np.array([d.embedding for d in gpt(gw).embeddings.create(model="minilm", input=TEXTS).data])
    local = in_process(gw.models / "minilm", TEXTS)
    assert np.max(np.abs(served - local)) < 1e-5


def test_openai_embedding_names_go_to_the_embedding_model(gw):
    named = gpt(gw).embeddings.create(model="text-embedding-3-small", input=TEXTS[:1])
    direct = gpt(gw).embeddings.create(model="minilm", input=TEXTS[:1])
    assert named.data[0].embedding == direct.data[0].embedding
    assert named.model == "text-embedding-3-small"


def test_matryoshka_dimensions_are_served_and_others_refused_naming_the_ones_there_are(gw):
    short = gpt(gw).embeddings.create(model="qwen3-embedding", input=TEXTS, dimensions=32)
    vectors = np.array([d.embedding for d in short.data])
    assert vectors.shape == (3, 32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    with pytest.raises(openai.BadRequestError) as refused:
        gpt(gw).embeddings.create(model="qwen3-embedding", input=TEXTS, dimensions=24)
    assert "dimensions" in str(refused.value) and "16" in str(refused.value) and "32" in str(refused.value)
    with pytest.raises(openai.BadRequestError) as refused:
        gpt(gw).embeddings.create(model="minilm", input=TEXTS, dimensions=32)
    assert "dimensions" in str(refused.value)


def test_langchain_embeds_documents_and_queries(gw, tmp_path):
    pytest.importorskip("langchain_openai", reason="pip install langchain-openai to run it")
    from langchain_openai import OpenAIEmbeddings

    embedder = OpenAIEmbeddings(model="minilm", base_url=gw.url + "/v1", api_key=gw.api_key,
                                check_embedding_ctx_length=False)  # its tiktoken split is for OpenAI's models
    documents = embedder.embed_documents(TEXTS)
    query = embedder.embed_query(TEXTS[0])
    assert len(documents) == 3 and len(documents[0]) == 64
    assert np.allclose(query, documents[0], atol=1e-6)


def test_a_reranker_orders_documents_in_the_cohere_and_jina_shape(gw):
    documents = ["Paris is the capital of France.", "Bananas are yellow.", {"text": "France borders Spain."}]
    answer = httpx.post(gw.url + "/v1/rerank", headers={"Authorization": f"Bearer {gw.api_key}"}, timeout=60,
                        json={"model": "ms-marco", "query": "capital of France", "documents": documents,
                              "top_n": 2, "return_documents": True}).json()
    results = answer["results"]
    assert len(results) == 2
    assert results[0]["relevance_score"] >= results[1]["relevance_score"]
    assert {r["index"] for r in results} <= {0, 1, 2}
    texts = [d if isinstance(d, str) else d["text"] for d in documents]
    assert all(r["document"]["text"] == texts[r["index"]] for r in results)
    everything = httpx.post(gw.url + "/v2/rerank", headers={"Authorization": f"Bearer {gw.api_key}"}, timeout=60,
                            json={"model": "ms-marco", "query": "capital of France", "documents": texts}).json()
    scores = {r["index"]: r["relevance_score"] for r in everything["results"]}
    assert sorted(scores) == [0, 1, 2]
    assert [r["index"] for r in results] == sorted(scores, key=scores.get, reverse=True)[:2]


def test_the_wrong_kind_of_model_is_a_400_that_names_the_route_that_serves_it(gw):
    with pytest.raises(openai.BadRequestError) as refused:
        gpt(gw).embeddings.create(model="tiny-a", input="x")
    assert "tiny-a" in str(refused.value) and "chat" in str(refused.value)
    with pytest.raises(openai.BadRequestError) as refused:
        gpt(gw).chat.completions.create(model="minilm", messages=[{"role": "user", "content": "hi"}])
    assert "/v1/embeddings" in str(refused.value)
    bad = httpx.post(gw.url + "/v1/embeddings", headers={"Authorization": f"Bearer {gw.api_key}"}, timeout=60,
                     json={"model": "minilm"})
    assert bad.status_code == 400 and bad.json()["error"]["message"].startswith("input:")


def test_mlxgate_ps_shows_the_embedding_models_beside_the_chat_model(gw):
    shown = mlxgate("ps", env=gw.env, check=True).stdout
    assert "minilm" in shown and "tiny-a" in shown, shown
