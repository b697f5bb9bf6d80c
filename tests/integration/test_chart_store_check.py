"""`helm test`: the chart's store-check pod, rendered and validated, and its command RUN here
with the rendered environment against a moto S3 server that checks credentials (IAM on): the
job's keys pass, wrong keys and a read-only key fail with one line."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import helpers_helm as h
from helpers_s3 import MotoServer, REGION


def _hook_pod(values: dict) -> dict:
    pods = [o for o in h.render_objects(values) if o["kind"] == "Pod"]
    assert len(pods) == 1, pods
    return pods[0]


def _run(pod: dict, secrets: dict[str, dict[str, str]]) -> subprocess.CompletedProcess:
    """The pod's container as a local process: env resolved as the kubelet does (secretKeyRef
    from `secrets`, $(VAR) from earlier entries), `python` is this interpreter."""
    (container,) = pod["spec"]["containers"]
    env = {"PATH": os.environ["PATH"], "AWS_CONFIG_FILE": os.devnull,
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true"}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], word) for word in container["command"]]
    assert argv[0] == "python"
    return subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, text=True, timeout=120)


def test_store_check_is_a_valid_test_hook_with_the_jobs_identity():
    values = h.values_file(h.CHART_DIR / "ci" / "multi-node-elastic-values.yaml")
    pod = _hook_pod(values)
    h.validate_k8s(pod)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    job = h.the(h.render_objects(values), "PyTorchJob")
    worker = h.replica_templates(job)["Worker"]["spec"]
    (container,) = pod["spec"]["containers"]
    assert pod["spec"]["serviceAccountName"] == worker["serviceAccountName"]  # IRSA role
    assert container["image"] == worker["containers"][0]["image"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["command"][:5] == ["python", "-m", "dmdr", "ls", "--check-write"]
    assert not [o for o in h.render_objects({}) if o["kind"] == "Pod"]  # no store: no test
    notes = h.render(values, release="run7", namespace="team")[h.render_chart.NOTES]
    assert "helm test run7 -n team" in notes


@pytest.mark.slow
def test_store_check_passes_with_the_jobs_keys_and_fails_in_one_line_without():
    # moto with IAM on: the first actions are free, so a writer and a reader key can be made.
    with MotoServer(env={"INITIAL_NO_AUTH_ACTION_COUNT": "7"}) as server:
        iam = __import__("boto3").client("iam", endpoint_url=server.endpoint, region_name=REGION,
                                         aws_access_key_id="x", aws_secret_access_key="x")
        keys = {}
        for user, actions in (("writer", ["s3:*"]), ("reader", ["s3:ListBucket", "s3:GetObject"])):
            iam.create_user(UserName=user)
            key = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
            policy = {"Version": "2012-10-17",
                      "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
            iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(policy))
        server.make_bucket("dmdr-ci")

        values = h.values_file(h.CHART_DIR / "ci" / "cpu-tiny-values.yaml")
        values["storage"]["s3"]["endpointUrl"] = server.endpoint
        pod = _hook_pod(values)
        ok = _run(pod, {"dmdr-s3": keys["writer"]})
        assert ok.returncode == 0, ok.stderr
        assert "s3://dmdr-ci/runs: reachable, credentials accepted, writable" in ok.stdout

        wrong = {"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG0", "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
        for secret, needle in ((wrong, "rejected the credentials"), (keys["reader"], "PutObject")):
            bad = _run(pod, {"dmdr-s3": secret})
            assert bad.returncode == 2, bad.stderr
            lines = bad.stderr.strip().splitlines()
            assert len(lines) == 1 and needle in lines[0] and "Traceback" not in bad.stderr, bad.stderr
            assert secret["AWS_SECRET_ACCESS_KEY"] not in bad.stderr + bad.stdout
