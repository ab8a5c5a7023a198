"""Images through the gateway, as a user meets them: the Anthropic SDK, the OpenAI SDK (chat and
Responses) send a PNG to a vision model and get an answer; `count_tokens` grows by what the
model's processor makes of the image; URL images are fetched by the gateway, never from
loopback unless `image_fetch_allow` says so; oversize and non-image payloads are 400s in each
API's shape; a text model given an image is a 400 naming the vision model; both are resident
together.

One daemon for the module (HTTP only): default model tiny-a (a text model) and tiny-vl, a tiny
random-weight Qwen2.5-VL built offline by `mlxgate demo-model --vision`. It needs mlx-vlm (the
`vision` extra: `./install.sh --vision`); without it the module is skipped. The unit tests of the
image checks (header sniffing, the address rule) need nothing but the project.
"""

from __future__ import annotations

import base64
import http.server
import json
import importlib.util
import os
import struct
import threading
import zlib

import anthropic
import httpx
import openai
import pytest

from support import Gateway, claude, gpt, ledger_rows, mlxgate

from mlxgate.demo_vision import VISION_ANSWER
from mlxgate.vision import images
from mlxgate.vision.tokens import image_tokens

HAS_VLM = importlib.util.find_spec("mlx_vlm") is not None
needs_vlm = pytest.mark.skipif(not HAS_VLM, reason="mlx-vlm is not installed (the vision extra: ./install.sh --vision)")


def png(width: int, height: int, rgb=(200, 30, 30)) -> bytes:
    """A solid-colour PNG, written by hand (no Pillow needed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\x00" + bytes(rgb) * width
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * height)) + chunk(b"IEND", b""))


PNG = png(64, 64)
PNG_B64 = base64.b64encode(PNG).decode()
DATA_URL = f"data:image/png;base64,{PNG_B64}"


# ------------------------------------------------------------------ units: no daemon
def test_the_header_says_what_an_image_is_and_its_size():
    assert images.sniff(png(300, 120)) == ("image/png", 300, 120)
    assert images.sniff(b"GIF89a" + struct.pack("<HH", 17, 9) + b"\x00" * 8) == ("image/gif", 17, 9)
    jpeg = (b"\xff\xd8\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x00" * 9
            + b"\xff\xc0" + struct.pack(">HBHH", 17, 8, 480, 640) + b"\x03" + b"\x00" * 9)
    assert images.sniff(jpeg) == ("image/jpeg", 640, 480)
    webp = b"RIFF" + b"\x00" * 4 + b"WEBPVP8X" + b"\x00" * 8 + (99).to_bytes(3, "little") + (49).to_bytes(3, "little")
    assert images.sniff(webp) == ("image/webp", 100, 50)
    with pytest.raises(Exception, match="not an image"):
        images.sniff(b"%PDF-1.7 not a picture")


def test_only_global_addresses_are_fetched_unless_a_network_is_allowed():
    closed = images.FetchPolicy()
    for address in ("127.0.0.1", "10.1.2.3", "192.168.1.5", "169.254.169.254", "::1", "fe80::1", "100.64.0.1",
                    "::ffff:127.0.0.1", "0.0.0.0", "224.0.0.1"):
        assert not closed.allows(address), address
    assert closed.allows("93.184.216.34") and closed.allows("2606:4700::1111")
    assert images.FetchPolicy.of(["127.0.0.1"]).allows("127.0.0.1")
    assert not images.FetchPolicy.of(["127.0.0.1"]).allows("127.0.0.2")


def test_a_rebinding_host_is_refused_on_the_address_it_resolves_to():
    """The resolver's answer is what is checked (and connected to): a public-looking name at 127.0.0.1 is refused."""
    found = [images.part("http://images.example.com/cat.png", "messages.0.content.0")]
    with pytest.raises(Exception, match="127.0.0.1, a loopback, link-local or private address"):
        images.resolve(found, images.FetchPolicy(), resolver=lambda host, port: ["127.0.0.1"])


def test_a_data_url_goes_on_as_sent_and_an_undeclared_one_gets_its_type():
    found = [images.part(DATA_URL, "messages.0.content.0"), images.part("data:;base64," + PNG_B64, "image 2")]
    assert images.resolve(found) == [images.Image("image/png", 64, 64, len(PNG), "messages.0.content.0"),
                                     images.Image("image/png", 64, 64, len(PNG), "image 2")]
    assert found[0]["image_url"]["url"] is DATA_URL, "a checked data URL is passed on, not encoded again"
    assert found[1]["image_url"]["url"] == DATA_URL
    for bad in ("data:image/png;base64," + PNG_B64[:-2] + "$$", "data:image/png;base64,é" + PNG_B64):
        with pytest.raises(Exception, match="not valid base64"):
            images.resolve([images.part(bad, "image 1")])


# ------------------------------------------------------------------ a daemon with a vision model
class Images(http.server.BaseHTTPRequestHandler):
    """A local web server with one PNG and one text file."""

    def do_GET(self):
        body, kind = (PNG, "image/png") if self.path == "/red.png" else (b"hello, not an image", "text/plain")
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def web():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    if not HAS_VLM:
        pytest.skip("mlx-vlm is not installed (the vision extra: ./install.sh --vision)")
    models = tmp_path_factory.mktemp("vision-models")
    env = dict(os.environ)
    mlxgate("demo-model", str(models / "tiny-a"), env=env, check=True)
    built = mlxgate("demo-model", "--vision", str(models / "tiny-vl"), env=env, check=True)
    assert "vision model" in built.stdout
    running = Gateway(tmp_path_factory.mktemp("vision-home"), models, "--default-model", "tiny-a", https=False,
                      max_tokens=16)
    running.models = models
    (running.home / "gateway.yaml").write_text("image_fetch_allow: [127.0.0.1/32]\n")
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def closed_gw(tmp_path_factory, gw):
    """The same models, default settings: nothing local may be fetched."""
    running = Gateway(tmp_path_factory.mktemp("vision-closed-home"), gw.models, "--default-model", "tiny-a",
                      https=False, max_tokens=8)
    running.start()
    yield running
    running.stop()


def anthropic_image(data: str = PNG_B64, media_type: str = "image/png") -> dict:
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def test_the_anthropic_sdk_sends_a_png_and_gets_an_answer(gw):
    answer = claude(gw).messages.create(model="tiny-vl", max_tokens=8, messages=[
        {"role": "user", "content": [anthropic_image(), {"type": "text", "text": "What is in this picture?"}]}])
    assert answer.content[0].type == "text" and answer.content[0].text
    assert answer.stop_reason == "max_tokens" and answer.usage.output_tokens == 8
    counted = claude(gw).messages.count_tokens(model="tiny-vl", messages=[
        {"role": "user", "content": [anthropic_image(), {"type": "text", "text": "What is in this picture?"}]}])
    assert answer.usage.input_tokens == counted.input_tokens, "usage is the count the processor made"


def test_a_streamed_answer_reads_the_image_too(gw):
    with claude(gw).messages.stream(model="tiny-vl", max_tokens=6, messages=[
            {"role": "user", "content": [{"type": "text", "text": "Describe"}, anthropic_image()]}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.usage.output_tokens == 6


def test_count_tokens_grows_by_the_processors_count(gw):
    text_only = claude(gw).messages.count_tokens(model="tiny-vl", messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}]}]).input_tokens
    for width, height in ((64, 64), (448, 448), (800, 300)):
        with_image = claude(gw).messages.count_tokens(model="tiny-vl", messages=[
            {"role": "user", "content": [anthropic_image(base64.b64encode(png(width, height)).decode()),
                                         {"type": "text", "text": "What is in this picture?"}]}]).input_tokens
        assert with_image - text_only == image_tokens(gw.models / "tiny-vl", width, height)
    assert image_tokens(gw.models / "tiny-vl", 448, 448) == 258  # (448/28)² + <|vision_start|>, <|vision_end|>


def test_the_processor_makes_that_many_tokens(gw):
    """The count the gateway computes from the header is what mlx-vlm's processor makes of the pixels."""
    from mlx_vlm.prompt_utils import get_chat_template
    from mlx_vlm.utils import prepare_inputs
    from PIL import Image

    from mlxgate.vision.server import Engine

    engine = Engine(gw.models / "tiny-vl")
    prompt = get_chat_template(engine.processor, [{"role": "user", "content": [{"type": "image"}]}], True)
    base = len(engine.processor.tokenizer(prompt)["input_ids"]) - 3
    for width, height in ((64, 64), (448, 448), (800, 300), (2000, 1000)):
        image = Image.new("RGB", (width, height))
        ids = prepare_inputs(engine.processor, images=[image], prompts=prompt,
                             image_token_index=engine.model.config.image_token_id)["input_ids"]
        assert ids.shape[1] - base == image_tokens(gw.models / "tiny-vl", width, height)


def test_ollamas_images_field_reaches_the_vision_model_in_chat_and_generate(gw):
    """Ollama clients send images as base64 strings of the files' bytes beside the text (the
    official client takes the bytes, or a path, and encodes them)."""
    import ollama

    client = ollama.Client(host=gw.ollama_url)
    ask = "What is in this picture?"
    plain = client.chat(model="tiny-vl", messages=[{"role": "user", "content": ask}], options={"num_predict": 2})
    seen = client.chat(model="tiny-vl", messages=[{"role": "user", "content": ask, "images": [png(448, 448)]}],
                       options={"num_predict": 2})
    assert seen.eval_count == 2 and seen.done_reason == "length"
    assert seen.prompt_eval_count - plain.prompt_eval_count == image_tokens(gw.models / "tiny-vl", 448, 448)
    generated = client.generate(model="tiny-vl", prompt=ask, images=[PNG], options={"num_predict": 2})
    words = client.generate(model="tiny-vl", prompt=ask, options={"num_predict": 2})
    assert generated.prompt_eval_count - words.prompt_eval_count == image_tokens(gw.models / "tiny-vl", 64, 64)
    assert client.generate(model="tiny-vl", prompt="", images=[PNG], options={"num_predict": 2}).eval_count == 2, \
        "an image with no words is a question, not a load"
    with pytest.raises(ollama.ResponseError) as refused:
        client.chat(model="tiny-vl", messages=[{"role": "user", "content": ask, "images": ["aGk="]}])
    assert refused.value.status_code == 400 and "messages.0.images.0: the data is not an image" in refused.value.error
    with pytest.raises(ollama.ResponseError) as refused:
        client.generate(model="tiny-vl", prompt=ask, raw=True)
    assert refused.value.status_code == 400 and "not raw or fill-in-the-middle" in refused.value.error


def test_a_tool_result_with_an_image_reaches_the_model(gw):
    """What Claude Code's Read tool returns for an image file."""
    def ask(content):
        return claude(gw).messages.count_tokens(model="tiny-vl", messages=[
            {"role": "user", "content": "Read shot.png"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Read",
                                               "input": {"file_path": "shot.png"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": content}]}],
            tools=[{"name": "Read", "description": "read a file", "input_schema": {"type": "object"}}]).input_tokens
    plain = ask([{"type": "text", "text": "(image)"}])
    pictured = ask([{"type": "text", "text": "(image)"}, anthropic_image()])
    assert pictured - plain == image_tokens(gw.models / "tiny-vl", 64, 64)
    answer = claude(gw).messages.create(model="tiny-vl", max_tokens=4, messages=[
        {"role": "user", "content": "Read shot.png"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Read",
                                           "input": {"file_path": "shot.png"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [anthropic_image()]}]}])
    assert answer.usage.input_tokens >= image_tokens(gw.models / "tiny-vl", 64, 64)


def test_the_openai_sdk_sends_a_png_in_chat_and_in_responses(gw):
    chat = gpt(gw).chat.completions.create(model="tiny-vl", max_tokens=5, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": DATA_URL, "detail": "low"}}]}])
    assert chat.choices[0].message.content and chat.usage.completion_tokens == 5
    assert chat.usage.prompt_tokens > image_tokens(gw.models / "tiny-vl", 64, 64)
    streamed = gpt(gw).chat.completions.create(model="tiny-vl", max_tokens=5, stream=True,
                                               stream_options={"include_usage": True}, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": DATA_URL}}]}])
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 5
    response = gpt(gw).responses.create(model="tiny-vl", max_output_tokens=5, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                     {"type": "input_image", "image_url": DATA_URL}]}])
    assert response.status == "incomplete" and response.output_text
    counted = httpx.post(gw.url + "/v1/responses/input_tokens", timeout=60,
                         headers={"Authorization": f"Bearer {gw.api_key}"},
                         json={"model": "tiny-vl", "input": [{"role": "user", "content": [
                             {"type": "input_text", "text": "What is this?"},
                             {"type": "input_image", "image_url": DATA_URL}]}]}).json()
    assert response.usage.input_tokens == counted["input_tokens"]


def test_an_image_url_on_an_allowed_local_server_is_fetched(gw, web):
    chat = gpt(gw).chat.completions.create(model="tiny-vl", max_tokens=3, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": web + "/red.png"}}]}])
    assert chat.choices[0].message.content
    answer = claude(gw).messages.create(model="tiny-vl", max_tokens=3, messages=[
        {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": web + "/red.png"}}]}])
    assert answer.content[0].text


def test_an_image_url_on_127_0_0_1_is_refused_by_default(closed_gw, web):
    with pytest.raises(openai.BadRequestError) as caught:
        gpt(closed_gw).chat.completions.create(model="tiny-vl", max_tokens=3, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": web + "/red.png"}}]}])
    message = caught.value.body["message"]
    assert "messages.0.content.0" in message and "127.0.0.1" in message and "image_fetch_allow" in message
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude(closed_gw).messages.create(model="tiny-vl", max_tokens=3, messages=[
            {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": web + "/red.png"}}]}])
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert "loopback, link-local or private" in caught.value.body["error"]["message"]


def test_oversize_and_non_image_payloads_get_their_400s(gw, web):
    big = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * (images.MAX_IMAGE_BYTES + 10)).decode()
    cases = [
        (anthropic_image(big), "at most 5242880"),
        (anthropic_image(base64.b64encode(b"%PDF-1.7 hello").decode()), "not an image"),
        (anthropic_image(PNG_B64, "image/jpeg"), "declared image/jpeg but its bytes are image/png"),
        (anthropic_image(PNG_B64, "image/tiff"), "media_type: Input should be"),
        (anthropic_image("not base64!!"), "not valid base64"),
        ({"type": "image", "source": {"type": "url", "url": web + "/notes.txt"}}, "not an image"),
    ]
    for block, expected in cases:
        with pytest.raises(anthropic.BadRequestError) as caught:
            claude(gw).messages.create(model="tiny-vl", max_tokens=3, messages=[
                {"role": "user", "content": [block, {"type": "text", "text": "?"}]}])
        error = caught.value.body["error"]
        assert error["type"] == "invalid_request_error" and expected in error["message"], error
        assert error["message"].startswith("messages.0.content.0"), error
    with pytest.raises(openai.BadRequestError) as caught:
        gpt(gw).chat.completions.create(model="tiny-vl", max_tokens=3, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}]}])
    assert caught.value.body["type"] == "invalid_request_error" and "not supported" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        gpt(gw).responses.create(model="tiny-vl", input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "file:///etc/passwd"}]}])
    assert "data URL or http(s)" in caught.value.body["message"]


def test_a_text_model_given_an_image_names_the_vision_model(gw):
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude(gw).messages.create(model="tiny-a", max_tokens=3, messages=[
            {"role": "user", "content": [anthropic_image(), {"type": "text", "text": "?"}]}])
    message = caught.value.body["error"]["message"]
    assert "'tiny-a' reads text only" in message and "Local vision models: tiny-vl" in message
    with pytest.raises(openai.BadRequestError) as caught:
        gpt(gw).chat.completions.create(model="tiny-a", max_tokens=3, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": DATA_URL}}]}])
    assert "tiny-vl" in caught.value.body["message"]


def test_a_vision_model_and_a_text_model_are_resident_together(gw):
    claude(gw).messages.create(model="tiny-a", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    claude(gw).messages.create(model="tiny-vl", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    assert {"tiny-a", "tiny-vl"} <= set(gw.loaded())
    shown = mlxgate("ps", env=gw.env, check=True).stdout
    assert "tiny-vl" in shown and "tiny-a" in shown
    # a text request to the vision model is answered too, and text still goes to the text model
    assert gpt(gw).chat.completions.create(model="tiny-a", max_tokens=3, messages=[
        {"role": "user", "content": "hi"}]).choices[0].message.content is not None


# ------------------------------------------------------------------ vision_fallback, and Claude Code's Read tool
SHOT = png(448, 448, rgb=(30, 120, 200))  # 256 image tokens for Qwen2.5-VL: a share of the prompt no text hides


@pytest.fixture(scope="module")
def fallback_gw(tmp_path_factory, gw):
    """The same models, `look`: a scripted text model whose one step is Claude Code's Read tool on
    shot.png in the work folder, and `look-vl`: a scripted vision model, the `vision_fallback`."""
    work = tmp_path_factory.mktemp("vision-work")
    (work / "shot.png").write_bytes(SHOT)
    steps = work.parent / "look-steps.json"
    steps.write_text(f'[{{"tool": "Read", "arguments": {{"file_path": "{work / "shot.png"}"}}}}]')
    mlxgate("demo-model", str(gw.models / "look"), "--scripted", "--context", "131072", "--steps", str(steps),
            env=dict(os.environ), check=True)
    mlxgate("demo-model", "--vision", "--scripted", str(gw.models / "look-vl"), env=dict(os.environ), check=True)
    running = Gateway(tmp_path_factory.mktemp("vision-fallback-home"), gw.models, "--default-model", "tiny-a",
                      https=False, max_tokens=16)
    running.models, running.work = gw.models, work
    (running.home / "gateway.yaml").write_text("vision_fallback: look-vl\n")
    running.start()
    yield running
    running.stop()


def test_vision_fallback_answers_a_text_models_image_with_the_vision_model(fallback_gw):
    answer = claude(fallback_gw).messages.create(model="tiny-a", max_tokens=4, messages=[
        {"role": "user", "content": [anthropic_image(), {"type": "text", "text": "What is this?"}]}])
    assert answer.model == "look-vl" and answer.content[0].text == VISION_ANSWER
    assert answer.usage.input_tokens > image_tokens(fallback_gw.models / "look-vl", 64, 64)
    text = claude(fallback_gw).messages.create(model="tiny-a", max_tokens=4, messages=[
        {"role": "user", "content": "no image here"}])
    assert text.model == "tiny-a", "text alone stays on the text model"
    chat = gpt(fallback_gw).chat.completions.create(model="tiny-a", max_tokens=3, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": DATA_URL}}]}])
    assert chat.model == "look-vl" and chat.choices[0].message.content == VISION_ANSWER


def test_claude_code_reads_an_image_with_its_read_tool_and_the_image_reaches_a_vision_model(fallback_gw,
                                                                                             tmp_path_factory):
    """Claude Code (the pinned version) on a text model: the model calls Read on shot.png, Claude Code
    reads the PNG and sends it back as an image in the tool result, and vision_fallback hands that
    turn to look-vl, whose answer is Claude Code's result; by the gateway's own records."""
    import subprocess
    import time

    from test_agent_matrix import AGENTS, Session, install, launched

    binary = install("claude-code", AGENTS["claude-code"], tmp_path_factory.mktemp("vision-claude"))
    home = tmp_path_factory.mktemp("vision-claude-home")
    run = launched(Session(binary, "look", fallback_gw, fallback_gw.work, home), "claude", "-p",
                   "What is in shot.png?", "--output-format", "json", "--tools", "Read", "--system-prompt",
                   "Be brief.")
    started = time.time()
    result = subprocess.run(run.argv, env={**os.environ, "HOME": str(home), "PWD": str(fallback_gw.work), **run.env},
                            cwd=fallback_gw.work, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    shown = f"\n--- claude exited {result.returncode}\n{result.stdout[-2500:]}\n--- stderr\n{result.stderr[-2500:]}"
    assert result.returncode == 0, shown
    read = [r for r in ledger_rows(fallback_gw, started, "look") if r["route"] == "anthropic_messages"]
    assert json.loads(result.stdout)["result"] == VISION_ANSWER, shown
    seen = [r for r in ledger_rows(fallback_gw, started, "look-vl") if r["route"] == "anthropic_messages"]
    assert read and all(r["images"] == 0 for r in read), f"the turn that called Read had no image: {read}{shown}"
    assert [(r["requested_model"], r["images"], r["status"]) for r in seen] == [("look", 1, 200)], f"{seen}{shown}"
    assert seen[0]["input_tokens"] + seen[0]["cached_tokens"] >= image_tokens(fallback_gw.models / "look-vl", 448, 448)
