"""Embedding and reranker models: which kind a folder holds, the engine's vectors and scores, the
batch worker's batches, and real model server processes started the way the wrapper starts them,
used with the official `openai` SDK and plain HTTP. The models are the tiny ones
`mlxgate.demo_embedding` builds."""

from __future__ import annotations

import base64
import http.client
import json
import threading
import time
from pathlib import Path

import numpy as np
import openai
import pytest
import requests

from mlxgate import demo_embedding
from mlxgate.embeddings.batcher import Batcher, Job, Pending, form_batch
from mlxgate.embeddings.engine import Engine, Refused, Sequence
from mlxgate.embeddings.entry import READINESS_PROBE
from mlxgate.embeddings.server import MAX_BODY, error_answer
from mlxgate.model_kinds import CHAT, DECODER, EMBEDDING, ENCODER, RERANKER, UNSUPPORTED, kind_of
from mlxgate.net import port_in_use
from mlxgate.wrapper.server_process import launch

TEXTS = ["Paris is the capital of France.", "a dog", "Search engines retrieve relevant passages for a question. " * 3]
LONG = "the quick brown fox " * 100  # over the tiny BERT's 128-token window
PORTS = iter(range(12800, 12900))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("embedding-models")
    return {kind: demo_embedding.build(root / kind, kind) for kind in demo_embedding.BUILDERS}


@pytest.fixture(scope="module")
def engines(tiny) -> dict[str, Engine]:
    return {kind: Engine.load(folder) for kind, folder in tiny.items()}


# ---------------------------------------------------------------- which kind a folder holds
def folder(root: Path, config: dict | None, **files) -> Path:
    """A folder of small files only: config.json and `files` ("1_Pooling__config.json" -> 1_Pooling/config.json)."""
    root.mkdir()
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    for name, content in files.items():
        path = root / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))
    return root


ST = {"modules.json": demo_embedding.ST_MODULES}
CLS_POOLING = {"1_Pooling__config.json": {"word_embedding_dimension": 8, "pooling_mode_cls_token": True}}
LAST_POOLING = {"1_Pooling__config.json": {"word_embedding_dimension": 8, "pooling_mode_lasttoken": True}}
QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}
SHAPES = [
    # (like, config, files, kind, backbone, pooling)
    ("bge-m3", {"architectures": ["XLMRobertaModel"], "model_type": "xlm-roberta"}, {**ST, **CLS_POOLING},
     EMBEDDING, ENCODER, "cls"),
    ("gte-Qwen2", {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, {**ST, **LAST_POOLING},
     EMBEDDING, DECODER, "lasttoken"),
    ("Qwen3-Embedding", QWEN3, {**ST, **LAST_POOLING}, EMBEDDING, DECODER, "lasttoken"),
    ("Qwen3-Reranker as published", QWEN3, {}, CHAT, None, None),
    ("a chat model", {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, {}, CHAT, None, None),
    ("a bare XLM-R encoder", {"architectures": ["XLMRobertaModel"], "model_type": "xlm-roberta"}, {},
     EMBEDDING, ENCODER, "mean"),
    ("bge-reranker", {"architectures": ["XLMRobertaForSequenceClassification"], "model_type": "xlm-roberta",
                      "id2label": {"0": "LABEL_0"}}, {}, RERANKER, ENCODER, None),
    ("a sentence-transformers 5 CrossEncoder", QWEN3, {"config_sentence_transformers.json": {
        "model_type": "CrossEncoder"}}, RERANKER, DECODER, None),
    ("an NLI classifier", {"architectures": ["BertForSequenceClassification"], "model_type": "bert",
                           "num_labels": 3}, {}, UNSUPPORTED, None, None),
    ("a masked LM", {"architectures": ["BertForMaskedLM"], "model_type": "bert"}, {}, UNSUPPORTED, None, None),
    ("CLIP", {"architectures": ["CLIPModel"], "model_type": "clip"}, {}, UNSUPPORTED, None, None),
    ("no config.json", None, {}, UNSUPPORTED, None, None),
]


@pytest.mark.parametrize("like, config, files, kind, backbone, pooling", SHAPES, ids=[s[0] for s in SHAPES])
def test_a_folder_shaped_like_a_published_model_gets_its_kind(tmp_path, like, config, files, kind, backbone,
                                                              pooling):
    found = kind_of(folder(tmp_path / "model", config, **files))
    assert (found.kind, found.backbone, found.pooling) == (kind, backbone, pooling), found.reason


def test_the_tiny_folders_are_an_encoder_embedding_a_cross_encoder_and_a_decoder_embedding(tiny):
    assert [(k.kind, k.backbone, k.pooling) for k in map(kind_of, tiny.values())] == [
        (EMBEDDING, ENCODER, "mean"), (RERANKER, ENCODER, None), (EMBEDDING, DECODER, "lasttoken")]


def test_a_bert_of_a_chosen_shape_is_built_and_served_at_its_width(tmp_path):
    built = demo_embedding.build(tmp_path / "wider", "embedding", seed=3, hidden=96, layers=3)
    config = json.loads((built / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (96, 3, 384)
    vectors = Engine.load(built).run(Engine.load(built).encode_texts(TEXTS[:2]))
    assert vectors.shape == (2, 96) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="always hidden 64"):
        demo_embedding.build(tmp_path / "decoder", "decoder-embedding", hidden=96)
    with pytest.raises(ValueError, match="a multiple of 16 up to 64 or of 32 above it"):
        demo_embedding.build(tmp_path / "odd", "embedding", hidden=176)


def test_the_model_entry_can_say_what_the_files_do_not_and_nothing_else(tmp_path):
    published = folder(tmp_path / "qwen3-reranker", QWEN3)
    assert kind_of(published).kind == CHAT
    overridden = kind_of(published, override=RERANKER)
    assert (overridden.kind, overridden.backbone, overridden.reason) == (
        RERANKER, DECODER, "the model entry says kind: reranker")
    with pytest.raises(ValueError, match="kind 'vector' is not one of chat, embedding, reranker, vision, unsupported"):
        kind_of(published, override="vector")


# ---------------------------------------------------------------- the engine
@pytest.mark.parametrize("kind", ["embedding", "decoder-embedding"])
def test_a_padded_batch_gives_each_input_the_normalised_vector_it_gets_alone(engines, kind):
    engine = engines[kind]
    seqs = engine.encode_texts(TEXTS)
    assert len({len(s.ids) for s in seqs}) == 3, "rows of three lengths: two of them padded"
    together = engine.run(seqs)
    for row, seq in enumerate(seqs):
        assert np.abs(together[row] - engine.run([seq])[0]).max() < 1e-5
    assert np.allclose(np.linalg.norm(together, axis=1), 1, atol=1e-5)


def test_matryoshka_dimensions_are_the_first_ones_normalised_again(engines):
    engine = engines["decoder-embedding"]
    full = engine.run(engine.encode_texts(TEXTS))
    short = engine.shorten(full, engine.check_dimensions(16))
    assert short.shape == (3, 16) and np.allclose(np.linalg.norm(short, axis=1), 1, atol=1e-6)
    assert np.allclose(short, full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True), atol=1e-6)
    with pytest.raises(Refused, match=r"dimensions=20 is not offered; this model offers \[16, 32, 64\]"):
        engine.check_dimensions(20)
    bert = engines["embedding"]
    assert bert.check_dimensions(64) is None, "its own size is no shortening"
    with pytest.raises(Refused, match="not trained for shorter ones") as refused:
        bert.check_dimensions(32)
    assert refused.value.param == "dimensions"


def test_an_embedding_model_reranks_by_the_cosine_of_query_and_document(engines):
    engine = engines["embedding"]
    query, documents = "capital of France", ["a dog", "capital of France", "Paris is the capital of France."]
    scores = engine.rerank_scores(engine.run(engine.rerank_inputs(query, documents)))
    vectors = engine.run(engine.encode_texts([query, *documents]))
    assert np.allclose(scores, vectors[1:] @ vectors[0], atol=1e-5)
    assert int(np.argmax(scores)) == 1 and scores[1] == pytest.approx(1.0, abs=1e-5)


def test_a_cut_input_keeps_its_special_tokens_and_an_uncut_one_is_refused_by_name(engines):
    engine = engines["embedding"]
    length = len(engine.template.content([LONG])[0]) + 2  # [CLS] and [SEP]
    with pytest.raises(Refused, match=rf"input\[1\] is {length} tokens long; this model's window is 128") as refused:
        engine.encode_texts(["short", LONG])
    assert (refused.value.kind, refused.value.param) == ("context_length_exceeded", "input")
    for truncate in ("end", "start"):
        ids = engine.encode_texts([LONG], truncate=truncate)[0].ids
        assert len(ids) == 128 and (ids[0], ids[-1]) == (2, 3), "[CLS] ... [SEP]"


# ---------------------------------------------------------------- the batch worker
def rows(*lengths: int) -> Job:
    return Job([Sequence([1] * n) for n in lengths])


def test_a_small_request_behind_a_big_one_gets_into_the_next_batch():
    big, small = rows(*[8] * 100), rows(8)
    pool = [Pending(big, list(range(100))), Pending(small, [0])]
    batch = form_batch(pool, max_tokens=8192, max_rows=16)
    assert len(batch) == 16 and (small, 0) in batch
    assert [p.job for p in pool] == [big] and len(pool[0].rows) == 85


def test_a_batch_takes_rows_of_the_first_ones_length_within_its_token_budget():
    job = rows(10, 100, 12, 90, 11, 500)
    pool = [Pending(job, list(range(6)))]
    assert [row for _, row in form_batch(pool, max_tokens=40, max_rows=64)] == [0, 2, 4], "3 x 12 tokens"
    assert [row for _, row in form_batch(pool, max_tokens=200, max_rows=64)] == [1, 3]
    assert [row for _, row in form_batch(pool, max_tokens=200, max_rows=64)] == [5], "too long for any budget: alone"
    assert pool == []


def wait_for(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_requests_that_arrive_while_a_batch_runs_share_the_next_one():
    first_runs, batches = threading.Event(), []

    def run(seqs):
        batches.append(len(seqs))
        if len(batches) == 1:
            first_runs.wait(5)
        return np.array([[len(s.ids)] for s in seqs], dtype=np.float32)

    batcher = Batcher(run)
    answers = {}

    def ask(n):
        answers[n] = batcher.submit([Sequence([1] * n)])

    threads = [threading.Thread(target=ask, args=(n,)) for n in (1, 2, 3, 4)]
    threads[0].start()
    wait_for(lambda: batches == [1])
    for thread in threads[1:]:
        thread.start()
    wait_for(lambda: batcher.queue.qsize() == 3)
    first_runs.set()
    for thread in threads:
        thread.join(5)
    assert batches == [1, 3] and {n: float(a[0][0]) for n, a in answers.items()} == {1: 1, 2: 2, 3: 3, 4: 4}
    report = batcher.report()
    assert (report["generation"], report["batches"], report["rows"], report["largest_batch"]) == (True, 2, 4, 3)


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on():
    def run(seqs):
        if any(len(s.ids) == 13 for s in seqs):
            raise MemoryError("out of memory")
        return np.ones((len(seqs), 2), dtype=np.float32)

    batcher = Batcher(run)
    with pytest.raises(MemoryError):
        batcher.submit([Sequence([1] * 13), Sequence([1] * 13)])
    assert batcher.submit([Sequence([1] * 5)]).shape == (1, 2)
    status, body = error_answer(MemoryError("out of memory"))
    assert status == 500 and body == {"error": {"message": "the model failed: MemoryError: out of memory",
                                                "type": "server_error", "param": None, "code": None}}


# ---------------------------------------------------------------- the model server processes
class Served:
    """A model server started as the wrapper starts it (`launch`: the secret on a stdin pipe)."""

    def __init__(self, model: Path, log: Path):
        self.port = next(p for p in PORTS if not port_in_use(p))
        self.process = launch(model, self.port, log, entry=("-m", "mlxgate.embeddings.entry"))
        self.base = f"http://127.0.0.1:{self.port}"
        self.auth = {"Authorization": self.process.auth_header}

    def wait_until_ready(self, timeout: float = 60) -> None:
        """Until the readiness probe is answered 200 (the port opens only once the model has loaded)."""
        path, probe = READINESS_PROBE
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.alive(), f"the server exited: {self.process.log_tail()}"
            assert time.monotonic() < deadline, f"not ready after {timeout} s: {self.process.log_tail()}"
            try:
                response = requests.post(self.base + path, json=probe, headers=self.auth, timeout=10)
                assert response.status_code == 200, response.text
                return
            except requests.ConnectionError:
                time.sleep(0.05)

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        response = requests.post(self.base + path, json=body, headers=self.auth, timeout=30)
        return response.status_code, response.json()

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=self.process.secret, max_retries=0)


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory) -> dict[str, Served]:
    """A server for each tiny model, started together."""
    logs = tmp_path_factory.mktemp("embedding-logs")
    servers = {kind: Served(folder, logs / f"{kind}.log") for kind, folder in tiny.items()}
    try:
        for server in servers.values():
            server.wait_until_ready()
        yield servers
    finally:
        for server in servers.values():
            server.process.stop()


def test_without_the_secret_every_route_is_refused(served):
    server = served["embedding"]
    for method, path in (("GET", "/health"), ("GET", "/mlxgate/alive"), ("POST", "/v1/embeddings")):
        response = requests.request(method, server.base + path, json={"input": "x"}, timeout=10,
                                    headers={"Authorization": "Bearer guessed"})
        assert response.status_code == 403 and response.json()["error"]["type"] == "permission_error"
    report = server.process.alive_report()
    assert report["generation"] is True and report["idle_s"] < 5 and report["mlx_active"] > 0


def test_the_openai_sdk_gets_the_same_vectors_as_base64_and_as_floats(served, engines):
    client = served["embedding"].client()
    decoded = client.embeddings.create(model="tiny-bert", input=TEXTS)  # the SDK asks for base64 and decodes it
    floats = client.embeddings.create(model="tiny-bert", input=TEXTS, encoding_format="float")
    raw = client.embeddings.create(model="tiny-bert", input=TEXTS, encoding_format="base64")
    want = engines["embedding"].run(engines["embedding"].encode_texts(TEXTS))
    as_floats = np.array([d.embedding for d in floats.data], dtype=np.float32)  # JSON's shortest float32 digits
    assert np.allclose(as_floats, want, atol=1e-6)
    assert np.array_equal(np.array([d.embedding for d in decoded.data], dtype=np.float32), as_floats)
    assert np.array_equal([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in raw.data],
                          as_floats), "asked for explicitly, base64 is handed back as is"
    tokens = sum(len(s.ids) for s in engines["embedding"].encode_texts(TEXTS))
    assert (floats.model, floats.usage.prompt_tokens, floats.usage.total_tokens) == ("tiny-bert", tokens, tokens)


def test_dimensions_are_refused_naming_the_field_where_the_model_was_not_trained_for_them(served):
    with pytest.raises(openai.BadRequestError, match="not trained for shorter ones") as refused:
        served["embedding"].client().embeddings.create(model="m", input="hello", dimensions=32)
    assert (refused.value.status_code, refused.value.param) == (400, "dimensions")
    short = served["decoder-embedding"].client().embeddings.create(model="m", input="hello", dimensions=16)
    assert len(short.data[0].embedding) == 16 and np.linalg.norm(short.data[0].embedding) == pytest.approx(1)


def test_an_over_long_input_is_refused_by_name_unless_truncation_is_asked_for(served, engines):
    client = served["embedding"].client()
    length = len(engines["embedding"].template.content([LONG])[0]) + 2
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="m", input=["short", LONG])
    error = refused.value.body
    assert (error["code"], error["param"]) == ("context_length_exceeded", "input")
    assert error["message"].startswith(f"input[1] is {length} tokens long; this model's window is 128 tokens")
    cut = client.embeddings.create(model="m", input=LONG, extra_body={"truncate": True})
    assert cut.usage.prompt_tokens == 128
    cut = client.embeddings.create(model="m", input=LONG, extra_body={"truncate_prompt_tokens": 16})
    assert cut.usage.prompt_tokens == 16


def test_rerank_answers_the_best_documents_first_with_top_n(served, engines):
    documents = ["a dog", "Paris is the capital of France.", {"text": "Berlin is the capital of Germany."}]
    status, answer = served["reranker"].post("/v1/rerank", {"query": "what is paris", "documents": documents,
                                                             "top_n": 2})
    engine = engines["reranker"]
    texts = ["a dog", "Paris is the capital of France.", "Berlin is the capital of Germany."]
    want = engine.rerank_scores(engine.run(engine.rerank_inputs("what is paris", texts)))
    best = [int(i) for i in np.argsort(-want)[:2]]
    assert status == 200 and [r["index"] for r in answer["results"]] == best
    assert [r["relevance_score"] for r in answer["results"]] == pytest.approx(want[best], abs=1e-6)
    assert all(0 < r["relevance_score"] < 1 for r in answer["results"]), "a cross-encoder's sigmoid"
    assert answer["results"][0]["document"] == {"text": texts[best[0]]}
    status, answer = served["reranker"].post("/v2/rerank", {"query": "q", "documents": ["a"],
                                                             "return_documents": False})
    assert status == 200 and list(answer["results"][0]) == ["index", "relevance_score"]
    status, answer = served["reranker"].post("/v1/embeddings", {"input": "x"})
    assert status == 400 and "cross-encoder reranker" in answer["error"]["message"]


def test_a_body_over_the_limit_is_refused_unread(served):
    connection = http.client.HTTPConnection("127.0.0.1", served["embedding"].port, timeout=10)
    connection.putrequest("POST", "/v1/embeddings")
    connection.putheader("Authorization", served["embedding"].process.auth_header)
    connection.putheader("Content-Length", str(MAX_BODY + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and response.getheader("Connection") == "close"
    assert json.loads(response.read())["error"]["code"] == "request_too_large"
    connection.close()


def test_the_process_exits_when_its_stdin_closes(tiny, tmp_path):
    server = Served(tiny["embedding"], tmp_path / "server.log")
    server.wait_until_ready()
    server.process.popen.stdin.close()  # what the wrapper's exit does, however it exits
    assert server.process.popen.wait(10) == -9
