"""The official `openai` Python client against `ponder serve`, unchanged.

Usage: test_openai_client.py PONDER_BINARY MODEL_PATH
Starts the server on an ephemeral port with an API key, runs the checks,
stops the server. Exit status 0 when every check passes.
"""
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

import openai

MODEL = "smollm2-135m-instruct"
KEY = "sk-ponder-test"


def start_server(binary, model_path):
    env = dict(os.environ, RAYON_NUM_THREADS="1")
    arith = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "models", "ponder-arith")
    proc = subprocess.Popen(
        [binary, "serve", "--port", "0", "--api-key", KEY, "--model", f"{MODEL}={model_path}",
         "--model", f"ponder-arith={arith}"],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    address = []
    ready = threading.Event()

    def pump():
        for line in proc.stderr:
            m = re.search(r"listening on (http://[0-9.:]+)", line)
            if m and not address:
                address.append(m.group(1))
                ready.set()
    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(120):
        proc.kill()
        sys.exit("server did not report its address")
    base = address[0]
    for _ in range(600):
        try:
            with urllib.request.urlopen(base + "/health") as r:
                if r.status == 200:
                    return proc, base
        except Exception:
            pass
        time.sleep(0.1)
    proc.kill()
    sys.exit("server never became healthy")


def main():
    binary, model_path = sys.argv[1], sys.argv[2]
    proc, base = start_server(binary, model_path)
    try:
        run_checks(base)
    finally:
        proc.terminate()
        assert proc.wait(60) == 0, "ponder exits 0 on SIGTERM"
    print("openai client: all checks passed")


def run_checks(base):
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY)
    messages = [{"role": "user", "content": "Name two planets."}]

    models = client.models.list()
    assert sorted(m.id for m in models.data) == sorted([MODEL, "ponder-arith"]), models
    assert client.models.retrieve(MODEL).id == MODEL
    try:
        client.models.retrieve("no-such-model")
        raise AssertionError("an unknown model was retrieved")
    except openai.NotFoundError:
        pass

    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    text = chat.choices[0].message.content
    assert text, chat
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    # Streaming reassembles to the same greedy text, with a usage chunk.
    parts, usage = [], None
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                parts.append(c.delta.content)
    assert "".join(parts) == text, ("".join(parts), text)
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens

    # n, seed, stop, logprobs, and ponder's top_k through extra_body.
    many = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, n=2, seed=7, temperature=0.9,
        logprobs=True, top_logprobs=2, stop=["\n\n"], extra_body={"top_k": 40},
    )
    assert len(many.choices) == 2
    assert all(len(c.logprobs.content) > 0 for c in many.choices)
    again = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, n=2, seed=7, temperature=0.9,
        logprobs=True, top_logprobs=2, stop=["\n\n"], extra_body={"top_k": 40},
    )
    assert [c.message.content for c in many.choices] == [c.message.content for c in again.choices]

    comp = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0)
    assert comp.choices[0].text and comp.usage.completion_tokens > 0
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0, stream=True)
        if c.choices
    )
    assert streamed == comp.choices[0].text, (streamed, comp.choices[0].text)

    # Adaptive reasoning through extra_body; the `ponder` object comes back as an extra field.
    reasoned = client.chat.completions.create(
        model="ponder-arith", messages=[{"role": "user", "content": "What is 3 + 4?"}], max_tokens=64,
        temperature=0.7, seed=1, extra_body={"reasoning": {"strategy": "best_of_n", "max_samples": 16}},
    )
    ponder = reasoned.model_extra["ponder"]
    assert ponder["adaptive"] is True and 1 <= ponder["samples"] <= 16, ponder
    assert reasoned.usage.completion_tokens == ponder["tokens_generated"], (reasoned.usage, ponder)
    assert "The answer is 7." in reasoned.choices[0].message.content, reasoned.choices[0].message.content
    parts, last, progress = [], None, []
    for chunk in client.chat.completions.create(
        model="ponder-arith", messages=[{"role": "user", "content": "What is 3 + 4?"}], max_tokens=64,
        temperature=0.7, seed=1, stream=True, extra_body={"reasoning": {"strategy": "best_of_n", "max_samples": 16}},
    ):
        last = chunk
        extra = (chunk.model_extra or {}).get("ponder")
        if extra and extra.get("status") == "searching":
            # Progress chunks: empty choices, before any content.
            assert chunk.choices == [] and not parts, chunk
            progress.append(extra)
        for c in chunk.choices:
            if c.delta.content:
                parts.append(c.delta.content)
    assert "".join(parts) == reasoned.choices[0].message.content
    assert last.model_extra["ponder"] == ponder, (last.model_extra, ponder)
    assert progress, "progress chunks before the answer"
    assert progress[0]["samples"] == ponder["samples"] and progress[0]["budget"] == ponder["samples"], (progress, ponder)

    # Errors map to the client's exception classes.
    try:
        client.chat.completions.create(model="no-such-model", messages=messages)
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as e:
        assert e.code == "model_not_found", e
    try:
        client.chat.completions.create(model=MODEL, messages=messages, temperature=5)
        raise AssertionError("temperature 5 accepted")
    except openai.BadRequestError as e:
        assert e.param == "temperature", e
    try:
        openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
        raise AssertionError("wrong key accepted")
    except openai.AuthenticationError:
        pass


if __name__ == "__main__":
    main()
