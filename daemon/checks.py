"""`mlxgate check`: real requests with the official SDKs to a running gateway."""

from __future__ import annotations

import ssl
import time

from .config import Config


def _anthropic(base_url: str, key: str, prompt: str, max_tokens: int, http_client) -> list[str]:
    import anthropic

    client = anthropic.Anthropic(base_url=base_url, api_key=key, http_client=http_client, max_retries=0)
    lines = []
    started = time.monotonic()
    message = client.messages.create(model="claude-opus-4-8", max_tokens=max_tokens,
                                     messages=[{"role": "user", "content": prompt}])
    text = "".join(b.text for b in message.content if b.type == "text")
    lines.append(f"messages.create: {time.monotonic() - started:.2f} s, stop_reason={message.stop_reason}, "
                 f"usage in/out={message.usage.input_tokens}/{message.usage.output_tokens}: {text[:80]!r}")
    started = time.monotonic()
    with client.messages.stream(model="claude-opus-4-8", max_tokens=max_tokens,
                                messages=[{"role": "user", "content": prompt}]) as stream:
        final = stream.get_final_message()
    lines.append(f"messages.stream: {time.monotonic() - started:.2f} s, stop_reason={final.stop_reason}, "
                 f"output_tokens={final.usage.output_tokens}")
    return lines


def _openai(base_url: str, key: str, prompt: str, max_tokens: int, http_client) -> list[str]:
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key=key, http_client=http_client, max_retries=0)
    lines = []
    started = time.monotonic()
    answer = client.chat.completions.create(model="gpt-4o", max_tokens=max_tokens,
                                            messages=[{"role": "user", "content": prompt}])
    lines.append(f"chat.completions: {time.monotonic() - started:.2f} s, "
                 f"finish_reason={answer.choices[0].finish_reason}, "
                 f"usage={answer.usage.prompt_tokens}/{answer.usage.completion_tokens}: "
                 f"{(answer.choices[0].message.content or '')[:80]!r}")
    started = time.monotonic()
    chunks = list(client.chat.completions.create(model="gpt-4o", max_tokens=max_tokens, stream=True,
                                                 messages=[{"role": "user", "content": prompt}]))
    lines.append(f"chat.completions stream: {time.monotonic() - started:.2f} s, {len(chunks)} chunks")
    started = time.monotonic()
    response = client.responses.create(model="gpt-5.5", max_output_tokens=max_tokens, input=prompt, store=False)
    lines.append(f"responses.create: {time.monotonic() - started:.2f} s, status={response.status}, "
                 f"usage={response.usage.input_tokens}/{response.usage.output_tokens}: {response.output_text[:80]!r}")
    started = time.monotonic()
    with client.responses.stream(model="gpt-5.5", max_output_tokens=max_tokens, input=prompt, store=False) as stream:
        last = list(stream)[-1]
    lines.append(f"responses.stream: {time.monotonic() - started:.2f} s, {last.type}")
    return lines


def run_checks(config: Config, port: int, api: str, prompt: str, max_tokens: int, https: bool = False,
               say=print) -> bool:
    import anthropic
    import openai

    if https:
        base_url = f"https://localhost:{port}"  # the certificate always covers localhost
        verify = ssl.create_default_context(cafile=str(config.ssl_path / "ca.pem"))
    else:
        base_url, verify = f"http://{config.local_host}:{port}", True
    ok = True
    for name, check in (("anthropic", _anthropic), ("openai", _openai)):
        if api not in (name, "all"):
            continue
        say(f"{name} API at {base_url}:")
        try:
            factory = anthropic.DefaultHttpxClient if name == "anthropic" else openai.DefaultHttpxClient
            http_client = factory(verify=verify, timeout=300)
            for line in check(base_url, config.api_key or "", prompt, max_tokens, http_client):
                say(f"  ok   {line}")
        except Exception as exc:
            ok = False
            say(f"  FAIL {type(exc).__name__}: {exc}")
    return ok
