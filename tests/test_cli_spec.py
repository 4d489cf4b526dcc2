"""`leanfm generate --speculative ...` on a tiny model: the same greedy text as without, and bad flags as
one-line errors."""

from typer.testing import CliRunner

from leanfm.cli import app
from leanfm.utils.errors import LeanfmError

runner = CliRunner()


def generate(model_dir, *extra):
    args = ["generate", "-m", str(model_dir), "--temperature", "0", "--max-tokens", "12", *extra,
            "abcabcabcabc"]
    return runner.invoke(app, args)


def test_generate_speculative_matches_plain(tiny_model_dir):
    plain = generate(tiny_model_dir)
    assert plain.exit_code == 0, plain.output
    for extra in (["--speculative", "ngram"], ["--speculative", "layer_skip", "--skip-layers", "2,3"],
                  ["--speculative", "draft", "--draft-model", str(tiny_model_dir), "--num-speculative-tokens", "2"]):
        res = generate(tiny_model_dir, *extra)
        assert res.exit_code == 0, res.output
        assert res.stdout == plain.stdout
    res = runner.invoke(app, ["generate", "-m", str(tiny_model_dir), "--temperature", "0", "--max-tokens", "6",
                              "--speculative", "ngram", "--stats", "abab"])
    assert res.exit_code == 0 and "tok/step" in res.output


def test_bad_speculative_flags(tiny_model_dir):
    for extra, match in ((["--speculative", "medusa"], "method must be one of"),
                         (["--draft-model", "x"], "need --speculative"),
                         (["--speculative", "layer_skip", "--skip-layers", "a,b"], "comma-separated"),
                         (["--speculative", "layer_skip", "--skip-layers", "0,1,2,3,4,5"], "some but not all"),
                         (["--speculative", "draft"], "needs draft_model")):
        res = generate(tiny_model_dir, *extra)  # main() prints a LeanfmError as one line: `error: ...`
        assert isinstance(res.exception, LeanfmError) and match in str(res.exception), (extra, res.exception)
        assert "\n" not in str(res.exception)
