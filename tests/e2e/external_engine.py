"""Drives `mantle dev` in front of an External FoundationModel (llama.cpp's llama-server serving
SmolLM2), with the official clients, as an application team would.

Usage: python tests/e2e/external_engine.py PHASE MANTLE_URL UPSTREAM_URL
  up    every API answers, greedy output equals the upstream's own, a dropped stream frees the
        upstream's slot;
  down  (the upstream was killed) requests fail fast with ServiceUnavailableException and /readyz
        says 503;
  back  (the upstream was started again) requests are answered again.
Exits non-zero on the first failed expectation.
"""

import json
import sys
import time
import urllib.error
import urllib.request

import boto3
import botocore.config
import openai

MODEL = "acme.smollm2-external-v1:0"
QUESTION = "What is the capital of France? Answer in one short sentence."

phase, endpoint, upstream = sys.argv[1:4]
config = botocore.config.Config(retries={"max_attempts": 1}, read_timeout=300)
session = boto3.session.Session(aws_access_key_id="e2e", aws_secret_access_key="e2e", region_name="us-east-1")
runtime = session.client("bedrock-runtime", endpoint_url=endpoint, config=config)
client = openai.OpenAI(base_url=endpoint + "/v1", api_key="e2e", max_retries=0, timeout=300)


def check(name, ok, detail=""):
    if not ok:
        print(f"FAIL {name}: {detail}", flush=True)
        sys.exit(1)
    print(f"ok   {name}", flush=True)


def user(text):
    return [{"role": "user", "content": [{"text": text}]}]


def http(method, url, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def direct(max_tokens):
    """The upstream's own greedy answer and usage for QUESTION."""
    status, body = http("POST", upstream + "/v1/chat/completions", {
        "messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens, "temperature": 0})
    assert status == 200, (status, body)
    answer = json.loads(body)
    return answer["choices"][0]["message"]["content"], answer["usage"]


def busy_slots():
    status, body = http("GET", upstream + "/slots")
    assert status == 200, (status, body)
    return sum(1 for s in json.loads(body) if s.get("is_processing"))


def converse(max_tokens=48):
    return runtime.converse(modelId=MODEL, messages=user(QUESTION),
                            inferenceConfig={"maxTokens": max_tokens, "temperature": 0})


if phase == "up":
    expected, expected_usage = direct(48)
    reply = converse()
    text = reply["output"]["message"]["content"][0]["text"]
    check("converse equals the upstream's greedy answer", text == expected, (text, expected))
    # Bedrock counts prompt tokens read from the cache apart (the upstream's prompt cache holds this
    # prompt since the direct call).
    usage = reply["usage"]
    check("converse usage is the upstream's",
          usage["inputTokens"] + usage.get("cacheReadInputTokens", 0) == expected_usage["prompt_tokens"]
          and usage["outputTokens"] == expected_usage["completion_tokens"], (usage, expected_usage))

    events = list(runtime.converse_stream(modelId=MODEL, messages=user(QUESTION),
                                          inferenceConfig={"maxTokens": 48, "temperature": 0})["stream"])
    streamed = "".join(e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e)
    check("converse_stream equals the upstream's greedy answer", streamed == expected, (streamed, expected))
    check("converse_stream usage", events[-1]["metadata"]["usage"]["outputTokens"]
          == expected_usage["completion_tokens"], events[-1])

    body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 48, "temperature": 0,
            "messages": [{"role": "user", "content": QUESTION}]}
    out = json.loads(runtime.invoke_model(modelId=MODEL, body=json.dumps(body))["body"].read())
    check("invoke_model", out["content"][0]["text"] == expected, out)

    stopped = runtime.converse(modelId=MODEL, messages=user(QUESTION),
                               inferenceConfig={"maxTokens": 48, "temperature": 0, "stopSequences": ["Paris"]})
    check("stop sequence", stopped["stopReason"] == "stop_sequence"
          and stopped["output"]["message"]["content"][0]["text"] == expected.split("Paris")[0], stopped)

    counted = runtime.count_tokens(modelId=MODEL, input={"converse": {"messages": user(QUESTION)}})["inputTokens"]
    check("count_tokens equals the upstream's prompt tokens", counted == expected_usage["prompt_tokens"],
          (counted, expected_usage))

    completion = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                                max_tokens=48, temperature=0)
    check("openai chat", completion.choices[0].message.content == expected, completion)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=48, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    parts, last = [], None
    for chunk in stream:
        last = chunk
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    check("openai chat stream", "".join(parts) == expected, parts)
    check("openai stream usage", last.usage is not None
          and last.usage.completion_tokens == expected_usage["completion_tokens"], last)

    # A client that drops a stream half way frees the upstream's slot.
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a long story."}],
                                            max_tokens=1000, temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 5:
            break
    check("the dropped generation was running", busy_slots() == 1)
    stream.close()
    deadline = time.time() + 5
    while busy_slots() > 0 and time.time() < deadline:
        time.sleep(0.05)
    check("a dropped stream frees the upstream's slot", busy_slots() == 0)

elif phase == "down":
    started = time.time()
    try:
        converse()
        check("a dead upstream is refused", False, "answered")
    except runtime.exceptions.ServiceUnavailableException as e:
        took = time.time() - started
        check("a dead upstream is ServiceUnavailableException, fast", took < 2, (took, str(e)))
    try:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=8)
        check("openai: a dead upstream is refused", False, "answered")
    except openai.APIStatusError as e:
        check("openai: a dead upstream is 503", e.status_code == 503, e)
    status, body = http("GET", endpoint + "/readyz")
    check("/readyz reports the model", status == 503 and MODEL in body.decode(), (status, body))

elif phase == "back":
    expected, _ = direct(24)
    reply = converse(24)
    check("a restarted upstream is used again", reply["output"]["message"]["content"][0]["text"] == expected, reply)
    status, _ = http("GET", endpoint + "/readyz")
    check("/readyz is ready again", status == 200, status)

else:
    sys.exit(f"unknown phase {phase}")
