"""Speculative sampling is exact: the verifier's output distribution is the target's.

(1) rejection_sample against exact probabilities: the first emitted token is distributed as p_0 whatever
    q is (point mass or not), and after an accepted draft the next as p_1; a verifier that accepts every
    draft (the classic bug) fails the same check.
(2) The engine end to end on a tiny model with a 12-token vocabulary: the joint distribution of generated
    tokens 2 and 3 (token 1 comes from the prefill, before any draft) over many seeds, with n-gram and
    layer-skip drafts (its LM head cut to 9 of the 12 tokens), matches the exact distribution enumerated from the model (chi-square, p < 1e-4 fails;
    fixed seeds, so the outcome is deterministic).
"""

import math

import pytest
import torch
from conftest import make_tiny_model

from leanfm.engine.config import EngineConfig
from leanfm.engine.engine import EngineCore
from leanfm.engine.params import SamplingParams
from leanfm.engine.sampler import new_sampling_state
from leanfm.engine.spec.verify import rejection_sample, verify_chunk
from leanfm.ops.sampling import apply_repetition_penalty, sample, sampling_probs

pytestmark = pytest.mark.usefixtures("single_thread")
Z_1E4 = 3.719  # standard normal quantile of 1 - 1e-4


def chi2_critical(df: int, z: float = Z_1E4) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2_stat(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson's statistic over cells with enough expected counts (the rest pooled into one cell) and df."""
    n = counts.sum().item()
    expected = probs.flatten().double() * n
    counts = counts.flatten().double()
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return stat, int(keep.sum()) - 1


def test_sampling_probs_is_what_sample_draws_from():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    opts = dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05)
    for seed in range(20):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        probs = sampling_probs(logits, **opts)
        assert torch.equal(sample(logits, **opts, generator=g1), torch.multinomial(probs, 1, generator=g2)[:, 0])
    assert torch.allclose(probs.sum(-1), torch.ones(3))


def _draws(p: torch.Tensor, q: torch.Tensor | None, n: int, verifier=rejection_sample):
    """n draws of (accepted, first token, second token or -1) with the draft drawn from q (or fixed)."""
    g = torch.Generator().manual_seed(1)
    first, second = torch.zeros(p.shape[1]), torch.zeros(p.shape[1])
    for _ in range(n):
        draft = [2, 4] if q is None else [int(torch.multinomial(q[j], 1, generator=g)) for j in range(2)]
        a, token = verifier(p, draft, q, g)
        first[draft[0] if a >= 1 else token] += 1
        if a >= 1:
            second[draft[1] if a >= 2 else token] += 1
    return first, second


@pytest.mark.parametrize("case", ["point_mass", "draft_probs", "q_equals_p", "q_with_zeros"])
def test_rejection_sample_emits_the_target_distribution(case):
    g = torch.Generator().manual_seed(0)
    v = 6
    p = torch.softmax(torch.randn(3, v, generator=g) * 1.5, -1)
    q = {"point_mass": None, "draft_probs": torch.softmax(torch.randn(2, v, generator=g) * 1.5, -1),
         "q_equals_p": p[:2].clone(), "q_with_zeros": torch.softmax(torch.randn(2, v, generator=g), -1)}[case]
    if case == "q_with_zeros":  # a draft with a cut vocabulary: tokens 3.. are never drafted
        q[:, 3:] = 0
        q /= q.sum(-1, keepdim=True)
    first, second = _draws(p, q, 6000)
    for counts, probs in ((first, p[0]), (second, p[1])):
        stat, df = chi2_stat(counts, probs)
        assert stat < chi2_critical(df), (case, counts / counts.sum(), probs)


def test_accepting_every_draft_is_detected():
    """The check above has the power to see a wrong verifier: one that always accepts emits q, not p."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, 6, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(2, 6, generator=g) * 1.5, -1)
    first, _ = _draws(p, q, 6000, verifier=lambda p, d, q, g: (len(d), int(torch.multinomial(p[-1], 1, generator=g))))
    stat, df = chi2_stat(first, p[0])
    assert stat > 10 * chi2_critical(df)


def test_verify_chunk_penalizes_drafts_as_context():
    """Row j's distribution counts the drafts before it as seen, as plain decoding would have."""
    vocab = 8
    params = SamplingParams(temperature=0.0, repetition_penalty=5.0)
    logits = torch.zeros(3, vocab)
    logits[:, 3] = 2.0  # token 3 best everywhere unless penalized
    logits[:, 5] = 1.0
    state = new_sampling_state(params, (1,), vocab, torch.device("cpu"))
    a, token = verify_chunk(logits, [3, 3], state, None)
    assert (a, token) == (1, 5)  # row 1 sees draft 3 in its context: 2/5 < 1, so 5 is its argmax
    assert state.seen[0, [3, 5]].all()
    expect = apply_repetition_penalty(logits[:1], torch.zeros(1, vocab, dtype=torch.bool), 5.0)
    assert expect.argmax() == 3


# ------------------------------------------------------------------ the engine end to end
VOCAB = 12
PROMPT = [1, 5, 7, 3, 4, 4, 4, 4, 4, 4, 4, 4]  # the model's greedy path: n-gram drafts of 4s, often right
PARAMS = dict(temperature=1.0, top_k=9, top_p=0.97, repetition_penalty=1.1, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def small_model():
    model = make_tiny_model("llama", seed=4, vocab_size=VOCAB, num_hidden_layers=3, bos_token_id=1,
                            eos_token_id=(2,), pad_token_id=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.5)  # peakier: drafts get accepted often enough to test both branches
    return model


@torch.no_grad()
def exact_joint(model) -> torch.Tensor:
    """P(token 2 = i, token 3 = j), enumerated over token 1 with the sampler's own transforms."""
    p = SamplingParams(**PARAMS)
    pairs = torch.cartesian_prod(torch.arange(VOCAB), torch.arange(VOCAB))  # (t1, t2)
    seqs = torch.cat([torch.tensor(PROMPT).expand(len(pairs), -1), pairs], 1)
    logits = model.compute_logits(model(seqs, torch.arange(seqs.shape[1])))[:, -3:].float()  # (N, 3, V)
    joint = torch.zeros(VOCAB, VOCAB, VOCAB)
    for row, (t1, t2) in enumerate(pairs.tolist()):
        dists = []
        for pos, context in enumerate((PROMPT, PROMPT + [t1], PROMPT + [t1, t2])):
            seen = torch.zeros(1, VOCAB, dtype=torch.bool)
            seen[0, context] = True
            x = apply_repetition_penalty(logits[row, pos][None], seen, p.repetition_penalty)
            dists.append(sampling_probs(x, p.temperature, p.top_k, p.top_p, p.min_p)[0])
        joint[t1, t2] = dists[0][t1] * dists[1][t2] * dists[2]
    return joint.sum(0)  # (t2, t3)


@pytest.mark.parametrize("method", ["ngram", "layer_skip"])
def test_engine_sampling_distribution_matches_the_target(small_model, method):
    n = 2000
    spec = {"method": method, "num_speculative_tokens": 2, "disable_above_batch": None}
    spec.update(ngram_min=1) if method == "ngram" else spec.update(draft_vocab=range(9))  # q = 0 on 9, 10, 11
    core = EngineCore(small_model, None, EngineConfig(block_size=4, max_num_seqs=512, max_num_batched_tokens=4096,
                                                     speculative=spec))
    outs = {}
    for seed in range(n):
        core.add_request(PROMPT, SamplingParams(**PARAMS, seed=seed), request_id=str(seed))
    while core.has_unfinished:
        for req in core.step():
            if req.finished:
                outs[req.request_id] = req.output().token_ids
    counts = torch.zeros(VOCAB, VOCAB)
    for ids in outs.values():
        counts[ids[1], ids[2]] += 1
    stat, df = chi2_stat(counts, exact_joint(small_model))
    assert stat < chi2_critical(df), (stat, df)
    s = core.stats()
    rejected = s.spec_draft_tokens - s.spec_accepted_tokens
    assert s.spec_accepted_tokens > n // 20 and rejected > n // 4  # both branches of the verifier ran often
