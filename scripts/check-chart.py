#!/usr/bin/env python3
"""Checks what `helm template` renders from charts/mantle, beyond schema validity: the six CRDs,
the operator and router with least-privilege RBAC, and the toggles doing what values.yaml says.

Usage: check-chart.py HELM_BINARY CHART_DIR
"""
import subprocess
import sys

import yaml

helm, chart = sys.argv[1], sys.argv[2]
failures = []


def render(*sets):
    args = [helm, "template", "mantle", chart, "--include-crds", "--namespace", "mantle-system"]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def check(ok, message):
    if not ok:
        failures.append(message)


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def named(docs, kind, suffix):
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(suffix)]
    check(len(found) == 1, f"expected one {kind} named *{suffix}, found {len(found)}")
    return found[0] if found else {}


docs = render()

crds = sorted(d["metadata"]["name"] for d in by_kind(docs, "CustomResourceDefinition"))
check(crds == sorted(f"{p}.mantle.dev" for p in
                     ["foundationmodels", "provisionedthroughputs", "guardrails", "knowledgebases", "batchjobs", "cells"]),
      f"the chart installs the six CRDs, found {crds}")

for component in ["operator", "router"]:
    deployment = named(docs, "Deployment", f"-{component}")
    pod = deployment.get("spec", {}).get("template", {}).get("spec", {})
    check(pod.get("serviceAccountName", "").endswith(f"-{component}"), f"{component} runs as its own service account")
    check(pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{component} runs as non-root")
    for container in pod.get("containers", []):
        sc = container.get("securityContext", {})
        check(sc.get("readOnlyRootFilesystem") is True, f"{component} has a read-only root filesystem")
        check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{component} drops all capabilities")
        check("resources" in container, f"{component} sets resources")

for role in by_kind(docs, "ClusterRole") + by_kind(docs, "Role"):
    for rule in role["rules"]:
        name = role["metadata"]["name"]
        check("*" not in rule.get("verbs", []), f"{name}: no wildcard verbs")
        check("*" not in rule.get("resources", []), f"{name}: no wildcard resources")
        check("*" not in rule.get("apiGroups", []), f"{name}: no wildcard API groups")
        if "secrets" in rule.get("resources", []):
            check(bool(rule.get("resourceNames")), f"{name}: secrets only by name")
        if "customresourcedefinitions" in rule.get("resources", []):
            check(rule.get("verbs") == ["get"] and bool(rule.get("resourceNames")), f"{name}: reads only its own CRDs")

operator_role = named(docs, "ClusterRole", "-operator")
operator_resources = {r for rule in operator_role.get("rules", []) for r in rule.get("resources", [])}
check("secrets" not in operator_resources, "the operator never reads Secrets")
check({"foundationmodels/status", "batchjobs/status", "deployments", "jobs", "events"} <= operator_resources,
      "the operator may write model/batch status, Deployments, Jobs and Events")

router_pod = named(docs, "Deployment", "-router")["spec"]["template"]["spec"]
router_args = router_pod["containers"][0]["args"]
check("--kubernetes" in router_args, "the router follows the cluster's models and runners")
check("--auth-file=/etc/mantle/keys/keys.yaml" in router_args
      and any(v.get("secret", {}).get("secretName") == "mantle-router-keys" for v in router_pod.get("volumes", []))
      and any(m["mountPath"] == "/etc/mantle/keys" for m in router_pod["containers"][0]["volumeMounts"]),
      "sigv4 auth reads the keys Secret, mounted")
check("--metering=/var/lib/mantle/metering/requests.jsonl" in router_args
      and any(v.get("emptyDir") is not None and v["name"] == "metering" for v in router_pod.get("volumes", [])),
      "the router meters every request into its pod's metering volume")
check("--no-overload-control" not in router_args, "overload control is on by default")
no_control = render("router.overloadControl=false", "router.maxQueueWaitMs=250")
no_control_args = named(no_control, "Deployment", "-router")["spec"]["template"]["spec"]["containers"][0]["args"]
check({"--no-overload-control", "--max-queue-wait-ms=250"} <= set(no_control_args),
      "router.overloadControl=false and router.maxQueueWaitMs reach the router")
router_role = named(docs, "ClusterRole", "-router")
router_resources = {r for rule in router_role.get("rules", []) for r in rule.get("resources", [])}
check("secrets" not in router_resources and not any(d["kind"] == "Role" and "-router" in d["metadata"]["name"] for d in docs),
      "the router reads no Secrets through the API")
check({"foundationmodels", "provisionedthroughputs", "endpointslices"} <= router_resources,
      "the router may watch models, reservations and EndpointSlices")
check(not by_kind(docs, "ServiceMonitor"), "no ServiceMonitor unless enabled")

with_monitor = render("metrics.serviceMonitor.enabled=true", "router.auth.mode=none")
check(len(by_kind(with_monitor, "ServiceMonitor")) == 1, "metrics.serviceMonitor.enabled adds a ServiceMonitor")
no_auth_args = named(with_monitor, "Deployment", "-router")["spec"]["template"]["spec"]["containers"][0]["args"]
check("--no-auth" in no_auth_args, "router.auth.mode=none turns auth off")
check(not any(v["name"] == "keys" for v in named(with_monitor, "Deployment", "-router")["spec"]["template"]["spec"].get("volumes", [])),
      "no keys mounted without sigv4")

# Runner authentication, TLS, the admin port and network policies.
check("--runner-token-file=/etc/mantle/runner-token/token" in router_args
      and any(v.get("secret", {}).get("secretName") == "mantle-runner-token" for v in router_pod.get("volumes", [])),
      "the router presents the runner token from its Secret")
token = named(docs, "Secret", "mantle-runner-token")
check(len(token.get("data", {}).get("token", "")) >= 16, "the chart makes a runner token")
check(not any(a.startswith("--tls-") for a in router_args), "no TLS unless a certificate Secret is named")
check(router_pod["containers"][0]["readinessProbe"]["httpGet"]["port"] == "metrics",
      "the router's probes use the admin port")
check(any(a.startswith("--admin-listen=") for a in router_args), "the router serves /metrics on its admin listener")
with_tls = named(render("router.tls.secretName=mantle-tls"), "Deployment", "-router")["spec"]["template"]["spec"]
check({"--tls-cert=/etc/mantle/tls/tls.crt", "--tls-key=/etc/mantle/tls/tls.key"} <= set(with_tls["containers"][0]["args"])
      and any(v.get("secret", {}).get("secretName") == "mantle-tls" for v in with_tls["volumes"]),
      "router.tls.secretName mounts the certificate and serves HTTPS")
runner_policy = named(docs, "NetworkPolicy", "-runners")
grpc_rule = runner_policy.get("spec", {}).get("ingress", [{}])[0]
check(grpc_rule.get("from", [{}])[0].get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "router",
      "runner gRPC is open to the router only")
check(not by_kind(render("networkPolicy.enabled=false"), "NetworkPolicy"), "networkPolicy.enabled=false drops the policies")

bad = subprocess.run([helm, "template", "mantle", chart, "--set", "router.auth.mode=open"], capture_output=True, text=True)
check(bad.returncode != 0 and "router.auth.mode must be sigv4 or none" in bad.stderr, "an unknown auth mode fails to render")

if failures:
    print("chart checks failed:")
    for f in failures:
        print(f"  - {f}")
    sys.exit(1)
print(f"chart checks passed: {len(docs)} objects rendered")
