"""Batch inference through boto3's `bedrock` client against `mantle dev`, with S3 on moto.

Usage: python tests/e2e/batch_flow.py ENDPOINT S3_ENDPOINT PHASE [JOB_ARN]

PHASE
  flow     a job of ~200 records (two input files, three bad lines) runs to PartiallyCompleted;
           its outputs are Bedrock's: every record exactly once, error records for the bad lines,
           manifest.json.out with the counts; List filters it; Create is idempotent with the
           same clientRequestToken and a conflict without; an unknown model, an unsupported field
           and an empty input are refused or fail clearly; a stopped job ends Stopped with the
           outputs of its finished shards.
  start    uploads 300 records in 3 files and creates a job; returns once a shard has committed
           (the caller then kills `mantle dev` mid-job); prints the job's ARN.
  finish   waits for JOB_ARN (after `mantle dev` restarted) and checks that every record is in
           the output exactly once.
  manifests MANIFESTS_DIR LAKE_DIR   BatchJob files in the manifests directory, on a bucket
           served from a local directory (`--bucket locallake=LAKE_DIR`): inputTokenLimit's three
           actions; a month-over-month job with reuseFrom where 10 of 60 records changed
           infers exactly those; a rerun of one partition infers exactly its records again.
  bench-throughput MANIFESTS_DIR LAKE_DIR N   (a benchmark) N records as a batch job against the
           same requests sent straight to InvokeModel by 8 client threads (the batch's concurrency),
           three rounds interleaved, a real-time ConverseStream probe beside both (so the ratio
           compares the pipelines under the same real-time traffic), and the probe's time to first
           token measured alone (before each round), beside the direct calls and beside the batch.
  bench-reuse MANIFESTS_DIR LAKE_DIR N   (a benchmark, not a test) N records, then a month-over-
           month job with 5% changed records and reuseFrom; prints both wall times and the ratio.
Exits non-zero on the first failed expectation.
"""

import json
import sys
import time
import uuid

import boto3
import botocore.config
import botocore.exceptions

endpoint, s3_endpoint, phase = sys.argv[1], sys.argv[2], sys.argv[3]
MODEL = "huggingfacetb.smollm2-135m-instruct-v1:0"
ROLE = "arn:aws:iam::123456789012:role/mantle-batch"
BUCKET = "lake"
session = boto3.session.Session(aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")
config = botocore.config.Config(retries={"max_attempts": 1}, read_timeout=60, connect_timeout=5)
bedrock = session.client("bedrock", endpoint_url=endpoint, config=config)
s3 = session.client("s3", endpoint_url=s3_endpoint)
ENDED = {"Completed", "PartiallyCompleted", "Failed", "Stopped", "Expired"}


def fail(what, detail):
    print(f"FAIL {what}: {detail}", flush=True)
    sys.exit(1)


def ok(what):
    print(f"ok   {what}", flush=True)


def record(i, tokens=6):
    return {
        "recordId": f"R{i:05d}",
        "customerId": f"C{i % 7}",
        "modelInput": {
            "anthropic_version": "bedrock-2023-05-31",
            "max_tokens": tokens,
            "messages": [{"role": "user", "content": [{"type": "text", "text": f"Count to {i % 10}."}]}],
        },
    }


def upload(prefix, files):
    try:
        s3.create_bucket(Bucket=BUCKET)
    except botocore.exceptions.ClientError:
        pass
    for name, lines in files.items():
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=("\n".join(lines) + "\n").encode())


def create(name, prefix, out, **extra):
    return bedrock.create_model_invocation_job(
        jobName=name, roleArn=ROLE, modelId=MODEL,
        inputDataConfig={"s3InputDataConfig": {"s3Uri": f"s3://{BUCKET}/{prefix}/"}},
        outputDataConfig={"s3OutputDataConfig": {"s3Uri": f"s3://{BUCKET}/{out}/"}}, **extra)["jobArn"]


def wait(arn, until=ENDED, timeout=420):
    start = time.time()
    while time.time() - start < timeout:
        job = bedrock.get_model_invocation_job(jobIdentifier=arn)
        if job["status"] in until:
            return job
        time.sleep(1)
    fail("wait", f"{arn} still {job['status']} after {timeout}s")


def outputs(out, job_id):
    """Every output line under the job's folder, by file (what spark.read.json of the folder
    reads, less manifest.json.out), and the manifest."""
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{out}/{job_id}/").get("Contents", [])]
    visible = [k for k in keys if not any(part.startswith("_") for part in k.split("/"))]
    lines = {}
    manifest = None
    for key in visible:
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
        if key.endswith("manifest.json.out"):
            manifest = json.loads(body)
        else:
            lines[key.rsplit("/", 1)[1]] = [json.loads(l) for l in body.splitlines() if l.strip()]
    return lines, manifest


def control_rows(uri, job_id, local=False):
    """The job's rows in the Delta control table below an output URI, read with the `deltalake`
    package as a lakehouse reads them."""
    from deltalake import DeltaTable
    options = {} if local else {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test",
                                "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}
    table = DeltaTable(f"{uri.rstrip('/')}/_control", storage_options=options)
    rows = [r for r in table.to_pyarrow_table().to_pylist() if r["job_id"] == job_id]
    keys = [(r["run_id"], r["shard_id"], r["status"]) for r in rows]
    if len(keys) != len(set(keys)):
        fail("control table", f"a shard recorded twice: {sorted(keys)}")
    return rows


def spark_view(paths):
    """What `spark.read.json` of the output files gives, through pyarrow's JSON reader."""
    import pyarrow as pa
    import pyarrow.json as pj
    return pa.concat_tables([pj.read_json(p) for p in paths], promote_options="permissive")


def exactly_once(lines, want_ids):
    seen = [r["recordId"] for rs in lines.values() for r in rs]
    dupes = {i for i in seen if seen.count(i) > 1}
    if dupes:
        fail("exactly once", f"duplicated records: {sorted(dupes)[:5]}")
    missing = set(want_ids) - set(seen)
    if missing:
        fail("exactly once", f"missing records: {sorted(missing)[:5]}")


def flow():
    run = uuid.uuid4().hex[:6]
    good = [json.dumps(record(i)) for i in range(200)]
    # Not JSON; no modelInput; a recordId seen before (R00005).
    bad = ["{not json", json.dumps({"recordId": "NOINPUT"}), json.dumps(record(5))]
    upload(f"in-{run}", {"part-0000.jsonl": good[:120] + bad[:2], "part-0001.jsonl": good[120:] + ["", bad[2]],
                         "notes.txt": ["not an input file"]})
    name = f"e2e-flow-{run}"
    token = f"tok-{run}"
    started = time.time()
    arn = create(name, f"in-{run}", f"out-{run}", clientRequestToken=token, timeoutDurationInHours=24)
    job_id = arn.rsplit("/", 1)[1]
    if not (arn.startswith("arn:aws:bedrock:") and ":model-invocation-job/" in arn and len(job_id) == 12):
        fail("create", f"jobArn {arn!r} is not Bedrock's shape")
    ok(f"create_model_invocation_job → {arn}")
    # The same request again (an SDK retry) is the same job; another job of that name is a conflict.
    again = create(name, f"in-{run}", f"out-{run}", clientRequestToken=token, timeoutDurationInHours=24)
    if again != arn:
        fail("idempotent create", f"{again} != {arn}")
    try:
        create(name, f"in-{run}", f"out-{run}")
        fail("conflict", "a second job of the same name was accepted")
    except botocore.exceptions.ClientError as e:
        if e.response["Error"]["Code"] != "ConflictException":
            fail("conflict", e.response["Error"])
    ok("create is idempotent with its clientRequestToken, a conflict without")

    job = wait(arn)
    took = time.time() - started
    if job["status"] != "PartiallyCompleted":
        fail("status", f"{job['status']}: {job.get('message')}")
    counts = {k: job[k] for k in ("totalRecordCount", "processedRecordCount", "successRecordCount", "errorRecordCount")}
    if counts != {"totalRecordCount": 203, "processedRecordCount": 203, "successRecordCount": 200, "errorRecordCount": 3}:
        fail("counts", counts)
    for key in ("submitTime", "endTime", "lastModifiedTime", "jobExpirationTime"):
        if not hasattr(job.get(key), "year"):
            fail("times", f"{key} = {job.get(key)!r}")
    if job["clientRequestToken"] != token or job["roleArn"] != ROLE or job["modelInvocationType"] != "InvokeModel":
        fail("get", job)
    ok(f"200 records + 3 bad lines → PartiallyCompleted in {took:.1f}s ({200 / took:.1f} records/s), {counts}")

    lines, manifest = outputs(f"out-{run}", job_id)
    if sorted(lines) != ["part-0000.jsonl.out", "part-0001.jsonl.out"]:
        fail("output files", sorted(lines))
    exactly_once({k: [r for r in v if "modelOutput" in r] for k, v in lines.items()}, [f"R{i:05d}" for i in range(200)])
    answered = [r for rs in lines.values() for r in rs if "modelOutput" in r]
    for r in answered:
        out = r["modelOutput"]
        if out.get("type") != "message" or not out["content"][0]["text"] or out["usage"]["output_tokens"] < 1:
            fail("modelOutput", r)
        if r["modelInput"]["messages"][0]["content"][0]["text"] != f"Count to {int(r['recordId'][1:]) % 10}.":
            fail("modelInput echoed", r)
    errors = [r for rs in lines.values() for r in rs if "error" in r]
    if len(errors) != 3 or any(e["error"]["errorCode"] != 400 or not e["error"]["errorMessage"] for e in errors):
        fail("error records", errors)
    messages = " | ".join(e["error"]["errorMessage"] for e in errors)
    for want in ("not a JSON object", "modelInput", "appears earlier"):
        if want not in messages:
            fail("error messages", f"{want!r} not in {messages}")
    want_manifest = {"totalRecordCount": 203, "processedRecordCount": 203, "successRecordCount": 200,
                     "errorRecordCount": 3}
    if {k: manifest.get(k) for k in want_manifest} != want_manifest or manifest["inputTokenCount"] < 200 * 5 \
            or manifest["outputTokenCount"] < 200:
        fail("manifest.json.out", manifest)
    ok(f"outputs: 2 .out files, each record once, 3 error records ({messages[:80]}…), manifest {manifest}")
    rows = control_rows(f"s3://{BUCKET}/out-{run}/", job_id)
    if sum(r["records"] for r in rows) != 203 or sum(r["records_ok"] for r in rows) != 200 \
            or sum(r["records_error"] for r in rows) != 3 or {r["status"] for r in rows} - {"SUCCEEDED", "PARTIAL"} \
            or any(r["output_file"] not in (f"{job_id}/part-0000.jsonl.out", f"{job_id}/part-0001.jsonl.out") for r in rows) \
            or sum(r["tokens_out"] for r in rows) != manifest["outputTokenCount"]:
        fail("control table", rows)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name in lines:
            paths.append(f"{tmp}/{name}")
            s3.download_file(BUCKET, f"out-{run}/{job_id}/{name}", paths[-1])
        view = spark_view(paths)
    if view.num_rows != 203 or "modelOutput" not in view.column_names or "error" not in view.column_names:
        fail("spark view", view.schema)
    ok(f"control table (Delta, read with the deltalake package): {len(rows)} shard rows, one each; "
       f"a Spark-style JSON read of the outputs: {view.num_rows} rows, columns {view.column_names}")

    listed = bedrock.list_model_invocation_jobs(nameContains=f"flow-{run}")["invocationJobSummaries"]
    if [j["jobArn"] for j in listed] != [arn]:
        fail("list nameContains", listed)
    listed = bedrock.list_model_invocation_jobs(statusEquals="Completed", nameContains=run)["invocationJobSummaries"]
    if listed:
        fail("list statusEquals", listed)
    by_id = bedrock.get_model_invocation_job(jobIdentifier=job_id)
    if by_id["jobArn"] != arn:
        fail("get by id", by_id)
    ok("list filters by name and status; get takes the ARN or the id")

    # Refusals: an unknown model, an unsupported field, a stop of an ended job.
    for kwargs, code in [
        ({"modelId": "acme.nope-v1:0"}, "ResourceNotFoundException"),
        ({"vpcConfig": {"subnetIds": ["s"], "securityGroupIds": ["g"]}}, "ValidationException"),
    ]:
        try:
            args = dict(jobName=f"e2e-bad-{run}", roleArn=ROLE, modelId=MODEL,
                        inputDataConfig={"s3InputDataConfig": {"s3Uri": f"s3://{BUCKET}/in-{run}/"}},
                        outputDataConfig={"s3OutputDataConfig": {"s3Uri": f"s3://{BUCKET}/x-{run}/"}})
            args.update(kwargs)
            bedrock.create_model_invocation_job(**args)
            fail("refusal", f"{kwargs} was accepted")
        except botocore.exceptions.ClientError as e:
            if e.response["Error"]["Code"] != code:
                fail("refusal", f"{kwargs}: {e.response['Error']}")
    try:
        bedrock.stop_model_invocation_job(jobIdentifier=arn)
        fail("stop ended job", "accepted")
    except botocore.exceptions.ClientError as e:
        if e.response["Error"]["Code"] != "ValidationException":
            fail("stop ended job", e.response["Error"])
    empty = create(f"e2e-empty-{run}", f"nothing-{run}", f"out-empty-{run}")
    job = wait(empty, timeout=60)
    if job["status"] != "Failed" or "no .jsonl input" not in job.get("message", ""):
        fail("empty input", job)
    ok(f"refused: unknown model, vpcConfig, stopping an ended job; empty input fails: {job['message']}")

    # Stop: Stopping → Stopped, with the finished shards' outputs and nothing twice.
    upload(f"long-{run}", {f"part-{f}.jsonl": [json.dumps(record(1000 * f + i, tokens=48)) for i in range(60)]
                           for f in range(4)})
    arn = create(f"e2e-stop-{run}", f"long-{run}", f"out-stop-{run}")
    wait(arn, until={"InProgress"}, timeout=120)
    bedrock.stop_model_invocation_job(jobIdentifier=arn)
    job = wait(arn, timeout=300)
    if job["status"] != "Stopped":
        fail("stop", job)
    lines, manifest = outputs(f"out-stop-{run}", arn.rsplit("/", 1)[1])
    seen = [r["recordId"] for rs in lines.values() for r in rs]
    if len(seen) != len(set(seen)) or manifest is None or manifest["processedRecordCount"] != len(seen) \
            or len(seen) >= 240:
        fail("stopped outputs", f"{len(seen)} lines, manifest {manifest}")
    ok(f"stopped mid-job: Stopped with {len(seen)} of 240 records written once")


def start():
    run = uuid.uuid4().hex[:6]
    upload(f"restart-{run}", {f"part-{f}.jsonl": [json.dumps(record(1000 * f + i, tokens=24)) for i in range(100)]
                              for f in range(3)})
    arn = create(f"e2e-restart-{run}", f"restart-{run}", f"out-restart-{run}")
    start = time.time()
    while time.time() - start < 300:
        job = bedrock.get_model_invocation_job(jobIdentifier=arn)
        if job["status"] in ENDED:
            fail("start", f"the job ended before it could be interrupted: {job['status']}")
        if job["processedRecordCount"] > 0:
            break
        time.sleep(0.5)
    ok(f"job running, {job['processedRecordCount']} of {job['totalRecordCount']} records committed")
    print(f"ARN {arn} OUT out-restart-{run}", flush=True)


def finish(arn, out):
    job = wait(arn)
    if job["status"] != "Completed" or job["successRecordCount"] != 300:
        fail("resumed job", job)
    lines, manifest = outputs(out, arn.rsplit("/", 1)[1])
    exactly_once(lines, [f"R{1000 * f + i:05d}" for f in range(3) for i in range(100)])
    if sum(len(v) for v in lines.values()) != 300 or manifest["successRecordCount"] != 300:
        fail("resumed outputs", manifest)
    rows = control_rows(f"s3://{BUCKET}/{out}/", arn.rsplit("/", 1)[1])
    if sum(r["records_ok"] for r in rows) != 300 or any(r["status"] != "SUCCEEDED" for r in rows):
        fail("control table after a restart", rows)
    retried = [r["shard_id"] for r in rows if r["attempts"] > 1]
    ok(f"after the restart the job completed: 300 records, each exactly once, manifest {manifest}; "
       f"control table: {len(rows)} shard rows, one each (shards tried twice: {retried})")


def manifest_job(directory, name, spec):
    text = json.dumps({"apiVersion": "mantle.dev/v1alpha1", "kind": "BatchJob", "metadata": {"name": name},
                       "spec": {"modelId": MODEL, **spec}}, indent=1)
    with open(f"{directory}/{name}.yaml", "w") as f:
        f.write(text)  # JSON is YAML


def by_name(name, until=ENDED, timeout=300, ended_after=None):
    start = time.time()
    while time.time() - start < timeout:
        jobs = bedrock.list_model_invocation_jobs(nameContains=name)["invocationJobSummaries"]
        job = next((j for j in jobs if j["jobName"] == name), None)
        if job and job["status"] in until and (ended_after is None or job["endTime"] > ended_after):
            return job
        time.sleep(0.5)
    fail("wait", f"{name}: {job}")


def local_outputs(lake, prefix, job_id):
    import glob
    import os
    lines, manifest = {}, None
    for path in glob.glob(f"{lake}/{prefix}/{job_id}/*"):
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            text = f.read()
        if path.endswith("manifest.json.out"):
            manifest = json.loads(text)
        else:
            lines[os.path.basename(path)] = [json.loads(l) for l in text.splitlines() if l.strip()]
    return lines, manifest


def manifests(directory, lake):
    import os
    run = uuid.uuid4().hex[:6]
    long_text = " ".join(["The customer called about the invoice again."] * 30)

    def write_input(prefix, records):
        os.makedirs(f"{lake}/{prefix}", exist_ok=True)
        with open(f"{lake}/{prefix}/records.jsonl", "w") as f:
            f.write("\n".join(json.dumps(r) for r in records) + "\n")

    # inputTokenLimit: 4 short records and one far over 60 tokens, under each action.
    guard = [record(i) for i in range(4)]
    guard.append({"recordId": "LONG", "modelInput": {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 6,
                  "messages": [{"role": "user", "content": [{"type": "text", "text": long_text}]}]}})
    write_input(f"guard-{run}", guard)
    for action in ("FAIL_RECORD", "TRUNCATE", "SKIP"):
        manifest_job(directory, f"e2e-guard-{action.lower().replace('_', '-')}-{run}", {
            "input": {"uri": f"s3://locallake/guard-{run}/"}, "output": {"uri": f"s3://locallake/guard-out-{run}/"},
            "inputTokenLimit": {"maxTokens": 60, "action": action}})
    results = {}
    for action in ("FAIL_RECORD", "TRUNCATE", "SKIP"):
        name = f"e2e-guard-{action.lower().replace('_', '-')}-{run}"
        job = by_name(name)
        lines, manifest = local_outputs(lake, f"guard-out-{run}", job["jobArn"].rsplit("/", 1)[1])
        rows = {r["recordId"]: r for r in lines.get("records.jsonl.out", [])}
        results[action] = (job["status"], manifest, rows.get("LONG"))
    status, manifest, long = results["FAIL_RECORD"]
    if status != "PartiallyCompleted" or not long or "inputTokenLimit" not in long["error"]["errorMessage"]:
        fail("FAIL_RECORD", results["FAIL_RECORD"])
    status, manifest, long = results["TRUNCATE"]
    if status != "Completed" or not long or "modelOutput" not in long or manifest["successRecordCount"] != 5:
        fail("TRUNCATE", results["TRUNCATE"])
    status, manifest, long = results["SKIP"]
    if status != "Completed" or long is not None or manifest["skippedRecordCount"] != 1 \
            or manifest["successRecordCount"] != 4:
        fail("SKIP", results["SKIP"])
    ok("inputTokenLimit: FAIL_RECORD writes an error record, TRUNCATE runs a cut prompt, SKIP leaves it out")

    # outputSchema: Converse outputs are constrained to it; InvokeModel outputs are checked (and
    # asked for once more), so each line is matching JSON or an error record saying why.
    schema = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}},
              "additionalProperties": False}
    converse = [{"recordId": f"J{i}", "modelInput": {"messages": [{"role": "user", "content": [
        {"text": f"Reply with a JSON object whose field n is {i}."}]}], "inferenceConfig": {"maxTokens": 24}}}
        for i in range(5)]
    write_input(f"schema-c-{run}", converse)
    write_input(f"schema-i-{run}", [record(i, tokens=24) for i in range(3)])
    manifest_job(directory, f"e2e-schema-c-{run}", {
        "input": {"uri": f"s3://locallake/schema-c-{run}/"}, "output": {"uri": f"s3://locallake/schema-out-{run}/"},
        "invocationType": "Converse", "outputSchema": schema})
    manifest_job(directory, f"e2e-schema-i-{run}", {
        "input": {"uri": f"s3://locallake/schema-i-{run}/"}, "output": {"uri": f"s3://locallake/schema-out-{run}/"},
        "outputSchema": schema})
    job = by_name(f"e2e-schema-c-{run}")
    lines, _ = local_outputs(lake, f"schema-out-{run}", job["jobArn"].rsplit("/", 1)[1])
    texts = [r["modelOutput"]["output"]["message"]["content"][0]["text"] for r in lines["records.jsonl.out"]
             if "modelOutput" in r]
    if job["status"] != "Completed" or len(texts) != 5 or \
            not all(set(json.loads(t)) == {"n"} and isinstance(json.loads(t)["n"], int) for t in texts):
        fail("outputSchema Converse", f"{job['status']} {texts} {lines}")
    job = by_name(f"e2e-schema-i-{run}")
    lines, _ = local_outputs(lake, f"schema-out-{run}", job["jobArn"].rsplit("/", 1)[1])
    for r in lines["records.jsonl.out"]:
        if "error" in r:
            if "outputSchema" not in r["error"]["errorMessage"] and "not JSON" not in r["error"]["errorMessage"]:
                fail("outputSchema InvokeModel", r)
        elif not isinstance(json.loads(r["modelOutput"]["content"][0]["text"].strip("` \n").removeprefix("json")), dict):
            fail("outputSchema InvokeModel", r)
    ok(f"outputSchema: Converse outputs constrained ({texts[0]}, …); InvokeModel outputs checked: "
       f"{sum('error' in r for r in lines['records.jsonl.out'])} of 3 error records after a repair turn")

    # Month over month: 60 records in 6 partitions; next month 10 changed.
    month1 = [record(i) for i in range(60)]
    month2 = [dict(r) for r in month1]
    for i in range(0, 60, 6):
        month2[i] = record(i, tokens=7)  # changed input: max_tokens differs
    write_input(f"m1-{run}", month1)
    write_input(f"m2-{run}", month2)
    # Both applied at once (as GitOps does): the second waits, Scheduled, for the first.
    m2_spec = {"input": {"uri": f"s3://locallake/m2-{run}/"}, "output": {"uri": f"s3://locallake/m2-out-{run}/"},
               "partitionKey": "customerId", "reuseFrom": {"jobName": f"e2e-m1-{run}"}}
    manifest_job(directory, f"e2e-m2-{run}", m2_spec)
    manifest_job(directory, f"e2e-m1-{run}", {"input": {"uri": f"s3://locallake/m1-{run}/"},
                                              "output": {"uri": f"s3://locallake/m1-out-{run}/"},
                                              "partitionKey": "customerId"})
    m1 = by_name(f"e2e-m1-{run}")
    started = time.time()
    m2 = by_name(f"e2e-m2-{run}")
    took = time.time() - started
    ids = lambda lines: {r["recordId"]: r["modelOutput"]["id"] for r in lines["records.jsonl.out"]}
    out1, _ = local_outputs(lake, f"m1-out-{run}", m1["jobArn"].rsplit("/", 1)[1])
    out2, manifest2 = local_outputs(lake, f"m2-out-{run}", m2["jobArn"].rsplit("/", 1)[1])
    ids1, ids2 = ids(out1), ids(out2)
    changed = {f"R{i:05d}" for i in range(0, 60, 6)}
    reinferred = {r for r in ids2 if ids2[r] != ids1[r]}
    if m2["status"] != "Completed" or reinferred != changed or manifest2["reusedRecordCount"] != 50 \
            or len(ids2) != 60:
        fail("reuseFrom", f"{m2['status']} re-inferred {sorted(reinferred)} manifest {manifest2}")
    ok(f"reuseFrom (applied with the job it reuses, waited for it): 10 changed of 60 records inferred again, "
       f"50 copied ({took:.1f}s after the first ended), manifest {manifest2}")

    # A rerun of partition C3 infers exactly its records again.
    m2_spec["rerun"] = {"id": "r2", "partition": "C3"}
    asked = m2["endTime"]
    time.sleep(0.01)
    manifest_job(directory, f"e2e-m2-{run}", m2_spec)
    m2 = by_name(f"e2e-m2-{run}", ended_after=asked)
    out3, manifest3 = local_outputs(lake, f"m2-out-{run}", m2["jobArn"].rsplit("/", 1)[1])
    ids3 = ids(out3)
    again = {r for r in ids3 if ids3[r] != ids2[r]}
    c3 = {r["recordId"] for r in month2 if r["customerId"] == "C3"}
    if again != c3 or len(ids3) != 60:
        fail("rerun partition", f"re-inferred {sorted(again)}, want {sorted(c3)}")
    rows = control_rows(f"{lake}/m2-out-{run}", m2["jobArn"].rsplit("/", 1)[1], local=True)
    runs = {r["run_id"] for r in rows}
    if runs != {"initial", "r2"} or sum(r["records_reused"] for r in rows if r["run_id"] == "initial") != 50:
        fail("control table runs", rows)
    listed = {j["jobName"] for j in bedrock.list_model_invocation_jobs(nameContains=run)["invocationJobSummaries"]}
    if not {f"e2e-m1-{run}", f"e2e-m2-{run}"} <= listed:
        fail("list manifest jobs", listed)
    ok(f"rerun of partition C3: its {len(c3)} records inferred again, the other {60 - len(c3)} kept; "
       "manifest jobs are listed by ListModelInvocationJobs")


def bench_throughput(directory, lake, n, rounds=3):
    import os
    import statistics
    import threading
    from concurrent.futures import ThreadPoolExecutor
    runtime = session.client("bedrock-runtime", endpoint_url=endpoint,
                             config=botocore.config.Config(retries={"max_attempts": 1}, read_timeout=300,
                                                           max_pool_connections=16))

    def probe(samples, stop=None):
        """Times to first token of short ConverseStream calls, one after another."""
        out = []
        while (stop is None and len(out) < samples) or (stop is not None and not stop.is_set()):
            t = time.time()
            stream = runtime.converse_stream(modelId=MODEL, messages=[{"role": "user", "content": [{"text": "Hi."}]}],
                                             inferenceConfig={"maxTokens": 4, "temperature": 0})["stream"]
            for event in stream:
                if "contentBlockDelta" in event:
                    out.append(time.time() - t)
                    break
            for _ in stream:
                pass
            time.sleep(0.2)
        return out

    def p(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    records = [record(i, tokens=32) for i in range(n)]

    def direct():
        """The same requests sent straight by 8 threads, with the probe beside them too (so the
        ratio compares the pipelines, each sharing the runner with the same real-time traffic)."""
        def one(r):
            reply = runtime.invoke_model(modelId=MODEL, body=json.dumps({**r["modelInput"], "temperature": 0}))
            return int(reply["ResponseMetadata"]["HTTPHeaders"]["x-amzn-bedrock-output-token-count"])
        stop = threading.Event()
        ttft = []
        prober = threading.Thread(target=lambda: ttft.extend(probe(0, stop)))
        prober.start()
        start = time.time()
        with ThreadPoolExecutor(8) as pool:
            tokens = sum(pool.map(one, records))
        took = time.time() - start
        stop.set()
        prober.join()
        return tokens / took, ttft

    def batch(k):
        os.makedirs(f"{lake}/tp-{k}", exist_ok=True)
        with open(f"{lake}/tp-{k}/records.jsonl", "w") as f:
            f.write("\n".join(json.dumps(r) for r in records) + "\n")
        stop = threading.Event()
        ttft = []
        prober = threading.Thread(target=lambda: ttft.extend(probe(0, stop)))
        start = time.time()
        name = f"bench-tp-{k}"
        manifest_job(directory, name, {"input": {"uri": f"s3://locallake/tp-{k}/"},
                                       "output": {"uri": f"s3://locallake/tpo-{k}/"}})
        prober.start()
        job = by_name(name, timeout=3600)
        took = time.time() - start
        stop.set()
        prober.join()
        lines, manifest = local_outputs(lake, f"tpo-{k}", job["jobArn"].rsplit("/", 1)[1])
        return manifest["outputTokenCount"] / took, ttft

    probe(3)  # warm-up
    run = uuid.uuid4().hex[:6]
    # Interleaved: a solo probe window, the direct run, the batch job (with the probe beside it).
    solo, direct_rates, batch_rates, beside, beside_direct = [], [], [], [], []
    for i in range(rounds):
        solo.extend(probe(40))
        rate, ttft = direct()
        direct_rates.append(rate)
        beside_direct.extend(ttft)
        rate, ttft = batch(f"{run}-{i}")
        batch_rates.append(rate)
        beside.extend(ttft)
    d, b = statistics.median(direct_rates), statistics.median(batch_rates)
    print(f"direct InvokeModel, 8 threads: {d:.0f} output tokens/s (runs {[round(x) for x in direct_rates]}); "
          f"probe TTFT beside it: p50 {p(beside_direct, 0.5) * 1000:.0f} ms, p99 {p(beside_direct, 0.99) * 1000:.0f} ms")
    print(f"batch job, 8 in flight:        {b:.0f} output tokens/s (runs {[round(x) for x in batch_rates]}); "
          f"ratio {b / d:.2f}")
    print(f"probe TTFT solo: p50 {p(solo, 0.5) * 1000:.0f} ms, p99 {p(solo, 0.99) * 1000:.0f} ms ({len(solo)} calls); "
          f"beside the batch job: p50 {p(beside, 0.5) * 1000:.0f} ms, p99 {p(beside, 0.99) * 1000:.0f} ms "
          f"({len(beside)} calls); p99 ratio {p(beside, 0.99) / p(solo, 0.99):.2f}", flush=True)


def bench_reuse(directory, lake, n):
    import os
    run = uuid.uuid4().hex[:6]

    def write_input(prefix, records):
        os.makedirs(f"{lake}/{prefix}", exist_ok=True)
        with open(f"{lake}/{prefix}/records.jsonl", "w") as f:
            f.write("\n".join(json.dumps(r) for r in records) + "\n")

    month1 = [record(i, tokens=32) for i in range(n)]
    month2 = [record(i, tokens=33) if i % 20 == 0 else r for i, r in enumerate(month1)]
    write_input(f"b1-{run}", month1)
    write_input(f"b2-{run}", month2)
    spec = lambda m: {"input": {"uri": f"s3://locallake/b{m}-{run}/"}, "output": {"uri": f"s3://locallake/bo{m}-{run}/"}}
    times = []
    for m, extra in ((1, {}), (2, {"reuseFrom": {"jobName": f"bench-1-{run}"}})):
        start = time.time()
        manifest_job(directory, f"bench-{m}-{run}", {**spec(m), **extra})
        job = by_name(f"bench-{m}-{run}", timeout=3600)
        times.append(time.time() - start)
        if job["status"] != "Completed":
            fail("bench", job)
    print(f"first run {times[0]:.1f}s ({n / times[0]:.1f} records/s); with 5% changed and reuseFrom "
          f"{times[1]:.1f}s; ratio {times[1] / times[0]:.3f}", flush=True)


if phase == "flow":
    flow()
elif phase == "start":
    start()
elif phase == "manifests":
    manifests(sys.argv[4], sys.argv[5])
elif phase == "bench-throughput":
    bench_throughput(sys.argv[4], sys.argv[5], int(sys.argv[6]))
elif phase == "bench-reuse":
    bench_reuse(sys.argv[4], sys.argv[5], int(sys.argv[6]))
elif phase == "finish":
    finish(sys.argv[4], sys.argv[5])
else:
    fail("usage", phase)
