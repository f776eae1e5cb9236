#!/usr/bin/env python3
"""Perplexity through Mantle's completions API beside llama.cpp's, on the same tokens.

The text is tokenized once (llama.cpp's tokenizer for the GGUF); the token ids are scored by
llama.cpp (llama-cpp-python, logits for every position) and sent to a running Mantle as a
token-id prompt to `/v1/completions` with `echo`, `logprobs` and `max_tokens: 0` — what
lm-evaluation-harness's local-completions model does. Reports both perplexities and how far the
per-token log-probabilities differ.

Usage: scripts/perplexity_vs_llamacpp.py --gguf MODEL.gguf --endpoint http://127.0.0.1:8080
       --model-id MODEL_ID [--text-file FILE] [--threads N]
(run with the venv that scripts/bench-engine.sh builds, which has llama-cpp-python).
"""
import argparse
import ctypes
import json
import math
import urllib.request

import llama_cpp
import numpy as np

TEXT = (
    "The history of the lighthouse is the history of the sea. Long before electric lamps, fires were lit on "
    "headlands to warn sailors of rocks and shallow water. The Pharos of Alexandria, built in the third century "
    "before the common era, was counted among the wonders of the ancient world, and its light was said to be "
    "visible for many miles. In later centuries, towers of stone and iron rose along the coasts of Europe and "
    "America, each with its own pattern of flashes so that a navigator could tell one from another at night. "
    "Keepers lived in small houses at the foot of the towers, trimming wicks, polishing lenses and winding the "
    "clockwork that turned the light. Today most lighthouses are automated, and satellite navigation has made "
    "them less important than they once were, but many still stand, cared for by volunteers and visited by "
    "people who admire their quiet, stubborn usefulness."
)

parser = argparse.ArgumentParser()
parser.add_argument("--gguf", required=True)
parser.add_argument("--endpoint", required=True)
parser.add_argument("--model-id", required=True)
parser.add_argument("--text-file")
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()
text = open(args.text_file).read() if args.text_file else TEXT

llama_cpp.llama_backend_init()
model_params = llama_cpp.llama_model_default_params()
# llama.cpp's AMX repacked-weight buffers crash on these VMs; use the regular CPU kernels.
model_params.use_extra_bufts = False
model = llama_cpp.llama_model_load_from_file(args.gguf.encode(), model_params)
vocab = llama_cpp.llama_model_get_vocab(model)
n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
buf = (llama_cpp.llama_token * 8192)()
data = text.encode()
n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, 8192, False, False)
tokens = list(buf[:n])

ctx_params = llama_cpp.llama_context_default_params()
ctx_params.n_ctx = max(512, n + 16)
ctx_params.n_batch = ctx_params.n_ctx
ctx_params.n_ubatch = ctx_params.n_ctx
ctx_params.n_threads = ctx_params.n_threads_batch = args.threads
ctx = llama_cpp.llama_init_from_model(model, ctx_params)
batch = llama_cpp.llama_batch_init(n, 0, 1)
for i, t in enumerate(tokens):
    batch.token[i] = t
    batch.pos[i] = i
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = 0
    batch.logits[i] = True
batch.n_tokens = n
assert llama_cpp.llama_decode(ctx, batch) == 0, "llama_decode failed"
reference = []
for i in range(n - 1):
    row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).astype(np.float64)
    top = row.max()
    log_z = top + math.log(np.exp(row - top).sum())
    reference.append(row[tokens[i + 1]] - log_z)

body = {"model": args.model_id, "prompt": tokens, "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0}
request = urllib.request.Request(args.endpoint.rstrip("/") + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json", "authorization": "Bearer local"})
with urllib.request.urlopen(request, timeout=600) as response:
    reply = json.load(response)
mantle = reply["choices"][0]["logprobs"]["token_logprobs"][1:]
assert len(mantle) == len(reference), (len(mantle), len(reference))

ppl = lambda lps: math.exp(-sum(lps) / len(lps))  # noqa: E731
diff = np.abs(np.array(mantle) - np.array(reference))
print(f"tokens scored: {len(reference)}")
print(f"perplexity: mantle {ppl(mantle):.4f}, llama.cpp {ppl(reference):.4f}, ratio {ppl(mantle) / ppl(reference):.4f}")
print(f"per-token |logprob difference|: mean {diff.mean():.4f}, median {np.median(diff):.4f}, max {diff.max():.4f}")
