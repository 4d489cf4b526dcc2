"""`leanfm finetune` end to end on a tiny model, `--adapter` on generate/chat/eval, and bad input that must
fail with one `error:` line and a non-zero exit before training starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import BYTE_VOCAB, make_byte_tokenizer, make_tiny_model

from leanfm.checkpoint.hf import save_hf_dir

WORDS = ["cat", "dog", "sun", "map", "pen", "cup", "hat", "box", "egg", "fox"]


def leanfm(*args, env_extra=None):
    code = "import sys; from leanfm.cli import main; sys.argv = ['leanfm', *sys.argv[1:]]; main()"
    env = {"LEANFM_KERNELS": "0", "PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rows = [{"prompt": f"say {w}:", "completion": f" {w} {w}"} for w in WORDS * 3]
    chat = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in WORDS * 2]
    return {"pc": write_jsonl(root / "pc.jsonl", rows), "chat": write_jsonl(root / "chat.jsonl", chat)}


def finetune(model_dir, data_file, out, *extra):
    return leanfm("finetune", "-m", model_dir, "--data", data_file, "-o", out, "--steps", "6", "--batch-size", "4",
                  "--lr", "1e-2", *extra)


def test_lora_run_then_generate_chat_eval_with_the_adapter(tiny_model_dir, data, tmp_path):
    out = tmp_path / "lora"
    res = finetune(tiny_model_dir, data["pc"], out, "--rank", "4", "--save-every", "3")
    assert res.returncode == 0, res.stderr
    assert "predicted peak memory" in res.stderr and "held-out loss" in res.stdout
    record = json.loads((out / "training.json").read_text())
    assert record["eval_loss_after"] < record["eval_loss_before"]
    assert record["memory"]["measured_peak_rss_bytes"] > 0 and record["memory"]["predicted_peak_bytes"] > 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    gen = leanfm("generate", "-m", tiny_model_dir, "--adapter", out, "--temperature", "0", "--max-tokens", "4", "say cat:")
    assert gen.returncode == 0, gen.stderr
    chat = subprocess.run([sys.executable, "-m", "leanfm.cli", "chat", "-m", str(tiny_model_dir), "--adapter", str(out),
                           "--max-tokens", "3", "--temperature", "0"], input="hi\n/exit\n", capture_output=True,
                          text=True, env={"LEANFM_KERNELS": "0", "PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    assert chat.returncode == 0, chat.stderr
    text = tmp_path / "t.txt"
    text.write_text("say cat: cat cat. say dog: dog dog. " * 20)
    ev = leanfm("eval", "-m", tiny_model_dir, "--adapter", out, "--ppl", text, "--ctx", "64", "-o", tmp_path / "r.json")
    assert ev.returncode == 0, ev.stderr
    again = finetune(tiny_model_dir, data["pc"], out)
    assert again.returncode == 1 and "already holds a finished adapter" in again.stderr


@pytest.mark.parametrize("method, extra", [("qlora", ["--set", "group_size=32"]), ("prompt", []), ("ia3", ["--optimizer", "adamw8bit"])])
def test_other_methods_and_chat_data(tiny_model_dir, data, tmp_path, method, extra):
    res = finetune(tiny_model_dir, data["chat"], tmp_path / method, "--method", method, *extra)
    assert res.returncode == 0, res.stderr
    if method == "prompt":  # its virtual tokens take positions in front of the prompt (leanfm.tune.prompt)
        gen = leanfm("generate", "-m", tiny_model_dir, "--adapter", tmp_path / method, "--max-tokens", "2", "hi")
        assert gen.returncode == 0, gen.stderr


def test_bad_input_fails_before_training(tiny_model_dir, data, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "only"}])
    few = write_jsonl(tmp_path / "few.jsonl", [{"prompt": "a", "completion": "b"}] * 5)
    cases = [
        (finetune(tiny_model_dir, bad, tmp_path / "o1"), "bad.jsonl:2: missing field 'completion'"),
        (finetune(tiny_model_dir, few, tmp_path / "o2"), "held-out split is empty"),
        (finetune(tiny_model_dir, data["pc"], tmp_path / "o3", "--target", "model.layers.*.attn.q"), "matches no module"),
        (finetune(tiny_model_dir, data["pc"], tmp_path / "o4", "--method", "lorax"), "unknown adapter method"),
        (finetune(tiny_model_dir, data["pc"], tmp_path / "o5", "--set", "r=0"), "r must be"),
    ]
    for res, message in cases:
        assert res.returncode == 1, res.stderr
        lines = res.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and message in lines[-1], res.stderr
        assert "Traceback" not in res.stderr
    assert not any((tmp_path / f"o{i}" / "checkpoints").exists() for i in range(1, 6))


def test_adapter_for_another_base_model_is_refused(tiny_model_dir, data, tmp_path):
    out = tmp_path / "a"
    assert finetune(tiny_model_dir, data["pc"], out, "--steps", "1").returncode == 0
    other = save_hf_dir(make_tiny_model("llama", num_hidden_layers=3, hidden_size=96, head_dim=24, **BYTE_VOCAB),
                        tmp_path / "other", tokenizer=make_byte_tokenizer())
    res = leanfm("generate", "-m", other, "--adapter", out, "--max-tokens", "2", "hi")
    assert res.returncode == 1 and "made for another base model" in res.stderr.strip().splitlines()[-1]
