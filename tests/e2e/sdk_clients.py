"""Drives a running `mantle dev` with the official clients, as an application team would.

Usage: python tests/e2e/sdk_clients.py http://127.0.0.1:8080

Every call goes through boto3 (bedrock-runtime and bedrock) or the OpenAI Python client,
unmodified, pointed at the endpoint. Exits non-zero on the first failed expectation.
"""

import json
import sys

import boto3
import botocore.config
import botocore.exceptions
import openai

TEXT = "huggingfacetb.smollm2-135m-instruct-v1:0"
EMBED = "sentence-transformers.all-minilm-l6-v2-v1:0"
QUESTION = "What is the capital of France? Answer in one short sentence."

endpoint = sys.argv[1]
config = botocore.config.Config(retries={"max_attempts": 1}, read_timeout=300)
session = boto3.session.Session(aws_access_key_id="e2e", aws_secret_access_key="e2e", region_name="us-east-1")
runtime = session.client("bedrock-runtime", endpoint_url=endpoint, config=config)
control = session.client("bedrock", endpoint_url=endpoint, config=config)
checks = []


def check(name, ok, detail=""):
    checks.append(name)
    if not ok:
        print(f"FAIL {name}: {detail}", flush=True)
        sys.exit(1)
    print(f"ok   {name}", flush=True)


def user(text):
    return [{"role": "user", "content": [{"text": text}]}]


# converse
reply = runtime.converse(modelId=TEXT, messages=user(QUESTION), inferenceConfig={"maxTokens": 48, "temperature": 0})
text = reply["output"]["message"]["content"][0]["text"]
usage = reply["usage"]
check("converse answers", "Paris" in text, text)
check("converse usage", usage["inputTokens"] > 10 and 0 < usage["outputTokens"] <= 48
      and usage["totalTokens"] == usage["inputTokens"] + usage["outputTokens"], usage)
check("converse stop reason", reply["stopReason"] in ("end_turn", "max_tokens"), reply["stopReason"])
check("converse latency", reply["metrics"]["latencyMs"] >= 0, reply["metrics"])
check("request id", len(reply["ResponseMetadata"]["RequestId"]) >= 32, reply["ResponseMetadata"])

# converse with a system prompt and a stop sequence; same greedy answer twice
args = dict(modelId=TEXT, system=[{"text": "You are a terse assistant."}], messages=user(QUESTION),
            inferenceConfig={"maxTokens": 32, "temperature": 0})
first = runtime.converse(**args)["output"]["message"]["content"][0]["text"]
second = runtime.converse(**args)["output"]["message"]["content"][0]["text"]
check("temperature 0 is deterministic", first == second, (first, second))
reply = runtime.converse(modelId=TEXT, messages=user(QUESTION),
                         inferenceConfig={"maxTokens": 48, "temperature": 0, "stopSequences": ["Paris"]})
check("stop sequence", reply["stopReason"] == "stop_sequence"
      and "Paris" not in reply["output"]["message"]["content"][0]["text"], reply)

# converse_stream
events = list(runtime.converse_stream(modelId=TEXT, messages=user(QUESTION),
                                      inferenceConfig={"maxTokens": 48, "temperature": 0})["stream"])
kinds = [next(iter(e)) for e in events]
streamed = "".join(e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e)
check("converse_stream order", kinds[0] == "messageStart" and kinds[-2:] == ["messageStop", "metadata"], kinds)
check("converse_stream text", "Paris" in streamed and kinds.count("contentBlockDelta") > 2, streamed)
check("converse_stream usage", events[-1]["metadata"]["usage"]["outputTokens"] > 0, events[-1])

# invoke_model: Anthropic messages body
body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 48, "temperature": 0,
        "messages": [{"role": "user", "content": QUESTION}]}
reply = runtime.invoke_model(modelId=TEXT, body=json.dumps(body))
out = json.loads(reply["body"].read())
check("invoke_model anthropic", out["type"] == "message" and "Paris" in out["content"][0]["text"]
      and out["usage"]["output_tokens"] > 0, out)
check("invoke_model content type", reply["contentType"].startswith("application/json"), reply["contentType"])

# invoke_model: a body of another family is refused. The model declares no invokeModelBody and
# its provider has no Bedrock family, so it takes Anthropic messages bodies only.
prompt = "<|im_start|>user\n" + QUESTION + "<|im_end|>\n<|im_start|>assistant\n"
try:
    runtime.invoke_model(modelId=TEXT, body=json.dumps({"prompt": prompt, "max_gen_len": 32, "temperature": 0}))
    check("invoke_model body of another family", False, "no error")
except runtime.exceptions.ValidationException as e:
    check("invoke_model body of another family", "[prompt]" in str(e) and "not permitted" in str(e), str(e))

# invoke_model_with_response_stream
response = runtime.invoke_model_with_response_stream(modelId=TEXT, body=json.dumps(body))
chunks = [json.loads(e["chunk"]["bytes"]) for e in response["body"]]
types = [c["type"] for c in chunks]
deltas = "".join(c["delta"]["text"] for c in chunks if c["type"] == "content_block_delta")
check("invoke_with_response_stream shape", types[0] == "message_start" and types[-1] == "message_stop", types)
check("invoke_with_response_stream text", "Paris" in deltas, deltas)
check("invocation metrics", chunks[-1]["amazon-bedrock-invocationMetrics"]["outputTokenCount"] > 0, chunks[-1])

# count_tokens, both input kinds
counted = runtime.count_tokens(modelId=TEXT, input={"converse": {"messages": user(QUESTION)}})["inputTokens"]
check("count_tokens converse", counted == usage["inputTokens"], (counted, usage))
counted = runtime.count_tokens(modelId=TEXT, input={"invokeModel": {"body": json.dumps(body)}})["inputTokens"]
check("count_tokens invokeModel", counted > 10, counted)

# embeddings through InvokeModel (Titan shape)
out = json.loads(runtime.invoke_model(modelId=EMBED, body=json.dumps({"inputText": "hello world"}))["body"].read())
check("invoke_model embedding", len(out["embedding"]) == 384 and out["inputTextTokenCount"] > 0, len(out["embedding"]))

# structured output and forced tool calls: constrained decoding guarantees the shape even from a
# 135M model that cannot follow a schema on its own
person = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 30},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
reply = runtime.converse(modelId=TEXT, messages=user("Invent a person."), inferenceConfig={"maxTokens": 60},
                         outputConfig={"textFormat": {"type": "json_schema", "structure": {"jsonSchema": {
                             "schema": json.dumps(person), "name": "person"}}}})
made = json.loads(reply["output"]["message"]["content"][0]["text"])
check("converse outputConfig json_schema", reply["stopReason"] == "end_turn" and set(made) == {"name", "age"}
      and isinstance(made["age"], int) and 0 <= made["age"] <= 120, reply)
weather = {"toolSpec": {"name": "get_weather", "description": "The weather in a city",
                        "inputSchema": {"json": {"type": "object", "required": ["city"], "additionalProperties": False,
                                                 "properties": {"city": {"type": "string", "maxLength": 40}}}}}}
reply = runtime.converse(modelId=TEXT, messages=user("Is it raining in Oslo?"), inferenceConfig={"maxTokens": 60},
                         toolConfig={"tools": [weather], "toolChoice": {"tool": {"name": "get_weather"}}})
uses = [c["toolUse"] for c in reply["output"]["message"]["content"] if "toolUse" in c]
check("converse forced toolChoice", reply["stopReason"] == "tool_use" and len(uses) == 1
      and uses[0]["name"] == "get_weather" and isinstance(uses[0]["input"]["city"], str), reply)

# errors the SDK maps to its exceptions
try:
    runtime.converse(modelId="acme.no-such-model-v1:0", messages=user("hi"))
    check("unknown model", False, "no error")
except runtime.exceptions.ResourceNotFoundException as e:
    check("unknown model", e.response["ResponseMetadata"]["HTTPStatusCode"] == 404, e.response)
try:
    runtime.converse(modelId=TEXT, messages=[{"role": "user", "content": [{"image": {
        "format": "png", "source": {"bytes": b"\x89PNG"}}}]}])
    check("unsupported content block", False, "no error")
except runtime.exceptions.ValidationException as e:
    check("unsupported content block", "image" in str(e), str(e))
try:
    runtime.converse(modelId=TEXT, messages=user(QUESTION), inferenceConfig={"maxTokens": 1_000_000})
    check("max tokens beyond the context", False, "no error")
except runtime.exceptions.ValidationException as e:
    check("max tokens beyond the context", "context" in str(e), str(e))

# control plane
models = control.list_foundation_models()["modelSummaries"]
check("list_foundation_models", {m["modelId"] for m in models} == {TEXT, EMBED}, models)
details = control.get_foundation_model(modelIdentifier=TEXT)["modelDetails"]
check("get_foundation_model", details["modelLifecycle"]["status"] == "ACTIVE" and details["providerName"], details)

# OpenAI client
client = openai.OpenAI(base_url=endpoint + "/v1", api_key="e2e", max_retries=0, timeout=300)
completion = client.chat.completions.create(model=TEXT, messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=48, temperature=0)
check("openai chat", "Paris" in completion.choices[0].message.content
      and completion.usage.completion_tokens > 0, completion)
stream = client.chat.completions.create(model=TEXT, messages=[{"role": "user", "content": QUESTION}],
                                        max_tokens=48, temperature=0, stream=True,
                                        stream_options={"include_usage": True})
parts, last = [], None
for chunk in stream:
    last = chunk
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
check("openai chat stream", "Paris" in "".join(parts) and len(parts) > 2, parts)
check("openai stream usage", last is not None and last.usage is not None and last.usage.completion_tokens > 0, last)
embeddings = client.embeddings.create(model=EMBED, input=["The cat sat on the mat.", "A cat was sitting on a rug.",
                                                          "Quarterly revenue grew by ten percent."])
vectors = [d.embedding for d in embeddings.data]


def cos(a, b):
    return sum(x * y for x, y in zip(a, b))


check("openai embeddings", len(vectors) == 3 and len(vectors[0]) == 384, len(vectors))
check("embeddings are meaningful", cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2]) + 0.2,
      (cos(vectors[0], vectors[1]), cos(vectors[0], vectors[2])))
completion = client.chat.completions.create(
    model=TEXT, messages=[{"role": "user", "content": "Invent a person."}], max_tokens=60,
    response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": person}})
made = json.loads(completion.choices[0].message.content)
check("openai response_format json_schema", completion.choices[0].finish_reason == "stop"
      and set(made) == {"name", "age"} and isinstance(made["age"], int), completion)
tool = {"type": "function", "function": {"name": "get_weather", "parameters": weather["toolSpec"]["inputSchema"]["json"]}}
completion = client.chat.completions.create(
    model=TEXT, messages=[{"role": "user", "content": "Is it raining in Oslo?"}], max_tokens=60, tools=[tool],
    tool_choice={"type": "function", "function": {"name": "get_weather"}})
calls = completion.choices[0].message.tool_calls or []
check("openai forced tool_choice", completion.choices[0].finish_reason == "tool_calls" and len(calls) == 1
      and calls[0].function.name == "get_weather" and "city" in json.loads(calls[0].function.arguments), completion)
completion = client.chat.completions.create(model=TEXT, messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
content = completion.choices[0].logprobs.content
check("openai chat top_logprobs", len(content) > 0 and all(len(t.top_logprobs) == 3 for t in content)
      and all(t.top_logprobs[0].token == t.token for t in content), content)
# The completions API: a raw prompt continued, and a passage scored token by token (echo with
# logprobs and no new tokens), as lm-evaluation-harness's local-completions model asks for.
completion = client.completions.create(model=TEXT, prompt="The capital of France is", max_tokens=8, temperature=0)
check("openai completions", "Paris" in completion.choices[0].text and completion.usage.completion_tokens > 0,
      completion)
PASSAGE = ("The capital of France is Paris. It is known for the Eiffel Tower, the Louvre museum and its cafes. "
           "Millions of tourists visit the city every year.")
scored = client.completions.create(model=TEXT, prompt=PASSAGE, max_tokens=0, echo=True, logprobs=1, temperature=0)
lp = scored.choices[0].logprobs
mean = sum(lp.token_logprobs[1:]) / (len(lp.token_logprobs) - 1)
perplexity = 2.718281828 ** -mean
paris = lp.tokens.index(" Paris")
check("openai completions echo scores the prompt", scored.choices[0].text == PASSAGE and "".join(lp.tokens) == PASSAGE
      and lp.token_logprobs[0] is None and scored.usage.completion_tokens == 0
      and lp.top_logprobs[paris] and lp.token_logprobs[paris] > -3, lp)
check("perplexity through the completions API", 1.0 < perplexity < 60.0, perplexity)
print(f"     perplexity of the passage: {perplexity:.2f} over {len(lp.tokens)} tokens", flush=True)
listed = [m.id for m in client.models.list()]
check("openai models", TEXT in listed and EMBED in listed, listed)
try:
    client.chat.completions.create(model="acme.no-such-model-v1:0", messages=[{"role": "user", "content": "hi"}])
    check("openai unknown model", False, "no error")
except openai.NotFoundError:
    check("openai unknown model", True)

print(f"{len(checks)} checks passed")
