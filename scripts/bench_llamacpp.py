#!/usr/bin/env python3
"""The llama.cpp reference for the engine benchmark: the same GGUF, prompt, thread count and token
budget as `cargo bench -p mantle-engine --bench decode`, through llama-cpp-python.

Reports time to first token and decode tokens/s for 1..N streams decoding in one batch (N
sequences in one context, one token each per llama_decode call: what llama-server's parallel
slots do, without the HTTP layer).
"""
import argparse
import ctypes
import time

import llama_cpp
import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--tokens", type=int, default=128)
parser.add_argument("--streams", default="1,4,16,64")
args = parser.parse_args()

QUESTION = "Write a short story about a lighthouse keeper."
llama_cpp.llama_backend_init()
model_params = llama_cpp.llama_model_default_params()
# The AMX repacked-weight buffers crash on these VMs; use the regular CPU kernels.
model_params.use_extra_bufts = False
model = llama_cpp.llama_model_load_from_file(args.model.encode(), model_params)
vocab = llama_cpp.llama_model_get_vocab(model)
n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)

# The model's own chat template (SmolLM2: ChatML with its default system prompt), as the engine does.
chat = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
buf = (llama_cpp.llama_token * 4096)()
n_prompt = llama_cpp.llama_tokenize(vocab, chat.encode(), len(chat.encode()), buf, 4096, False, True)
prompt = list(buf[:n_prompt])


def run(streams):
    ctx_params = llama_cpp.llama_context_default_params()
    ctx_params.n_ctx = streams * (len(prompt) + args.tokens + 16)
    ctx_params.n_batch = max(512, streams * len(prompt))
    ctx_params.n_ubatch = 512
    ctx_params.n_seq_max = streams
    ctx_params.n_threads = args.threads
    ctx_params.n_threads_batch = args.threads
    ctx = llama_cpp.llama_init_from_model(model, ctx_params)
    batch = llama_cpp.llama_batch_init(max(streams * len(prompt), streams), 0, 1)

    def submit(entries):
        batch.n_tokens = len(entries)
        for i, (tok, pos, seq, want) in enumerate(entries):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = want
        assert llama_cpp.llama_decode(ctx, batch) == 0

    def argmax(i):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
        return int(np.argmax(logits))

    start = time.perf_counter()
    entries = [(t, p, s, p == len(prompt) - 1) for s in range(streams) for p, t in enumerate(prompt)]
    for chunk in range(0, len(entries), ctx_params.n_batch):
        part = entries[chunk:chunk + ctx_params.n_batch]
        submit(part)
    # Logits of each stream's last prompt token.
    firsts = [argmax(-1)] * streams if streams == 1 else None
    if firsts is None:
        last_chunk = entries[(len(entries) - 1) // ctx_params.n_batch * ctx_params.n_batch:]
        idx = [i for i, e in enumerate(last_chunk) if e[3]]
        firsts = [argmax(i) for i in idx]
        # Streams whose last token fell in an earlier chunk share the same prompt, so the same token.
        firsts = [firsts[0]] * streams
    ttft = time.perf_counter() - start
    nxt = firsts
    decode_start = time.perf_counter()
    for step in range(1, args.tokens):
        pos = len(prompt) + step - 1
        submit([(nxt[s], pos, s, True) for s in range(streams)])
        nxt = [argmax(s) for s in range(streams)]
    decode = time.perf_counter() - decode_start
    rate = streams * (args.tokens - 1) / decode
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    print(f"llama.cpp streams {streams:>3}: prompt {len(prompt)} tokens, time to first token {ttft * 1e3:7.1f} ms, "
          f"decode {rate:7.1f} tokens/s aggregate ({rate / streams:.1f} per stream)", flush=True)


for n in [int(s) for s in args.streams.split(",")]:
    run(n)
