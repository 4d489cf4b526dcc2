"""Data-parallel and sharded fine-tuning with torchrun, 2 local gloo processes: the same parameters as one
process on the same global batch; an FSDP run completes and saves an adapter that loads."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

WORDS = ["cat", "dog", "sun", "map", "pen", "cup", "hat", "box", "egg", "fox"]
ENV = {"LEANFM_KERNELS": "0", "PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
ARGS = ["--steps", "3", "--batch-size", "4", "--lr", "1e-2", "--rank", "4", "--eval-fraction", "0.2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("d") / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"say {w}:", "completion": f" {w} {w}"}) + "\n" for w in WORDS * 2))
    return path


def finetune(model_dir, data, out, procs=1, *extra):
    cli = ["-m", "leanfm.cli", "finetune", "-m", str(model_dir), "--data", str(data), "-o", str(out), *ARGS, *extra]
    launcher = [] if procs == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                                       "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    res = subprocess.run([sys.executable, *launcher, *cli], capture_output=True, text=True, env=ENV, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return load_file(str(out / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def single(tiny_model_dir, data, tmp_path_factory):
    return finetune(tiny_model_dir, data, tmp_path_factory.mktemp("s") / "out")


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_match_one(kind, single, tiny_model_dir, data, tmp_path):
    out = tmp_path / kind
    two = finetune(tiny_model_dir, data, out, 2, "--distributed", kind)
    assert set(two) == set(single)
    for key, value in single.items():
        torch.testing.assert_close(two[key], value, atol=5e-5, rtol=1e-4)
    record = json.loads((out / "training.json").read_text())
    assert record["processes"] == 2 and record["distributed"] == kind
    from conftest import BYTE_VOCAB, make_tiny_model

    from leanfm.tune import load_adapter

    model = make_tiny_model("gemma3", **BYTE_VOCAB)
    load_adapter(model, out)  # the saved adapter is whole (gathered from the shards under FSDP)
