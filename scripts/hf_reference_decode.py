"""Reference for the GPU decode benchmark: Hugging Face transformers (eager, fp16) greedy decoding
of the same GGUF model (dequantized by transformers' GGUF loader), the same chat prompt and the
same number of generated tokens as `benches/decode.rs`, at the given batch sizes.

python3 scripts/hf_reference_decode.py MODEL.gguf --tokens 128 --streams 1,16,64,256
Needs torch with CUDA, transformers and the `gguf` package.
"""
import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("gguf")
ap.add_argument("--tokens", type=int, default=128)
ap.add_argument("--streams", default="1,16,64")
args = ap.parse_args()

folder, name = os.path.split(os.path.abspath(args.gguf))
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float16).cuda().eval()
text = tok.apply_chat_template(
    [{"role": "user", "content": "Write a short story about a lighthouse keeper."}], tokenize=False, add_generation_prompt=True
)
ids = tok(text, return_tensors="pt").input_ids.cuda()
print(f"hf-transformers {torch.__version__} on {torch.cuda.get_device_name()}: prompt {ids.shape[1]} tokens")


def run(batch, new_tokens):
    x = ids.repeat(batch, 1)
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=tok.eos_token_id)
    torch.cuda.synchronize()
    return time.perf_counter() - t


run(1, 8)  # warm up
for n in [int(s) for s in args.streams.split(",")]:
    first = min(run(n, 1) for _ in range(3))
    total = run(n, args.tokens)
    rate = n * (args.tokens - 1) / (total - first)
    print(f"hf        streams {n:>3}: time to first token {first * 1e3:7.1f} ms, decode {rate:7.1f} tokens/s aggregate ({rate / n:.1f} per stream)")
