"""Drives a running `mantle dev` while its manifests change, as a developer would.

Usage: python tests/e2e/dev_live.py ENDPOINT MANIFESTS_DIR MANTLE_DEV_PID

1. A second FoundationModel file (another modelId for the same weights) is added: its model
   answers through boto3 within seconds, and the first model keeps answering meanwhile.
2. The file is deleted: the model is gone (ResourceNotFoundException).
3. The first model's runner process is killed: it is started again and the model answers again.
4. A model with `replicas.min: 0` runs no runner until asked: its first request waits in the router
   while the autoscaler starts one, and is answered (one call, no client retry).
Prints how long each took. Exits non-zero on the first failed expectation.
"""

import os
import re
import signal
import sys
import time

import boto3
import botocore.config

endpoint, manifests, dev_pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
BASE = "huggingfacetb.smollm2-135m-instruct-v1:0"
SECOND = "acme.smollm2-second-v1:0"
ZERO = "acme.smollm2-from-zero-v1:0"
config = botocore.config.Config(retries={"max_attempts": 1}, read_timeout=120, connect_timeout=5)
runtime = boto3.session.Session(aws_access_key_id="e2e", aws_secret_access_key="e2e",
                                region_name="us-east-1").client("bedrock-runtime", endpoint_url=endpoint,
                                                                 config=config)


def fail(what, detail):
    print(f"FAIL {what}: {detail}", flush=True)
    sys.exit(1)


def ok(what):
    print(f"ok   {what}", flush=True)


def converse(model):
    reply = runtime.converse(modelId=model, messages=[{"role": "user", "content": [{"text": "Say hi."}]}],
                             inferenceConfig={"maxTokens": 4, "temperature": 0})
    return reply["output"]["message"]["content"][0]["text"]


def until(what, check, timeout):
    start, last = time.time(), None
    while time.time() - start < timeout:
        try:
            if check():
                return time.time() - start
        except Exception as e:  # noqa: BLE001 - any failure is retried until the timeout
            last = e
        time.sleep(0.25)
    fail(what, f"not within {timeout}s; last: {last!r}")


def runner_pids(model_id):
    """This `mantle dev`'s runner processes for the model (not another's on the same machine)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            parent = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == dev_pid and b"runner" in cmdline and f"--model-id={model_id}".encode() in cmdline:
            pids.append(int(pid))
    return pids


converse(BASE)
ok("the first model answers")

# 1. Another model, by adding a file.
source = open(os.path.join(manifests, "smollm2.yaml")).read()
second = re.sub(r"name: smollm2-135m-instruct", "name: smollm2-second", source).replace(BASE, SECOND)
path = os.path.join(manifests, "second.yaml")
open(path + ".tmp", "w").write(second)
os.rename(path + ".tmp", path)
took = until("the added model answers", lambda: converse(SECOND) is not None, 120)
ok(f"the added model answers ({took:.1f}s from the new file to its first answer)")
converse(BASE)
ok("the first model still answers")

# 2. Deleted: gone.
os.remove(path)


def gone():
    try:
        converse(SECOND)
        return False
    except runtime.exceptions.ResourceNotFoundException:
        return True


took = until("the deleted model is gone", gone, 30)
ok(f"the deleted model is gone ({took:.1f}s)")

# 3. A runner that dies comes back.
before = runner_pids(BASE)
if len(before) != 1:
    fail("one runner for the first model", before)
os.kill(before[0], signal.SIGKILL)
took = until("the runner comes back", lambda: runner_pids(BASE) not in ([], before) and converse(BASE) is not None,
             120)
ok(f"a killed runner is started again and its model answers ({took:.1f}s)")

# 4. Scale from zero: no runner until the first request, which waits for one.
zero = re.sub(r"name: smollm2-135m-instruct", "name: smollm2-from-zero", source).replace(BASE, ZERO)
zero = re.sub(r"(replicas:\n\s+)min: 1", r"\1min: 0", zero)
if "min: 0" not in zero:
    fail("a min-0 manifest", zero)
path = os.path.join(manifests, "zero.yaml")
open(path + ".tmp", "w").write(zero)
os.rename(path + ".tmp", path)
time.sleep(3)
if runner_pids(ZERO):
    fail("no runner for a min-0 model before it is asked", runner_pids(ZERO))
start = time.time()
converse(ZERO)
ok(f"a min-0 model's first request waited for its runner and was answered ({time.time() - start:.1f}s)")
if len(runner_pids(ZERO)) != 1:
    fail("one runner for the min-0 model once asked", runner_pids(ZERO))
os.remove(path)
until("the min-0 model's runner stops with its file", lambda: not runner_pids(ZERO), 30)
print("dev live checks passed", flush=True)
