"""Zero-/few-shot task scoring: token boundary, the scorers, metrics, determinism, user tasks.

Models here are a bigram "LM" whose log-probabilities are a table (so expected scores are computed by
hand) and tiny random transformers (for the batched-vs-naive equivalence). The tokenizer is byte-level:
token id = byte + 3 after <pad>, <bos>, <eos>.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from conftest import make_tiny_config
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, processors
from tokenizers.pre_tokenizers import ByteLevel
from torch import nn

from leanfm.bench.tasks import Doc, Task, TaskSpec, evaluate_task, evaluate_tasks, get_task, load_user_task
from leanfm.bench.tasks.metrics import choice_metrics, mean_stderr, pooled_sample_stderr
from leanfm.bench.tasks.scoring import (
    common_prefix_len,
    encode_pair,
    encode_pairs,
    score_naive,
    score_padded,
    score_shared,
)
from leanfm.checkpoint.tokenizer import Tokenizer
from leanfm.utils.errors import LeanfmError

pytestmark = pytest.mark.usefixtures("single_thread")
V = 259  # 3 specials + 256 bytes


def _bytes_to_unicode() -> dict[int, str]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def make_tokenizer(merges: tuple[tuple[str, str], ...] = (), bos: bool = True) -> Tokenizer:
    b2u = _bytes_to_unicode()
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{b2u[b]: 3 + b for b in range(256)}}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<pad>", "<bos>", "<eos>"])
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return Tokenizer(backend, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"})


def tid(ch: str) -> int:
    return 3 + ord(ch)


class BigramLM(nn.Module):
    """logits(next | current token) = table[current]: exact under any caching or batching."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.config = make_tiny_config("llama", vocab_size=table.shape[0])
        self.table = nn.Parameter(table)

    def forward(self, input_ids, positions, attn_meta=None):
        return nn.functional.one_hot(input_ids, self.table.shape[0]).float()

    def compute_logits(self, hidden):
        return hidden @ self.table

    def logprob(self, prev: int, nxt: int) -> float:
        return float(torch.log_softmax(self.table[prev].detach().double(), -1)[nxt])


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return make_tokenizer()


def mc_task(docs: list[Doc], name: str = "t", style: str = "mc", metrics=("acc", "acc_norm")) -> Task:
    return Task(TaskSpec(name, style, lambda: docs, metrics=metrics), docs)


# ---------------------------------------------------------------- token boundary
def test_encode_pair_is_lm_eval_encode_pair():
    tok = make_tokenizer(merges=(("a", "b"),))
    ab = tok.token_to_id("ab")
    # BOS once, at the start of the context; continuation = tokens of context+continuation past the context
    assert encode_pair(tok, "Q:", " yes") == ([1, tid("Q"), tid(":")], [tid(" "), tid("y"), tid("e"), tid("s")])
    # a merge across the boundary: whole = [x, ab, c], context = [x, a] -> continuation is whole[2:]
    assert encode_pair(tok, "xa", "bc") == ([1, tid("x"), tid("a")], [tid("c")])
    assert encode_pair(tok, "x", "abc") == ([1, tid("x")], [ab, tid("c")])
    # trailing whitespace of the context moves to the continuation
    assert encode_pair(tok, "Answer: ", "yes") == encode_pair(tok, "Answer:", " yes")
    assert encode_pair(tok, "", "hi") == ([1], [tid("h"), tid("i")])  # empty context -> [BOS]
    with pytest.raises(LeanfmError, match="no tokens"):
        encode_pair(tok, "xa", "b")  # merges entirely into the context
    no_bos = make_tokenizer(bos=False)  # no BOS: an empty context becomes [BOS] (lm-eval's prefix token)
    assert encode_pair(no_bos, "Q:", " a") == ([tid("Q"), tid(":")], [tid(" "), tid("a")])
    assert encode_pair(no_bos, "", "a") == ([1], [tid("a")])
    pairs = encode_pairs(tok, ["Q: ", "Q: "], ["a", "bb"])
    assert pairs == [([1, tid("Q"), tid(":")], [tid(" "), tid("a")]), ([1, tid("Q"), tid(":")], [tid(" "), tid("b"), tid("b")])]


# ---------------------------------------------------------------- scorers
def test_scorers_pick_the_certain_answer(tok):
    table = torch.zeros(V, V)
    table[tid(" "), tid("y")] = 12.0  # after a space, "y" is near certain
    for a, b in ("ye", "es"):
        table[tid(a), tid(b)] = 12.0
    model = BigramLM(table)
    docs = [Doc("Q:", ("no", "yes"), 1), Doc("Q:", ("yes", "no"), 1), Doc("Q:", ("maybe", "yes", "no"), 1)]
    res = evaluate_task(model, tok, mc_task(docs), progress=False)
    assert [it["pred"] for it in res.items] == [1, 0, 1]
    assert res.acc == pytest.approx(2 / 3)
    lp_yes = res.items[0]["logprobs"][1]
    assert lp_yes == pytest.approx(sum(model.logprob(tid(a), tid(b)) for a, b in (": ", " y", "ye", "es")), abs=1e-5)
    assert lp_yes > res.items[0]["logprobs"][0] + 10


def test_acc_and_acc_norm_disagree_by_hand(tok):
    model = BigramLM(torch.zeros(V, V))  # uniform: every token costs ln V
    docs = [Doc("Q:", ("ab", "abcdef"), 1)]
    res = evaluate_task(model, tok, mc_task(docs), progress=False)
    lps = res.items[0]["logprobs"]
    assert lps == pytest.approx([-3 * math.log(V), -7 * math.log(V)], abs=1e-5)  # " ab", " abcdef" in bytes
    # acc: argmax(-3 lnV, -7 lnV) = 0 (wrong); acc_norm: argmax(-3/2 lnV, -7/6 lnV) = 1 (right)
    assert (res.acc, res.acc_norm) == (0.0, 1.0)
    assert choice_metrics([-2.0, -3.0], ["a", "bbbbbb"], 1) == {"pred": 0, "pred_norm": 1, "acc": 0.0, "acc_norm": 1.0}
    # lengths are characters, not bytes: -2/2 < -2.1/3 (by bytes -2/4 would win)
    assert choice_metrics([-2.0, -2.1], ["éé", "abc"], 1)["pred_norm"] == 1


@pytest.mark.parametrize("variant", ["gemma3", "llama"])
def test_batched_scorers_equal_naive(tiny_model, tok, variant):
    model = tiny_model(variant, seed=3, vocab_size=V)
    ctx = "The quick brown fox jumps over"
    mc = encode_pairs(tok, [ctx] * 4, [" the lazy dog", " a", " it and then some more", " the end"])
    # winogrande-like: contexts differ after a shared prefix (and in length), one shared continuation
    partial = encode_pairs(tok, [ctx + " it", ctx + " the wall"], [" and ran away."] * 2)
    assert common_prefix_len(mc) == len(mc[0][0]) > 24  # the cached prefix crosses the sliding window (8)
    assert 24 < common_prefix_len(partial) < min(len(c) for c, _ in partial)
    for pairs in (mc, partial):
        naive = score_naive(model, pairs)
        for got in (score_shared(model, pairs, batch_size=3), score_padded(model, pairs, batch_size=3)):
            assert [s.logprob for s in got] == pytest.approx([s.logprob for s in naive], abs=1e-4)
            assert [s.greedy for s in got] == [s.greedy for s in naive]
            assert [s.n_tokens for s in got] == [len(t) for _, t in pairs]
    independent = encode_pairs(tok, ["a", "bcd efg", "hij klm nop qrs"], [" ok"] * 3)
    assert common_prefix_len(independent) == 1  # only BOS: still exact
    for got in (score_padded(model, independent, batch_size=2), score_shared(model, independent)):
        assert [s.logprob for s in got] == pytest.approx([s.logprob for s in score_naive(model, independent)], abs=1e-4)


def test_winogrande_partial_scoring(tok):
    from leanfm.bench.tasks.commonsense import winogrande_doc

    doc = winogrande_doc({"sentence": "The cup fell off the table because _ was wobbly.", "option1": "cup",
                          "option2": "table", "answer": "2"}, 0)
    assert doc.choices == ("The cup fell off the table because cup", "The cup fell off the table because table")
    assert (doc.target, doc.gold) == ("was wobbly.", 1)
    task = mc_task([doc], style="partial", metrics=("acc",))
    req = task.request(0)
    assert req.contexts == doc.choices and req.continuations == (" was wobbly.",) * 2
    table = torch.zeros(V, V)
    table[tid("e"), tid(" ")] = 3.0  # "...table" -> " " is likelier than "...cup" -> " "
    model = BigramLM(table)
    res = evaluate_task(model, tok, task, progress=False)
    cont = " was wobbly."
    rest = sum(model.logprob(tid(a), tid(b)) for a, b in zip(cont, cont[1:], strict=False))
    expect = [model.logprob(tid(last), tid(" ")) + rest for last in ("p", "e")]
    assert res.items[0]["logprobs"] == pytest.approx(expect, abs=1e-5)
    assert (res.acc, res.acc_norm) == (1.0, None)
    # few-shot: the demonstration is the gold option's context + " " + the rest of its sentence
    other = winogrande_doc({"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "1"}, 1)
    assert mc_task([doc, other], style="partial").request(0, 1).contexts[0] == "A x b.\n\n" + doc.choices[0]


def test_lambada_metrics_by_hand(tok):
    table = torch.zeros(V, V)
    for a, b in ("t ", " s", "si", "ig", "gn", "ns"):
        table[tid(a), tid(b)] = 8.0  # every token of " sign"/" signs" is the argmax ...
    table[tid("n"), tid("o")] = 9.0  # ... except "s" after "n" in " signs" (argmax there is "o")
    model = BigramLM(table)
    docs = [Doc("about", ("sign",), 0, target="sign"), Doc("about", ("signs",), 0, target="signs")]
    res = evaluate_task(model, tok, mc_task(docs, "lam", style="greedy", metrics=("acc",)), progress=False)
    lls = [sum(model.logprob(tid(a), tid(b)) for a, b in zip("t " + w, " " + w, strict=False)) for w in ("sign", "signs")]
    assert [it["logprob"] for it in res.items] == pytest.approx(lls, abs=1e-5)  # fp32 model vs fp64 hand
    assert [it["acc"] for it in res.items] == [1.0, 0.0]
    assert res.acc == 0.5 and res.acc_stderr == pytest.approx(0.5)
    assert res.extra["perplexity"] == pytest.approx(math.exp(-(lls[0] + lls[1]) / 2), rel=1e-5)
    assert res.extra["perplexity_per_token"] == pytest.approx(math.exp(-(lls[0] + lls[1]) / 11), rel=1e-5)


# ---------------------------------------------------------------- metrics, selection
def test_stderr_formulas():
    vals = [1.0, 0.0, 1.0, 1.0]
    assert mean_stderr(vals) == pytest.approx(statistics.stdev(vals) / 2) == pytest.approx(0.25)
    assert mean_stderr([1.0]) is None
    # lm-eval pooled_sample_stderr: sqrt(sum((n-1) se^2 n) / (N - k) / N)
    se, n = [0.1, 0.2], [4, 6]
    assert pooled_sample_stderr(se, n) == pytest.approx(math.sqrt((3 * 0.01 * 4 + 5 * 0.04 * 6) / 8 / 10))


def test_mmlu_group_report_pools_subjects_then_categories():
    from leanfm.bench.tasks.metrics import group_report

    accs = {"anatomy": [1, 0, 1], "astronomy": [0, 0, 1, 1], "philosophy": [1, 1], "virology": [0]}
    items = [{"group": g, "acc": float(a)} for g, vals in accs.items() for a in vals]
    overall, rep = group_report(items, {"anatomy": "stem", "astronomy": "stem", "philosophy": "humanities",
                                        "virology": "other"})
    assert rep["subjects"]["astronomy"] == {"n": 4, "acc": 0.5, "acc_stderr": pytest.approx(mean_stderr([0, 0, 1, 1]))}
    stem = rep["categories"]["stem"]
    se = [mean_stderr(accs["anatomy"]), mean_stderr(accs["astronomy"])]
    assert stem["n"] == 7 and stem["acc"] == pytest.approx(4 / 7)
    assert stem["acc_stderr"] == pytest.approx(pooled_sample_stderr(se, [3, 4]))
    cats = rep["categories"]
    assert overall == pytest.approx(pooled_sample_stderr([c["acc_stderr"] for c in cats.values()],
                                                         [c["n"] for c in cats.values()]))


def test_result_stderr_is_mean_stderr(tok):
    model = BigramLM(torch.zeros(V, V))
    docs = [Doc("Q:", ("a", "bbbb"), i % 2) for i in range(7)]  # uniform model: always predicts choice 0
    res = evaluate_task(model, tok, mc_task(docs), progress=False)
    accs = [float(i % 2 == 0) for i in range(7)]
    assert res.acc == pytest.approx(4 / 7) and res.acc_stderr == pytest.approx(mean_stderr(accs))
    assert res.n == 7 and res.protocol["normalization"].startswith("acc_norm")


def test_limit_and_fewshot_are_seeded():
    docs = [Doc(f"q{i}", ("a", "b"), 0, id=str(i)) for i in range(100)]
    task = mc_task(docs)
    a, b, c = task.select(10, seed=0), task.select(10, seed=0), task.select(10, seed=1)
    assert a == b != c and a == sorted(a) and a != list(range(10)) and len(set(a)) == 10
    assert task.select(None, 0) == task.select(1000, 0) == list(range(100))
    with pytest.raises(LeanfmError, match="limit"):
        task.select(0, 0)
    shots = [task.fewshot_examples(5, 3, seed=0) for _ in range(2)]
    assert shots[0] == shots[1] != task.fewshot_examples(5, 3, seed=1)
    assert all(docs[5] not in task.fewshot_examples(5, 99, seed=s) for s in range(3))
    two = task.fewshot_examples(5, 2, seed=0)
    assert task.request(5, 2, 0).contexts[0] == "".join(f"{d.query} {d.choices[0]}\n\n" for d in two) + "q5"


# ---------------------------------------------------------------- user tasks, names
def test_user_jsonl_task(tmp_path, tok):
    path = tmp_path / "mine.jsonl"
    lines = [{"context": "Q:", "choices": ["yes", "no"], "answer": 0, "id": "a"},
             {"context": "Q:", "choices": ["no", "yes"], "answer": 1}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    task = load_user_task(path)
    assert task.name == "mine" and len(task) == 2 and task.docs[1].id == "2"
    table = torch.zeros(V, V)
    table[tid(" "), tid("y")] = 12.0
    res = evaluate_tasks(BigramLM(table), tok, [str(path)], progress=False)["mine"]
    assert res.acc == 1.0 and res.n == 2


@pytest.mark.parametrize("line, field", [
    ('{"context": "q", "choices": ["a", "b"]}', "'answer'"),
    ('{"context": "q", "choices": ["a", "b"], "answer": 2}', "'answer'"),
    ('{"context": "q", "choices": ["a", "b"], "answer": true}', "'answer'"),
    ('{"context": "q", "choices": "ab", "answer": 0}', "'choices'"),
    ('{"context": "q", "choices": ["a", ""], "answer": 0}', "'choices'"),
    ('{"context": 3, "choices": ["a", "b"], "answer": 0}', "'context'"),
    ('{"context": "q", "choices": ["a", "b"], "answer": 0, "id": [1]}', "'id'"),
    ('{"context": "q", ', "not valid JSON"),
    ('[1, 2]', "JSON object"),
])
def test_user_jsonl_errors_name_file_line_field(tmp_path, line, field):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "ok", "choices": ["a", "b"], "answer": 0}\n' + line + "\n")
    with pytest.raises(LeanfmError) as err:
        load_user_task(path)
    assert f"{path}:2" in str(err.value) and field in str(err.value)


def test_user_jsonl_missing_and_empty(tmp_path):
    with pytest.raises(LeanfmError, match="not found"):
        load_user_task(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LeanfmError, match="no items"):
        load_user_task(tmp_path / "empty.jsonl")


def test_unknown_task_lists_known_ones():
    with pytest.raises(LeanfmError) as err:
        get_task("hellaswug")
    msg = str(err.value)
    assert "hellaswug" in msg and all(n in msg for n in ("hellaswag", "arc_easy", "lambada", "mmlu_<subject>"))
    tiny = [mc_task([Doc("q", ("a",), 0)])]
    with pytest.raises(LeanfmError, match="few_shot"):
        evaluate_tasks(BigramLM(torch.zeros(V, V)), make_tokenizer(), tiny, few_shot=-1)
    with pytest.raises(LeanfmError, match="not evaluated"):
        evaluate_tasks(BigramLM(torch.zeros(V, V)), make_tokenizer(), tiny, few_shot={"hellaswag": 10})


def test_per_task_few_shot(tok):
    docs = [Doc(f"q{i}", ("a", "b"), 0) for i in range(5)]
    tasks = [mc_task(docs, "one"), mc_task(docs, "two")]
    res = evaluate_tasks(BigramLM(torch.zeros(V, V)), tok, tasks, few_shot={"two": 3}, progress=False)
    assert (res["one"].protocol["few_shot"], res["two"].protocol["few_shot"]) == (0, 3)
    assert res["two"].protocol["fewshot_sampling"].startswith("seeded random draw from the evaluated split")


# ---------------------------------------------------------------- the real model
@pytest.mark.integration
def test_gemma_well_above_chance_on_arc_easy_and_piqa():
    from leanfm.checkpoint.loader import load_model
    from leanfm.utils.errors import CheckpointError

    try:
        lm = load_model("gemma-3-270m", progress=False)
    except CheckpointError as exc:
        pytest.skip(str(exc))
    res = evaluate_tasks(lm.model, lm.tokenizer, ["arc_easy", "piqa"], limit=50, seed=0, progress=False)
    assert res["arc_easy"].n == 50 and res["piqa"].n == 50
    assert res["arc_easy"].acc > 0.40  # chance 0.25; the card reports 57.7 (full test set)
    assert res["piqa"].acc > 0.56  # chance 0.50; the card reports 67.7
