"""`hf_blockdiff serve` under real clients and hostile input (issue 21): stop strings, seeds out of range, a request
that fails inside the worker, clients that go away, large and malformed bodies, fields the server cannot honour, the
API key, a bounded shutdown, streaming per forward and the CPU defaults.

Tiny random models over HTTP on 127.0.0.1 with the real `openai` client; every wait is bounded.
"""

import http.client
import itertools
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import openai
import pytest
import torch
from helpers import WORDS, convert_tiny_checkpoint, converted_pair
from test_serve import WAIT_S, reference, start_http

from hf_blockdiff import cli
from hf_blockdiff.scheduler import Scheduler
from hf_blockdiff.serve import create_app

SLOTS, CONTEXT, BLOCK = 2, 256, 4


@pytest.fixture(scope="module")
def server():
    _, model, tok = converted_pair("llama", block_size=BLOCK)
    scheduler = Scheduler(model, tok, max_batch=SLOTS, max_length=CONTEXT).start()
    url, stop = start_http(create_app(scheduler, "tiny", default_max_tokens=8))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=WAIT_S, max_retries=0)
    yield model, tok, scheduler, client, url
    stop()
    scheduler.stop()


def send(url, path, body=None, method="POST", headers=None, chunked=False, timeout=WAIT_S):
    """(status, parsed JSON or the raw text) of one raw HTTP call; ``body``: a dict (sent as JSON), str or bytes."""
    conn = http.client.HTTPConnection(urlsplit(url).netloc, timeout=timeout)
    try:
        data = json.dumps(body) if isinstance(body, dict) else body
        data = data.encode() if isinstance(data, str) else data
        headers = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=iter([data]) if chunked else data, headers=headers, encode_chunked=chunked)
        response = conn.getresponse()
        raw = response.read()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw.decode(errors="replace")
    finally:
        conn.close()


def assert_openai_error(reply, kind="invalid_request_error", param=None):
    assert isinstance(reply, dict) and set(reply) == {"error"}, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert error["type"] == kind and error["param"] == param, error


def wait_until(condition, what):
    deadline = time.time() + WAIT_S
    while not condition():
        assert time.time() < deadline, what
        time.sleep(0.01)


def wait_until_idle(scheduler):
    wait_until(lambda: len(scheduler.engine.free_slots()) == scheduler.max_batch, "a slot was never freed")


# ----------------------------------------------------------------------------------------------------------
# 1. stop strings


def first_stop(text: str, stops: list[str]) -> str:
    """The reply a stop list gives: ``text`` up to the stop string that is complete first (the earliest end, the
    longer of two that end together), as token-by-token decoding would stop, whatever the list order."""
    hits = [(text.find(s) + len(s), -len(s)) for s in stops if s in text]
    if not hits:
        return text
    end, minus_length = min(hits)
    return text[: end + minus_length]


@pytest.mark.parametrize("stream", [False, True])
def test_the_stop_string_complete_first_wins_whatever_the_list_order(server, stream):
    model, tok, scheduler, client, _ = server
    prompt = "w9 w8 w7"
    text, new = reference(model, tok, tok(prompt).input_ids, 16, threshold=0.0)
    # both complete in the second block (tokens 4-7), which one forward commits at threshold 0
    late, early = tok.decode(new[6:8]), tok.decode(new[4:6])
    assert first_stop(text, [late, early]) == text[: text.index(early)]
    for stops in ([late, early], [early, late], [late, tok.decode(new[5:6]), tok.decode(new[4:7])]):
        kwargs = dict(model="tiny", prompt=prompt, max_tokens=16, stop=stops, extra_body={"threshold": 0.0})
        if stream:
            chunks = list(client.completions.create(stream=True, **kwargs))
            got, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            choice = client.completions.create(**kwargs).choices[0]
            got, reason = choice.text, choice.finish_reason
        assert (got, reason) == (first_stop(text, stops), "stop"), stops
    wait_until_idle(scheduler)


# ----------------------------------------------------------------------------------------------------------
# 2. seeds out of range; a request that fails inside the worker fails alone


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_a_seed_out_of_range_is_a_400_naming_seed(server, seed):
    _, _, scheduler, client, url = server
    body = {"model": "tiny", "prompt": "w1", "max_tokens": 2, "temperature": 1.0, "seed": seed}
    status, reply = send(url, "/v1/completions", body, timeout=20)
    assert status == 400
    assert_openai_error(reply, param="seed")
    edge = client.completions.create(model="tiny", prompt="w1", max_tokens=2, temperature=1.0, seed=2**64 - 1)
    assert edge.usage.completion_tokens >= 1
    wait_until_idle(scheduler)


def test_a_request_that_fails_in_the_worker_fails_alone(server, monkeypatch):
    """An exception while the worker handles one request answers that request with an OpenAI-style 500; the
    request decoding beside it goes on undisturbed, and so does the server."""
    model, tok, scheduler, client, url = server
    configure, beside = scheduler._configure, []

    def failing(slot, settings):
        if settings.seed == 13:
            beside.append(len(scheduler._running))
            raise RuntimeError("injected failure")
        return configure(slot, settings)

    monkeypatch.setattr(scheduler, "_configure", failing)
    prompt = "w9 w8 w7"  # 134 tokens before its EOS at block size 1: it runs while the other one fails
    text, _ = reference(model, tok, tok(prompt).input_ids, 120, block_size=1)
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=120, stream=True,
                                       extra_body={"block_size": 1})  # fmt: skip
    chunks = [next(stream)]
    body = {"model": "tiny", "prompt": "w1", "max_tokens": 4, "temperature": 1.0, "seed": 13}
    status, reply = send(url, "/v1/completions", body, timeout=20)
    assert status == 500
    assert_openai_error(reply, kind="server_error")
    assert "injected failure" in reply["error"]["message"]
    chunks += list(stream)
    assert beside == [1]  # the long request was decoding when the other one failed
    assert "".join(c.choices[0].text for c in chunks) == text and chunks[-1].choices[0].finish_reason == "length"
    assert client.completions.create(model="tiny", prompt="w3", max_tokens=3).usage.completion_tokens == 3
    wait_until_idle(scheduler)


def test_a_stopped_worker_is_reported_not_waited_for():
    _, model, tok = converted_pair("llama", block_size=BLOCK)
    scheduler = Scheduler(model, tok, max_batch=1, max_length=64).start()
    url, stop = start_http(create_app(scheduler, "tiny"))
    try:
        assert send(url, "/health", method="GET") == (200, {"status": "ok"})
        scheduler.stop()
        status, reply = send(url, "/health", method="GET")
        assert status == 503 and reply["status"] == "error"
        status, reply = send(url, "/v1/completions", {"prompt": "w1", "max_tokens": 2}, timeout=20)
        assert status == 503
        assert_openai_error(reply, kind="server_error")
    finally:
        stop()


# ----------------------------------------------------------------------------------------------------------
# 3. a non-streaming client that goes away


def test_a_killed_non_streaming_client_frees_its_slot():
    _, model, tok = converted_pair("llama", block_size=BLOCK)
    # one slot, no EOS: the long request holds the slot until max_tokens unless its disconnect is noticed
    scheduler = Scheduler(model, tok, max_batch=1, max_length=2048, eos_token_id=[]).start()
    submitted, submit = [], scheduler.submit
    scheduler.submit = lambda request: submitted.append(request) or submit(request)
    url, stop = start_http(create_app(scheduler, "tiny"))
    try:
        conn = http.client.HTTPConnection(urlsplit(url).netloc, timeout=WAIT_S)
        body = {"prompt": "w1 w2", "max_tokens": 2000, "block_size": 1}
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        wait_until(lambda: submitted and len(submitted[0].tokens) > 1, "the long request did not start")
        conn.sock.shutdown(socket.SHUT_RDWR)  # the client dies long before its 2000 tokens are decoded
        conn.close()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=WAIT_S, max_retries=0)
        assert client.completions.create(model="tiny", prompt="w3", max_tokens=4).usage.completion_tokens == 4
        assert submitted[0].cancelled and len(submitted[0].tokens) < 2000 and scheduler.cancelled == 1
    finally:
        stop()
        scheduler.stop()


# ----------------------------------------------------------------------------------------------------------
# 4. large bodies: tokenized off the event loop, and limited


class SlowTokenizer:
    """The server's tokenizer taking seconds over a prompt, as a real one does over megabytes of text."""

    def __init__(self, tokenizer, seconds=3.0):
        self.tokenizer, self.seconds, self.started = tokenizer, seconds, threading.Event()

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __len__(self):
        return len(self.tokenizer)

    def __call__(self, *args, **kwargs):
        self.started.set()
        time.sleep(self.seconds)
        return self.tokenizer(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        self.started.set()
        time.sleep(self.seconds)
        return self.tokenizer.apply_chat_template(*args, **kwargs)


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_health_answers_while_a_maximal_prompt_is_tokenized(server, monkeypatch, route):
    _, tok, scheduler, _, _ = server
    slow, limit = SlowTokenizer(tok), 2**20
    with monkeypatch.context() as patch:
        patch.setattr(scheduler, "tokenizer", slow)
        url, stop = start_http(create_app(scheduler, "tiny", max_body_bytes=limit))
    text = "w1 " * ((limit - 200) // 3)  # just under the limit: accepted, then tokenized (then too long)
    body = {"prompt": text} if route == "/v1/completions" else {"messages": [{"role": "user", "content": text}]}
    try:
        with ThreadPoolExecutor(1) as pool:
            big = pool.submit(send, url, route, body)
            assert slow.started.wait(WAIT_S)
            start = time.perf_counter()
            assert send(url, "/health", method="GET") == (200, {"status": "ok"})
            assert time.perf_counter() - start < 1.0  # the tokenizer takes 3 s: /health did not wait for it
            status, reply = big.result(WAIT_S)
        assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
    finally:
        stop()


def test_an_oversized_body_gets_a_413(server):
    _, _, scheduler, _, _ = server
    url, stop = start_http(create_app(scheduler, "tiny", max_body_bytes=1000))
    try:
        fits = {"prompt": "w1 " * 250, "max_tokens": 1}
        assert len(json.dumps(fits)) <= 1000 and send(url, "/v1/completions", fits)[0] == 200
        big = {"prompt": "w1 " * 400, "max_tokens": 1}
        for chunked in (False, True):  # announced by Content-Length, or found while reading a chunked body
            status, reply = send(url, "/v1/completions", big, chunked=chunked)
            assert status == 413
            assert_openai_error(reply)
            assert "1000 bytes" in reply["error"]["message"]
        assert send(url, "/health", method="GET") == (200, {"status": "ok"})
    finally:
        stop()


def test_the_cli_default_body_limit_follows_max_length():
    from hf_blockdiff.serve import default_max_body_bytes

    assert default_max_body_bytes(2048) == 2**20  # at least 1 MiB
    assert default_max_body_bytes(131072) == 64 * 131072


# ----------------------------------------------------------------------------------------------------------
# 5. malformed input: OpenAI-style 400s; anything unexpected: an OpenAI-style 500


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", '{"prompt": "w1 \\ud800", "max_tokens": 2}', "prompt"),
        ("/v1/completions", '{"prompt": ["\\udfff"], "max_tokens": 2}', "prompt"),
        ("/v1/completions", '{"prompt": "w1", "stop": ["\\ud800"], "max_tokens": 2}', "stop"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
         "messages.0.content"),
        ("/v1/completions", b'{"prompt": "w1 \xff\xfe", "max_tokens": 2}', None),  # not UTF-8
        ("/v1/completions", "[" * 100_000 + "]" * 100_000, None),  # nested past any recursion limit
        ("/v1/completions", '{"prompt": ' + "[" * 5000 + "]" * 5000 + "}", None),
        ("/v1/completions", '{"prompt": "w1", "max_tokens": 1' + "0" * 5000 + "}", None),  # an int too long to read
    ],
)  # fmt: skip
def test_malformed_bodies_get_openai_400s(server, path, body, param):
    _, _, _, _, url = server
    status, reply = send(url, path, body)
    assert status == 400, reply
    assert_openai_error(reply, param=param)
    assert send(url, "/health", method="GET") == (200, {"status": "ok"})


def test_unknown_routes_and_methods_get_openai_errors(server):
    _, _, _, _, url = server
    status, reply = send(url, "/v1/nothing", {})
    assert status == 404
    assert_openai_error(reply)
    status, reply = send(url, "/v1/completions", method="GET")
    assert status == 405
    assert_openai_error(reply)


def test_an_unexpected_exception_is_an_openai_500(server, monkeypatch):
    _, tok, scheduler, _, _ = server

    class Broken(SlowTokenizer):
        def __call__(self, *args, **kwargs):
            raise ValueError("the tokenizer broke")

    with monkeypatch.context() as patch:
        patch.setattr(scheduler, "tokenizer", Broken(tok))
        url, stop = start_http(create_app(scheduler, "tiny"))
    try:
        status, reply = send(url, "/v1/completions", {"prompt": "w1", "max_tokens": 2})
        assert status == 500
        assert_openai_error(reply, kind="server_error")
        assert send(url, "/health", method="GET") == (200, {"status": "ok"})
    finally:
        stop()


# ----------------------------------------------------------------------------------------------------------
# 6. SIGTERM: a bounded drain


@pytest.mark.slow
def test_sigterm_ends_in_flight_requests_after_the_shutdown_timeout(tmp_path):
    folder = tmp_path / "bd"
    convert_tiny_checkpoint(folder, "llama")
    for name in ("config.json", "generation_config.json"):  # no EOS: a request runs for all of its max_tokens
        config = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**config, "eos_token_id": None}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "hf_blockdiff.cli", "serve", str(folder), "--port", str(port), "--max-batch", "1",
               "--max-length", "4096", "--block-size", "1", "--shutdown-timeout", "1"]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + WAIT_S
        while True:
            assert server.poll() is None, server.stdout.read()
            assert time.time() < deadline, "the server did not come up"
            try:
                if send(url, "/health", method="GET", timeout=5)[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        conn = http.client.HTTPConnection(f"127.0.0.1:{port}", timeout=WAIT_S)
        body = {"prompt": "w1 w2", "max_tokens": 4000, "stream": True}
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        start = time.time()
        server.send_signal(signal.SIGTERM)
        server.wait(WAIT_S)
        assert time.time() - start < 1 + 10  # the timeout, plus the time to cancel and exit
        try:
            rest = response.read()
        except (http.client.HTTPException, OSError) as error:
            rest = getattr(error, "partial", b"")
        assert b"[DONE]" not in rest  # cut at the timeout, not decoded to its end
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(WAIT_S)


# ----------------------------------------------------------------------------------------------------------
# 8. fields this server cannot honour; the API key; loopback hosts


UNSUPPORTED = [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "required"),
    ("functions", [{"name": "f", "parameters": {}}]),
    ("function_call", {"name": "f"}),
    ("response_format", {"type": "json_object"}),
    ("logit_bias", {"5": 100}),
    ("presence_penalty", 0.5),
    ("frequency_penalty", -1),
    ("best_of", 2),
    ("suffix", " w3"),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
]


@pytest.mark.parametrize("field, value", UNSUPPORTED)
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_unsupported_fields_get_a_400_naming_them(server, route, field, value):
    _, _, _, _, url = server
    body = {"prompt": "w1"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "w1"}]}
    status, reply = send(url, route, {**body, "max_tokens": 2, field: value})
    assert status == 400
    assert_openai_error(reply, param=field)
    assert field in reply["error"]["message"]


def test_inert_values_of_unsupported_fields_are_served(server):
    """Clients that send a field's no-op value (LangChain sends penalties of 0, some SDKs empty tools) are served."""
    _, _, scheduler, client, _ = server
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w1"}], max_tokens=2,
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])  # fmt: skip
    assert refused.value.param == "tools"
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "w1"}], max_tokens=2, tools=[], tool_choice="none",
        response_format={"type": "text"}, logit_bias={}, presence_penalty=0, frequency_penalty=0.0, n=1, user="me",
        modalities=["text"],
    )  # fmt: skip
    assert reply.usage.completion_tokens >= 1
    reply = client.completions.create(model="tiny", prompt="w1", max_tokens=2, best_of=1, suffix="", user="me")
    assert reply.usage.completion_tokens >= 1
    wait_until_idle(scheduler)


def test_the_api_key_takes_bearer_in_any_case_and_guards_the_docs(server):
    _, _, scheduler, _, _ = server
    url, stop = start_http(create_app(scheduler, "tiny", api_key="sesame"))
    try:
        for path in ("/docs", "/redoc", "/openapi.json", "/v1/models"):
            status, reply = send(url, path, method="GET")
            assert status == 401 and reply["error"]["code"] == "invalid_api_key", path
        for header in ("Bearer sesame", "bearer sesame", "BEARER  sesame"):
            assert send(url, "/v1/models", method="GET", headers={"Authorization": header})[0] == 200, header
        assert send(url, "/openapi.json", method="GET", headers={"Authorization": "bearer sesame"})[0] == 200
        for header in ("Bearer wrong", "Basic sesame", "sesame", "Bearer"):
            assert send(url, "/v1/models", method="GET", headers={"Authorization": header})[0] == 401, header
        assert send(url, "/health", method="GET") == (200, {"status": "ok"})
    finally:
        stop()


def serve_args(*argv):
    return cli.build_parser().parse_args(["serve", "model", *argv])


def test_the_cli_key_comes_from_a_file_or_the_environment_and_argv_warns(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_BLOCKDIFF_API_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text("sesame\n")
    assert cli.serve_api_key(serve_args("--api-key-file", str(key_file))) == "sesame"
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("HF_BLOCKDIFF_API_KEY", "from-env")
    assert cli.serve_api_key(serve_args()) == "from-env"
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("HF_BLOCKDIFF_API_KEY")
    assert cli.serve_api_key(serve_args("--api-key", "visible")) == "visible"
    err = capsys.readouterr().err
    assert "ps" in err and "--api-key-file" in err
    key_file.write_text("\n")
    with pytest.raises(cli.CLIError, match="empty"):
        cli.serve_api_key(serve_args("--api-key-file", str(key_file)))
    with pytest.raises(cli.CLIError, match="No such file|not found|cannot read"):
        cli.serve_api_key(serve_args("--api-key-file", str(tmp_path / "missing")))
    with pytest.raises(SystemExit):  # one source at a time
        serve_args("--api-key", "a", "--api-key-file", str(key_file))


@pytest.mark.parametrize("host, public", [("127.0.0.1", False), ("127.0.0.2", False), ("::1", False),
                                          ("localhost", False), ("0.0.0.0", True), ("192.168.1.5", True),
                                          ("::", True), ("example.org", True)])  # fmt: skip
def test_only_non_loopback_hosts_warn_without_a_key(monkeypatch, capsys, host, public):
    monkeypatch.delenv("HF_BLOCKDIFF_API_KEY", raising=False)
    assert cli.serve_api_key(serve_args("--host", host)) is None
    assert ("without an API key" in capsys.readouterr().err) == public


# ----------------------------------------------------------------------------------------------------------
# 9. streaming sends every forward's commits


def test_streaming_sends_each_forwards_commits(server):
    """Threshold decoding commits tokens over several forwards of a block: a streamed request gets every token as
    soon as it and all before it are committed, so there are as many text chunks as forwards that extend that
    prefix (generate()'s ``committed_at`` on the request alone), more than blocks."""
    model, tok, scheduler, client, _ = server
    prompt = "w33 w34 w35"
    ids = tok(prompt).input_ids
    out = model.generate(torch.tensor([ids]), max_new_tokens=16, block_size=BLOCK, threshold=0.5, do_sample=False,
                         return_dict_in_generate=True)  # fmt: skip
    count = int(out.num_generated_tokens[0])
    new, at = out.sequences[0, len(ids) : len(ids) + count].tolist(), out.committed_at[0, :count].tolist()
    assert max(new) < WORDS and count == 16  # words only: every token adds text
    ready = list(itertools.accumulate(at, max))  # the forward after which each token can be sent
    chunks = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, stream=True,
                                       extra_body={"threshold": 0.5})  # fmt: skip
    texts = [c.choices[0].text for c in chunks if c.choices[0].text]
    assert "".join(texts) == tok.decode(new, skip_special_tokens=True)
    assert len(texts) == len(set(ready)) > count // BLOCK
    wait_until_idle(scheduler)


# ----------------------------------------------------------------------------------------------------------
# 10. CPU defaults


def test_serve_defaults_on_cpu_are_small_and_block_size_1(capsys):
    settings = cli.serve_defaults(serve_args(), "cpu")
    assert settings == {"max_batch": cli.CPU_SERVE_SLOTS, "max_length": cli.CPU_SERVE_LENGTH, "block_size": 1}
    assert "block size 1" in capsys.readouterr().err
    assert cli.serve_defaults(serve_args("--threshold", "0.9"), "cpu")["block_size"] is None  # the model's
    assert cli.serve_defaults(serve_args("--max-batch", "8", "--max-length", "2048", "--block-size", "16"), "cpu") == {
        "max_batch": 8, "max_length": 2048, "block_size": 16}  # fmt: skip
    assert cli.serve_defaults(serve_args(), "cuda") == {"max_batch": 8, "max_length": 2048, "block_size": None}
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    assert "attends over each one's whole --max-length" in " ".join(help_text.split())  # what slots cost
