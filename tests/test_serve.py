"""`hf_blockdiff serve`: the OpenAI-compatible server, driven by the real `openai` client over HTTP on 127.0.0.1.

The oracle is `generate()` on each request alone: continuous batching (requests joining and leaving slots while
others decode, with different settings in one forward) must not change any greedy output.
"""

import http.client
import json
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
import uvicorn
from helpers import convert_tiny_checkpoint, converted_pair

from hf_blockdiff.scheduler import Request, RequestSettings, Scheduler
from hf_blockdiff.serve import create_app
from hf_blockdiff.settings import ENGINE_WIDE

SLOTS, CONTEXT, BLOCK = 4, 256, 4
WAIT_S = 60  # every wait below is bounded


def start_http(app):
    """Serve ``app`` on a free port of 127.0.0.1 in a thread: (url, stop)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    http = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.time() + WAIT_S
    while not http.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)

    def stop():
        http.should_exit = True
        thread.join(WAIT_S)

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="module")
def server():
    _, model, tok = converted_pair("llama", block_size=BLOCK)
    scheduler = Scheduler(model, tok, max_batch=SLOTS, max_length=CONTEXT).start()
    url, stop = start_http(create_app(scheduler, "tiny", default_max_tokens=8))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=WAIT_S, max_retries=0)
    yield model, tok, scheduler, client, url
    stop()
    scheduler.stop()


def reference(model, tok, prompt_ids, max_tokens, block_size=BLOCK, threshold=0.9, verify=False):
    """What generate() gives for this request alone: (text, tokens)."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, max_new_tokens=max_tokens, block_size=block_size, threshold=threshold, verify=verify,
                         do_sample=False)  # fmt: skip
    new = out[0, ids.shape[1] :].tolist()
    return tok.decode(new, skip_special_tokens=True), new


def call(url, method, path, body=None):
    """(status, JSON) of a raw HTTP call (no client-side validation in the way); ``body`` str is sent as is."""
    conn = http.client.HTTPConnection(urlsplit(url).netloc, timeout=WAIT_S)
    try:
        content = body if isinstance(body, str) or body is None else json.dumps(body)
        conn.request(method, path, body=content, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def wait_until_idle(scheduler):
    deadline = time.time() + WAIT_S
    while len(scheduler.engine.free_slots()) < SLOTS:
        assert time.time() < deadline, "a slot was never freed"
        time.sleep(0.05)


def test_completion_chat_and_stream_equal_generate(server):
    model, tok, scheduler, client, _ = server
    prompt = "w1 w2 w3 w4"
    text, tokens = reference(model, tok, tok(prompt).input_ids, 12, threshold=0.0)
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, extra_body={"threshold": 0.0})
    assert reply.choices[0].text == text
    usage = reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (4, len(tokens))
    assert usage.tokens_per_forward == pytest.approx(usage.completion_tokens / usage.forward_passes, abs=1e-4)
    assert usage.tokens_per_forward > 1  # threshold 0 commits a whole block per step

    messages = [{"role": "user", "content": "w5 w6 w7"}]
    chat_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    chat_text, _ = reference(model, tok, list(chat_ids["input_ids"]), 10)
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10)
    assert reply.choices[0].message.content == chat_text and reply.choices[0].message.role == "assistant"

    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat_text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, stream=True,
                                         extra_body={"threshold": 0.0})  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == text

    assert [m.id for m in client.models.list().data] == ["tiny"]
    wait_until_idle(scheduler)


def test_32_concurrent_requests_equal_each_alone(server):
    """More requests than slots, with different lengths and settings: they queue, join free slots mid-decode, and
    each output equals generate() on that request alone."""
    model, tok, scheduler, client, _ = server
    g = torch.Generator().manual_seed(0)
    cases = []
    for i in range(32):
        prompt = torch.randint(0, 60, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
        settings = dict(block_size=[1, 2, 4, 4][i % 4], threshold=[0.0, 0.5, 0.9, 1.0][i // 8], verify=i % 7 == 3)
        if settings["verify"] and settings["block_size"] < 2:
            settings["block_size"] = 4
        cases.append((prompt, 3 + i % 9, settings))
    expected = [reference(model, tok, p, n, **s)[0] for p, n, s in cases]

    def ask(case):
        prompt, max_tokens, settings = case
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, extra_body=settings)
        return reply.choices[0].text

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, cases, timeout=WAIT_S * 2))
    assert got == expected
    wait_until_idle(scheduler)


def test_stop_strings_and_seeded_sampling(server):
    model, tok, scheduler, client, _ = server
    prompt = "w9 w8 w7"
    text, _ = reference(model, tok, tok(prompt).input_ids, 16, threshold=0.0)
    words = text.split()
    stop = " ".join(words[3:5])
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, stop=[stop],
                                      extra_body={"threshold": 0.0})  # fmt: skip
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == text[: text.index(stop)]

    # A seeded sample does not depend on what else shares the batch.
    def sample(seed):
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=1.0, seed=seed)

    alone = sample(7).choices[0].text
    with ThreadPoolExecutor(4) as pool:
        crowd = list(pool.map(sample, [7, 8, 9, 7]))
    assert crowd[0].choices[0].text == alone == crowd[3].choices[0].text
    assert len({c.choices[0].text for c in crowd}) > 1  # other seeds give other samples
    # top_k=1 leaves one token to draw: sampling is greedy decoding then
    top1 = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=1.0, seed=3,
                                     extra_body={"top_k": 1, "threshold": 0.0})  # fmt: skip
    assert top1.choices[0].text == reference(model, tok, tok(prompt).input_ids, 12, threshold=0.0)[0]
    wait_until_idle(scheduler)


def test_a_client_killed_mid_stream_frees_its_slot(server):
    model, tok, scheduler, client, url = server
    cancelled_before = scheduler.cancelled
    body = {"model": "tiny", "prompt": "w1 w2", "max_tokens": CONTEXT - 2, "stream": True, "threshold": 1.0,
            "block_size": 1}  # fmt: skip
    conn = http.client.HTTPConnection(urlsplit(url).netloc, timeout=WAIT_S)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    first = response.readline().decode()
    assert first.startswith("data: ") and json.loads(first[6:])["choices"][0]["finish_reason"] is None
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client dies long before its 254 tokens are decoded
    conn.close()
    wait_until_idle(scheduler)
    assert scheduler.cancelled == cancelled_before + 1  # freed by the disconnect, not by running to its end
    reply = client.completions.create(model="tiny", prompt="w3", max_tokens=4)
    assert reply.usage.completion_tokens == 4


@pytest.mark.parametrize(
    "body, status, param",
    [
        ("{not json", 400, None),
        ({"model": "tiny", "prompt": "w1 " * CONTEXT, "max_tokens": 4}, 400, None),
        ({"model": "tiny", "prompt": "w1", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "w1", "temperature": -1}, 400, "temperature"),
        ({"model": "tiny", "prompt": "w1", "n": 2, "stream": True}, 400, "n"),
        ({"model": "tiny", "prompt": ["w1", "w2"], "stream": True}, 400, "prompt"),
        ({"model": "tiny", "prompt": "w1", "echo": True, "stream": True}, 400, "echo"),
        ({"model": "tiny", "prompt": "w1", "logprobs": 1, "stream": True}, 400, "logprobs"),
        ({"model": "tiny", "prompt": "w1", "logprobs": 21}, 400, "logprobs"),
        ({"model": "tiny", "prompt": "w1", "logprobs": -1}, 400, "logprobs"),
        ({"model": "tiny", "prompt": "w1", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": [3, "w1"]}, 400, "prompt"),
        ({"model": "tiny", "prompt": [[3], []]}, 400, "prompt"),
        ({"model": "tiny", "prompt": []}, 400, "prompt"),
        ({"model": "tiny", "prompt": [[3], [10**6]], "echo": True, "max_tokens": 0}, 400, "prompt"),
        ({"model": "tiny", "prompt": "w1", "block_size": BLOCK + 1}, 400, None),
        ({"model": "tiny", "prompt": "w1", "verify": True, "block_size": 1}, 400, None),
        ({"model": "tiny", "prompt": "w1", "verify": True, "candidates": 1}, 400, None),  # the CPU server has 0
        ({"model": "tiny", "prompt": "w1", "steps_per_block": 0}, 400, "steps_per_block"),
        ({"model": "tiny", "prompt": "w1", "repeat_guard": "yes"}, 400, "repeat_guard"),
        ({"model": "tiny", "prompt": "w1", "threshold": "high"}, 400, "threshold"),
        # one engine holds these for every request: the server's, never a request's
        ({"model": "tiny", "prompt": "w1", "confidence": "margin"}, 400, "confidence"),
        ({"model": "tiny", "prompt": "w1", "use_cuda_graph": False}, 400, "use_cuda_graph"),
        ({"model": "tiny", "prompt": "w1", "compile_step": True}, 400, "compile_step"),
        ({"model": "tiny", "prompt": [10**6]}, 400, "prompt"),
        ({"model": "other", "prompt": "w1"}, 404, "model"),
        ({"model": "tiny"}, 400, "prompt"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_stays_up(server, body, status, param):
    _, _, _, client, url = server
    code, reply = call(url, "POST", "/v1/completions", body)
    assert code == status
    error = reply["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param
    assert call(url, "GET", "/health") == (200, {"status": "ok"})


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("repeat_guard", "yes", "repeat_guard must be true or false"),
        ("verify", 1, "verify must be true or false"),
        ("steps_per_block", True, "steps_per_block must be an integer"),
        ("steps_per_block", 0, "steps_per_block must be >= 1"),
        ("candidates", -1, "candidates must be an integer between 0 and block_size"),
        ("threshold", "0.5", "threshold must be a number"),
        ("block_size", 2.0, "block_size must be an integer"),
        ("use_cuda_graph", "no", "use_cuda_graph must be true or false"),
        ("confidence", "vibes", "confidence must be one of"),
    ],
)
def test_a_setting_is_refused_alike_by_generate_a_server_and_a_request(name, value, message):
    """One check (settings.DecodeSettings) for generate() and for a server's defaults and requests: one message,
    saying what the setting may be (several of these used to be coerced, ignored or a TypeError)."""
    _, model, tok = converted_pair("llama", block_size=BLOCK)
    with pytest.raises(ValueError, match=message):
        model.generate(torch.tensor([[3, 14, 15]]), max_new_tokens=4, **{name: value})
    with pytest.raises(ValueError, match=message):
        Scheduler(model, tok, max_batch=1, max_length=32, **{name: value})
    if name not in ENGINE_WIDE:  # (those are refused per request whatever their value: see test_bad_requests)
        scheduler = Scheduler(model, tok, max_batch=1, max_length=32)
        with pytest.raises(ValueError, match=message):
            scheduler.check([3], RequestSettings(max_tokens=2, **{name: value}))


def test_requests_choose_their_step_quota_and_repeat_guard(server):
    """steps_per_block and repeat_guard per request (they used to be ignored as unknown fields), side by side in one
    batch with requests that set neither: each decodes as generate() with its settings, in as many forwards."""
    model, tok, scheduler, client, _ = server
    prompt = [3, 14, 15, 9, 2, 6]
    cases = [{"steps_per_block": 2}, {"steps_per_block": 1, "repeat_guard": True},
             {"threshold": 0.0, "repeat_guard": True}, {"threshold": 0.0}]  # fmt: skip

    def expected(settings):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=12, block_size=BLOCK, do_sample=False,
                             return_dict_in_generate=True, **settings)  # fmt: skip
        new = out.sequences[0, len(prompt) : len(prompt) + int(out.num_generated_tokens[0])].tolist()
        return tok.decode(new, skip_special_tokens=True), len(new), int(out.row_forward_passes[0])

    def ask(settings):
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, extra_body=settings)
        return reply.choices[0].text, reply.usage.completion_tokens, reply.usage.forward_passes

    want = [expected(settings) for settings in cases]
    assert len({forwards for *_, forwards in want}) == 3 and want[0] != expected({})  # the settings tell apart
    with ThreadPoolExecutor(len(cases)) as pool:
        assert list(pool.map(ask, cases, timeout=WAIT_S)) == want
    wait_until_idle(scheduler)


@pytest.mark.slow
def test_cli_serves_a_converted_folder(tmp_path):
    """`hf_blockdiff serve DIR` in its own process: the folder loads through trust_remote_code and answers."""
    folder = tmp_path / "bd"
    convert_tiny_checkpoint(folder, "llama")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # (--block-size: without it a CPU server decodes with block size 1 only)
    command = [sys.executable, "-m", "hf_blockdiff.cli", "serve", str(folder), "--port", str(port), "--max-batch", "2",
               "--max-length", "64", "--block-size", "4"]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + WAIT_S * 2
        while True:
            assert server.poll() is None, server.stdout.read()
            assert time.time() < deadline, "the server did not come up"
            try:
                if call(url, "GET", "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=WAIT_S, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["bd"]
        reply = client.completions.create(model="bd", prompt="w1 w2", max_tokens=5, extra_body={"block_size": 4})
        assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"
    finally:
        server.terminate()
        server.wait(WAIT_S)


def test_an_api_key_guards_v1_but_not_health(server):
    _, _, scheduler, _, _ = server
    url, stop = start_http(create_app(scheduler, "tiny", api_key="sesame"))
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", timeout=WAIT_S, max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="API key"):
            client.completions.create(model="tiny", prompt="w1", max_tokens=2)
        status, reply = call(url, "GET", "/v1/models")  # no key at all
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
        assert call(url, "GET", "/health") == (200, {"status": "ok"})
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", timeout=WAIT_S, max_retries=0)
        assert client.completions.create(model="tiny", prompt="w1", max_tokens=2).usage.completion_tokens == 2
    finally:
        stop()


@pytest.mark.parametrize("defaults", [{"steps_per_block": 2}, {"steps_per_block": 2, "repeat_guard": True},
                                      {"threshold": 0.2, "confidence": "margin"}, {"verify": True},
                                      {"threshold": 0.0, "use_cuda_graph": False, "compile_step": False}])  # fmt: skip
def test_the_scheduler_honours_the_servers_decoding_defaults(defaults):
    """A server started with a step quota, the repeat guard, a confidence measure or verify decodes the requests
    that say nothing as generate() does with them: the same tokens in the same number of forwards (the quota and
    the guard, and verify, used to be accepted and ignored)."""
    _, model, tok = converted_pair("llama", block_size=BLOCK)
    scheduler = Scheduler(model, tok, max_batch=2, max_length=64, **defaults).start()
    try:
        prompt = [3, 14, 15, 9, 2, 6]
        done = threading.Event()
        request = Request(prompt, RequestSettings(max_tokens=12),
                          on_update=lambda _text, reason: reason is not None and done.set())  # fmt: skip
        scheduler.submit(request)
        assert done.wait(WAIT_S)
    finally:
        scheduler.stop()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=12, block_size=BLOCK, do_sample=False,
                         eos_token_id=tok.eos_token_id, return_dict_in_generate=True, **defaults)  # fmt: skip
    assert request.tokens == out.sequences[0, len(prompt) :].tolist()[: len(request.tokens)]
    assert request.forwards == int(out.row_forward_passes[0])


def test_verifying_requests_choose_their_candidates():
    """A server built with candidates: verifying requests draft in one forward per block (or two, with
    candidates=0), each equal to block-size-1 decoding, and one asking for more candidates than it has is refused."""
    _, model, tok = converted_pair("llama", block_size=BLOCK)
    scheduler = Scheduler(model, tok, max_batch=3, max_length=64, candidates=2).start()
    prompt = [3, 14, 15, 9, 2, 6]
    try:
        with pytest.raises(ValueError, match="candidates must be an integer between 0 and this server's 2"):
            scheduler.check(prompt, RequestSettings(max_tokens=4, verify=True, candidates=3))
        requests = []
        for count in (None, 0, 1):
            done = threading.Event()
            request = Request(prompt, RequestSettings(max_tokens=12, verify=True, candidates=count),
                              on_update=lambda _text, reason, done=done: reason is not None and done.set())  # fmt: skip
            requests.append((scheduler.submit(request), done))
        assert all(done.wait(WAIT_S) for _, done in requests)
    finally:
        scheduler.stop()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=12, block_size=1, eos_token_id=tok.eos_token_id)
    ar = out[0, len(prompt) :].tolist()
    if tok.eos_token_id in ar:
        ar = ar[: ar.index(tok.eos_token_id) + 1]
    for request, _ in requests:
        assert request.tokens == ar
    assert requests[1][0].forwards > requests[0][0].forwards  # two forwards per block against one


# ----------------------------------------------------------------------------------------------------------
# Token-id prompts, batches of prompts, n, echo and logprobs (what lm-eval's local-completions sends)


def causal_logprobs(model, ids):
    """log p(ids[i] | ids[:i]) straight from the converted model's causal forward, the mask token left out of the
    softmax (it never occurs in text): row i - 1 scores ids[i]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logits[:, model.config.mask_token_id] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


def test_token_id_prompts_batches_and_n_choices(server):
    model, tok, scheduler, client, url = server
    prompts = [[3, 14, 15], [9, 2, 6, 5, 35]]
    want = [reference(model, tok, p, 6)[0] for p in prompts]
    assert client.completions.create(model="tiny", prompt=prompts[1], max_tokens=6).choices[0].text == want[1]
    # a batch of prompts, n choices each: index = prompt * n + choice
    reply = client.completions.create(model="tiny", prompt=prompts, max_tokens=6, n=2)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert [c.text for c in reply.choices] == [want[0], want[0], want[1], want[1]]
    assert reply.usage.prompt_tokens == 8  # each prompt once, whatever n
    assert reply.usage.completion_tokens == sum(len(reference(model, tok, p, 6)[1]) for p in prompts) * 2
    strings = client.completions.create(model="tiny", prompt=[tok.decode(p) for p in prompts], max_tokens=6)
    assert [c.text for c in strings.choices] == want
    # seeded choices are distinct samples: choice j draws with seed + j
    sampled = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=8, n=3, temperature=1.0, seed=5)
    alone = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=8, temperature=1.0, seed=6)
    assert sampled.choices[1].text == alone.choices[0].text
    assert len({c.text for c in sampled.choices}) > 1
    wait_until_idle(scheduler)


def test_echo_and_logprobs_are_the_causal_forwards(server):
    """echo with max_tokens=0 scores the prompt (the first token has no logprob); with max_tokens > 0 the completion
    follows, and every logprob equals a log_softmax of the model's causal forward over the same ids."""
    model, tok, scheduler, client, _ = server
    prompts = [[3, 14, 15, 9, 2, 6, 5], [7, 1, 8]]
    reply = client.completions.create(model="tiny", prompt=prompts, max_tokens=0, echo=True, logprobs=3)
    assert reply.usage.completion_tokens == 0
    for prompt, choice in zip(prompts, reply.choices):
        direct = causal_logprobs(model, prompt)
        lp = choice.logprobs
        assert choice.text == tok.decode(prompt) and choice.finish_reason == "length"
        assert lp.tokens == [tok.decode([t]) for t in prompt]
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(prompt))]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for i in range(1, len(prompt)):
            assert lp.token_logprobs[i] == pytest.approx(direct[i - 1, prompt[i]].item(), abs=1e-5)
            values, ids = direct[i - 1].topk(3)
            top = {tok.decode([t]): v for t, v in zip(ids.tolist(), values.tolist())}
            top.setdefault(lp.tokens[i], direct[i - 1, prompt[i]].item())  # the chosen token is always there
            assert lp.top_logprobs[i] == pytest.approx(top, abs=1e-5)

    prompt = prompts[0]
    text, new = reference(model, tok, prompt, 6, threshold=0.0)
    direct = causal_logprobs(model, prompt + new)
    expected = [direct[i - 1, t].item() for i, t in enumerate(prompt + new) if i]
    echoed = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, echo=True, logprobs=0,
                                       extra_body={"threshold": 0.0}).choices[0]  # fmt: skip
    assert echoed.text == tok.decode(prompt) + text
    assert echoed.logprobs.token_logprobs == pytest.approx([None, *expected], abs=1e-5)
    assert echoed.logprobs.top_logprobs[-1] == {tok.decode([new[-1]]): echoed.logprobs.token_logprobs[-1]}
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, logprobs=2,
                                      extra_body={"threshold": 0.0}).choices[0]  # fmt: skip
    assert plain.text == text and plain.logprobs.tokens == [tok.decode([t]) for t in new]
    assert plain.logprobs.token_logprobs == pytest.approx(expected[-len(new) :], abs=1e-5)
    assert plain.logprobs.text_offset[0] == 0  # offsets into the choice's text

    # lm-eval's log-likelihood request (echo, max_tokens=1, greedy) takes its one token from the scoring forward:
    # the token greedy decoding gives first at any block size and threshold
    scored = client.completions.create(model="tiny", prompt=prompts, max_tokens=1, echo=True, logprobs=1,
                                       temperature=0)  # fmt: skip
    for prompt, choice in zip(prompts, scored.choices):
        for settings in ({"block_size": 1}, {"block_size": BLOCK, "threshold": 0.0}, {"threshold": 0.9}):
            decoded = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, extra_body=settings)
            assert choice.text == tok.decode(prompt) + decoded.choices[0].text
        token = tok.convert_tokens_to_ids(choice.logprobs.tokens[-1])
        direct = causal_logprobs(model, prompt)
        assert token == int(direct[-1].argmax())
        assert choice.logprobs.token_logprobs[-1] == pytest.approx(direct[-1, token].item(), abs=1e-5)
    wait_until_idle(scheduler)


def test_scoring_shares_the_model_with_decoding(server):
    """Scoring runs on the scheduler's worker between decoding steps: scores and greedy outputs of requests sent
    together both stay exact."""
    model, tok, scheduler, client, _ = server
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 60, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g).tolist()
               for _ in range(12)]  # fmt: skip

    def ask(i):
        if i % 2:
            reply = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=10)
            return reply.choices[0].text
        reply = client.completions.create(model="tiny", prompt=[prompts[i]], max_tokens=0, echo=True, logprobs=0)
        return reply.choices[0].logprobs.token_logprobs

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(ask, range(12), timeout=WAIT_S * 2))
    for i, (prompt, answer) in enumerate(zip(prompts, got)):
        if i % 2:
            assert answer == reference(model, tok, prompt, 10)[0]
        else:
            direct = causal_logprobs(model, prompt)
            assert answer == pytest.approx([None, *[direct[j - 1, t].item() for j, t in enumerate(prompt) if j]],
                                           abs=1e-5)  # fmt: skip
    wait_until_idle(scheduler)


def test_where_drafting_does_not_pay_served_verify_decodes_at_block_size_1(monkeypatch):
    """A server whose slots are too many for drafts to pay (denoise.verify_plan) serves verified requests at block
    size 1: block size 1's tokens, one per forward, and no candidate positions in its steps."""
    import hf_blockdiff.denoise as denoise

    monkeypatch.setattr(denoise, "verify_plans", lambda device: ())
    _, model, tok = converted_pair("llama", block_size=BLOCK)
    scheduler = Scheduler(model, tok, max_batch=2, max_length=64, candidates=None).start()
    prompt = [3, 14, 15, 9, 2, 6]
    try:
        done = threading.Event()
        request = Request(prompt, RequestSettings(max_tokens=12, verify=True),
                          on_update=lambda _text, reason: reason is not None and done.set())  # fmt: skip
        scheduler.submit(request)
        assert done.wait(WAIT_S)
    finally:
        scheduler.stop()
    assert scheduler.verify_causally and scheduler.engine.candidates == 0
    _, ar = reference(model, tok, prompt, 12, block_size=1)
    assert request.tokens[: len(ar)] == ar and request.forwards == len(request.tokens)


def test_where_verify_is_the_default_requests_verify_unless_they_set_a_threshold(monkeypatch):
    """On CUDA (scheduler.verify_by_default) a request that says nothing verifies: block size 1's tokens. One that
    sets a threshold, or verify=False, is threshold-decoded; so is every request of a server given a threshold."""
    import hf_blockdiff.scheduler as scheduling

    monkeypatch.setattr(scheduling, "verify_by_default", lambda model: True)
    _, model, tok = converted_pair("llama", block_size=BLOCK)
    prompt = [3, 14, 15, 9, 2, 6]
    _, ar = reference(model, tok, prompt, 12, block_size=1)
    _, thresholded = reference(model, tok, prompt, 12, threshold=0.1)
    assert thresholded != ar  # (a test that can tell the two apart)

    def serve_all(scheduler, asks):
        scheduler.start()
        try:
            requests = []
            for settings in asks:
                done = threading.Event()
                request = Request(prompt, RequestSettings(max_tokens=12, **settings),
                                  on_update=lambda _text, reason, done=done: reason is not None and done.set())  # fmt: skip
                requests.append((scheduler.submit(request), done))
            assert all(done.wait(WAIT_S) for _, done in requests)
        finally:
            scheduler.stop()
        return [request.tokens for request, _ in requests]

    asks = [{}, {"threshold": 0.1}, {"verify": False, "threshold": 0.1}, {"block_size": 1}]
    got = serve_all(Scheduler(model, tok, max_batch=2, max_length=64), asks)
    assert got == [ar[: len(got[0])], thresholded, thresholded, ar[: len(got[3])]] and len(got[0]) == len(ar)
    assert serve_all(Scheduler(model, tok, max_batch=2, max_length=64, threshold=0.1), [{}]) == [thresholded]
