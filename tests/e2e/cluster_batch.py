"""Batch inference on the cluster path: boto3's `bedrock` client against `mantle-router
--kubernetes`, `mantle-operator` turning the BatchJob into an Indexed Job, and `mantle-batch`
worker processes started the way the kubelet starts the Job's pods (this script is the kubelet:
no container runtime runs here). All against one API server (../shared/tools/fake_apiserver.py)
and S3 on moto.

Usage: python tests/e2e/cluster_batch.py ROUTER API_SERVER S3_ENDPOINT MANTLE_BATCH KUBECONFIG

1. A job of 300 records in 3 files: the router creates its BatchJob (in the model's namespace);
   the operator makes the Indexed Job (two workers: the model plans two shared replicas) with
   the job's ARN; the workers run; worker 1 is SIGKILLed mid-shard and started again (as the Job
   controller would); the job ends Completed with every record exactly once, the status counts
   and progress from the coordinator, one control-table row per shard (the killed one tried twice).
2. StopModelInvocationJob on a running job, once a short shard has committed: the operator
   suspends the Job, the kubelet (here) sends SIGTERM, the workers keep what committed and
   worker 0 writes Stopped; the outputs hold the committed shards' records once each.
Exits non-zero on the first failed expectation.
"""

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import boto3
import botocore.config

router, api, s3_endpoint, mantle_batch, kubeconfig = sys.argv[1:6]
MODEL = "huggingfacetb.smollm2-135m-instruct-v1:0"
NAMESPACE = "default"
BUCKET = "lake"
session = boto3.session.Session(aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")
config = botocore.config.Config(retries={"max_attempts": 1}, read_timeout=60, connect_timeout=5)
bedrock = session.client("bedrock", endpoint_url=router, config=config)
s3 = session.client("s3", endpoint_url=s3_endpoint)
ENDED = {"Completed", "PartiallyCompleted", "Failed", "Stopped", "Expired"}


def fail(what, detail):
    print(f"FAIL {what}: {detail}", flush=True)
    sys.exit(1)


def ok(what):
    print(f"ok   {what}", flush=True)


def get(path):
    try:
        with urllib.request.urlopen(f"{api}{path}", timeout=5) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def batch_job(name):
    return get(f"/apis/mantle.dev/v1alpha1/namespaces/{NAMESPACE}/batchjobs/{name}")


def until(what, check, timeout=120, every=0.5):
    start = time.time()
    while time.time() - start < timeout:
        value = check()
        if value:
            return value
        time.sleep(every)
    fail(what, f"not after {timeout}s")


def upload(prefix, sizes):
    """One input file per size; record ids count up over the files."""
    try:
        s3.create_bucket(Bucket=BUCKET)
    except Exception:
        pass
    first = 0
    for f, n in enumerate(sizes):
        lines = []
        for i in range(n):
            r = first + i
            lines.append(json.dumps({"recordId": f"R{r:05d}", "modelInput": {
                "anthropic_version": "bedrock-2023-05-31", "max_tokens": 6,
                "messages": [{"role": "user", "content": [{"type": "text", "text": f"Count to {r % 10}."}]}]}}))
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}/part-{f}.jsonl", Body=("\n".join(lines) + "\n").encode())
        first += n
    return [f"R{r:05d}" for r in range(first)]


def create(name, prefix):
    return bedrock.create_model_invocation_job(
        jobName=name, roleArn="arn:aws:iam::123456789012:role/batch", modelId=MODEL,
        inputDataConfig={"s3InputDataConfig": {"s3Uri": f"s3://{BUCKET}/{prefix}/"}},
        outputDataConfig={"s3OutputDataConfig": {"s3Uri": f"s3://{BUCKET}/{name}-out/"}})["jobArn"]


class Kubelet:
    """Runs a Job's pods as processes: the container's args and env (literal values, the
    secretKeyRef from the API server's Secret, the downward API's namespace), the completion
    index, and the in-cluster credentials (here the kubeconfig)."""

    def __init__(self, job):
        self.job = job
        self.container = job["spec"]["template"]["spec"]["containers"][0]
        self.pods = {}

    def env(self, index):
        env = {"PATH": os.environ["PATH"], "KUBECONFIG": kubeconfig, "JOB_COMPLETION_INDEX": str(index),
               # The node's own identity for the object store (IRSA, Pod Identity).
               "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
               "RUST_LOG": "info"}
        for var in self.container.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
            elif "secretKeyRef" in var["valueFrom"]:
                ref = var["valueFrom"]["secretKeyRef"]
                secret = get(f"/api/v1/namespaces/{NAMESPACE}/secrets/{ref['name']}")
                env[var["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
            elif "fieldRef" in var["valueFrom"]:
                env[var["name"]] = NAMESPACE
        return env

    def start(self, index, log):
        self.pods[index] = subprocess.Popen([mantle_batch, *self.container["args"]], env=self.env(index),
                                            stdout=log, stderr=subprocess.STDOUT)

    def start_all(self, log):
        for index in range(self.job["spec"]["completions"]):
            self.start(index, log)

    def wait(self, timeout=300):
        start = time.time()
        codes = {}
        for index, pod in self.pods.items():
            codes[index] = pod.wait(timeout=max(1, timeout - (time.time() - start)))
        return codes

    def terminate(self):
        for pod in self.pods.values():
            if pod.poll() is None:
                pod.send_signal(signal.SIGTERM)


def outputs(out, job_id):
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{out}/{job_id}/").get("Contents", [])]
    lines, manifest = [], None
    for key in keys:
        if any(part.startswith("_") for part in key.split("/")):
            continue
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
        if key.endswith("manifest.json.out"):
            manifest = json.loads(body)
        else:
            lines += [json.loads(l) for l in body.splitlines() if l.strip()]
    return lines, manifest


def committed(out, job_id):
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{out}/{job_id}/_mantle/shards/").get("Contents", [])]
    return [k for k in keys if k.endswith(".json")]


def control_rows(out, job_id):
    from deltalake import DeltaTable
    options = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}
    table = DeltaTable(f"s3://{BUCKET}/{out}/_control", storage_options=options)
    return [r for r in table.to_pyarrow_table().to_pylist() if r["job_id"] == job_id]


def worker_job(name):
    return until(f"the operator's Job for {name}",
                 lambda: get(f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{name}-initial"))


def run_to_completion(log):
    ids = upload("cluster-in", [100, 100, 100])
    arn = create("cluster-flow", "cluster-in")
    job_id = arn.rsplit("/", 1)[1]
    obj = until("the BatchJob", lambda: batch_job("cluster-flow"))
    if obj["metadata"]["namespace"] != NAMESPACE:
        fail("namespace", obj["metadata"])
    job = worker_job("cluster-flow")
    workers = job["spec"]["completions"]
    if job["spec"]["completionMode"] != "Indexed" or workers != 2:
        fail("Indexed Job", f"{job['spec']['completionMode']} with {workers} completions, want 2 (two shared replicas)")
    status = until("Scheduled with an ARN", lambda: (batch_job("cluster-flow").get("status") or {}).get("jobArn") and batch_job("cluster-flow")["status"])
    if status["jobArn"] != arn or status["phase"] != "Scheduled":
        fail("status before the workers", status)
    ok(f"CreateModelInvocationJob → BatchJob {NAMESPACE}/cluster-flow → Indexed Job of {workers} workers; Scheduled, ARN {arn}")
    kubelet = Kubelet(job)
    kubelet.start_all(log)
    # Worker 1 owns shard 1 (of 3: one per file); killed before it commits, and run again.
    started = f"cluster-flow-out/{job_id}/_mantle/shards/000001.attempts"
    until("worker 1 starting its shard", lambda: s3.list_objects_v2(Bucket=BUCKET, Prefix=started).get("KeyCount"), every=0.1)
    time.sleep(0.3)
    if committed("cluster-flow-out", job_id).count(f"cluster-flow-out/{job_id}/_mantle/shards/000001.json"):
        fail("kill mid-shard", "worker 1 finished its shard before it could be killed; make the shard longer")
    kubelet.pods[1].kill()
    kubelet.pods[1].wait()
    kubelet.start(1, log)
    ok("worker 1 killed mid-shard (SIGKILL) and started again, as the Job controller does")
    codes = kubelet.wait()
    if any(codes.values()):
        fail("worker exit codes", codes)
    got = bedrock.get_model_invocation_job(jobIdentifier=arn)
    if got["status"] != "Completed":
        fail("GetModelInvocationJob", got)
    lines, manifest = outputs("cluster-flow-out", job_id)
    seen = [l["recordId"] for l in lines]
    if sorted(seen) != sorted(ids):
        dupes = sorted({i for i in seen if seen.count(i) > 1})[:5]
        fail("exactly once", f"{len(seen)} lines for {len(ids)} records; duplicated {dupes}")
    if manifest["successRecordCount"] != 300 or manifest["totalRecordCount"] != 300:
        fail("manifest", manifest)
    status = batch_job("cluster-flow")["status"]
    if status["records"]["success"] != 300 or status["progress"] != "300/300 (100%)" or not status.get("endTime"):
        fail("status from the coordinator", status)
    rows = control_rows("cluster-flow-out", job_id)
    keys = sorted((r["shard_id"], r["status"]) for r in rows)
    if keys != [(0, "SUCCEEDED"), (1, "SUCCEEDED"), (2, "SUCCEEDED")]:
        fail("control table", keys)
    attempts = {r["shard_id"]: r["attempts"] for r in rows}
    if attempts[1] != 2:
        fail("control table attempts", attempts)
    ok(f"Completed: 300 records exactly once over {workers} workers, status {status['progress']} and "
       f"{status['tokens']['input']} input tokens from the coordinator; control table {keys} (shard 1 tried twice)")


def stop(log):
    # A short first file: its shard commits while the long ones run.
    upload("cluster-stop-in", [40, 400, 400, 400])
    arn = create("cluster-stop", "cluster-stop-in")
    job_id = arn.rsplit("/", 1)[1]
    job = worker_job("cluster-stop")
    kubelet = Kubelet(job)
    kubelet.start_all(log)
    until("the short shard committed", lambda: committed("cluster-stop-out", job_id), every=0.1)
    bedrock.stop_model_invocation_job(jobIdentifier=arn)
    # The operator suspends the Job; the kubelet then terminates its pods.
    until("the Job suspended", lambda: get(f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/cluster-stop-initial")["spec"].get("suspend"))
    kubelet.terminate()
    codes = kubelet.wait(timeout=120)
    if any(codes.values()):
        fail("stopped workers' exit codes", codes)
    got = until("Stopped", lambda: (lambda j: j if j["status"] in ENDED else None)(bedrock.get_model_invocation_job(jobIdentifier=arn)), timeout=60)
    if got["status"] != "Stopped":
        fail("StopModelInvocationJob", got)
    lines, manifest = outputs("cluster-stop-out", job_id)
    seen = [l["recordId"] for l in lines]
    if len(seen) != len(set(seen)) or not 40 <= len(seen) < 1240 or manifest["processedRecordCount"] != len(seen):
        fail("stopped outputs", f"{len(seen)} lines, {len(set(seen))} distinct; manifest {manifest}")
    ok(f"StopModelInvocationJob → Job suspended → workers terminated → Stopped with the {len(seen)} of 1240 records "
       "of the shards that committed, once each")


with open(os.environ.get("MANTLE_WORKER_LOG", os.devnull), "a") as log:
    run_to_completion(log)
    stop(log)
