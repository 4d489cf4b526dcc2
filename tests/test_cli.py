"""The `leanfm` command line on a tiny model: generate, chat, info, convert, and bad input."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from leanfm.cli import app

runner = CliRunner()


def run(*args, input=None):
    return runner.invoke(app, list(args), input=input)


def run_process(*args):
    """The installed console path (main()), in a subprocess: exit codes and stderr as a user sees them."""
    code = "import sys; from leanfm.cli import main; sys.argv = ['leanfm', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={"LEANFM_KERNELS": "0", "PATH": "/usr/bin:/bin"})


def test_generate_streams_text(tiny_model_dir):
    res = run("generate", "--model", str(tiny_model_dir), "--temperature", "0", "--max-tokens", "8", "hello")
    assert res.exit_code == 0, res.output
    assert res.output.endswith("\n")


def test_generate_is_deterministic_with_seed(tiny_model_dir):
    args = ["generate", "-m", str(tiny_model_dir), "--max-tokens", "12", "--temperature", "1.0", "--seed", "5",
            "--top-k", "20", "--min-p", "0.01", "--repetition-penalty", "1.2", "--stop", "zz", "abc"]
    assert run(*args).output == run(*args).output


def test_generate_with_chat_template_and_stats(tiny_model_dir):
    res = runner.invoke(app, ["generate", "-m", str(tiny_model_dir), "--chat-template", "--stats",
                              "--temperature", "0", "--max-tokens", "4", "hi"])
    assert res.exit_code == 0, res.output


def test_chat_multi_turn_from_stdin(tiny_model_dir):
    res = run("chat", "-m", str(tiny_model_dir), "--max-tokens", "4", "--temperature", "0",
              input="hello\n/reset\nsecond turn\n/exit\n")
    assert res.exit_code == 0, res.output
    assert res.output.count("\n") >= 2


def test_info_reports_costs(tiny_model_dir):
    res = run("info", "--model", str(tiny_model_dir))
    assert res.exit_code == 0, res.output
    for word in ("embedding", "attention", "ffn", "FLOPs/token", "KV cache", "per 1k"):
        assert word in res.output


def test_convert_writes_hf_dir_and_refuses_to_clobber(tiny_model_dir, tmp_path):
    out = tmp_path / "copy"
    assert run("convert", str(tiny_model_dir), str(out)).exit_code == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    res = run_process("convert", str(tiny_model_dir), str(out))
    assert res.returncode == 1 and "--overwrite" in res.stderr


@pytest.mark.parametrize("case", ["missing", "not_gguf_suffix", "garbage_gguf", "truncated_gguf", "bad_dtype",
                                  "too_long", "bad_temperature"])
def test_bad_input_is_one_clear_line(case, tiny_model_dir, tmp_path):
    model = str(tiny_model_dir)
    extra = []
    prompt = "hi"
    if case == "missing":
        model = str(tmp_path / "nope.gguf")
    elif case == "not_gguf_suffix":
        p = tmp_path / "weights.bin"
        p.write_bytes(b"x" * 10)
        model = str(p)
    elif case == "garbage_gguf":
        p = tmp_path / "bad.gguf"
        p.write_bytes(b"not a gguf at all" * 10)
        model = str(p)
    elif case == "truncated_gguf":
        from conftest import BYTE_VOCAB, make_tiny_model

        from leanfm.checkpoint.gguf_writer import write_gguf

        m = make_tiny_model("llama", **BYTE_VOCAB)
        p = write_gguf(tmp_path / "t.gguf", m.config, m.state_dict(), qtype="F32")
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        model = str(p)
    elif case == "bad_dtype":
        extra = ["--dtype", "int3"]
    elif case == "too_long":
        prompt = "x" * 300  # the tiny model's context is 256
    elif case == "bad_temperature":
        extra = ["--temperature", "-1"]
    res = run_process("generate", "--model", model, *extra, prompt)
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
