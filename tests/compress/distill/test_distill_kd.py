"""DistillConfig end to end on tiny models: recovery after layer removal / noise / SVD, losses, what
trains and what stays frozen, eval mode afterwards, determinism, validation."""

import copy

import pytest
import torch
from conftest import make_tiny_model

from leanfm.compress import ConfigError, Recipe, Step, compress_, config_from_dict
from leanfm.compress.api import CompressContext, Override
from leanfm.compress.distill.kd import DistillConfig, _chunked_logit_loss, heldout_kl, trainable_parameters
from leanfm.compress.lowrank.svd import SVDConfig
from leanfm.compress.quant.rtn import RTNConfig
from leanfm.models.lowrank_layers import LowRankLinear
from leanfm.models.quant_layers import QuantLinear

pytestmark = pytest.mark.usefixtures("single_thread")

# 144 training samples: 30 steps of 4 never repeat one, so the student cannot memorise random tokens
TOKENS = torch.randint(0, 128, (160, 32), generator=torch.Generator().manual_seed(0))
FAST = dict(steps=30, lr=1e-3, batch_size=4, warmup_steps=2)


def _remove_layers(model, indices):
    model.remove_layers(indices)  # what ShortGPT-style pruning does
    return model


def _teacher(variant="llama", **kw):
    return make_tiny_model(variant, seed=0, num_hidden_layers=4, **kw)


def _noisy(model, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("model.layers.") and p.dim() == 2:
                p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_distillation_recovers_a_removed_layer(loss):
    teacher = _teacher()
    student = _remove_layers(copy.deepcopy(teacher), [2])
    s = compress_(student, DistillConfig(loss=loss, **FAST), calibration=TOKENS, teacher=teacher,
                  progress=False).steps[0]
    assert s["heldout_samples"] == 16 and s["train_samples"] == 144
    assert s["kl_before"] > 0.05
    assert s["kl_after"] < 0.8 * s["kl_before"] and s["kl_recovered"] > 0.2
    assert s["loss_last"] < s["loss_first"]
    assert heldout_kl(student, teacher, TOKENS[-16:]) == pytest.approx(s["kl_after"], rel=1e-5)


def test_noise_perturbed_student_with_hidden_loss():
    teacher = _teacher("qwen2", layer_types=("full_attention",) * 4)  # biases on q/k/v
    student = _noisy(copy.deepcopy(teacher))
    s = compress_(student, DistillConfig(hidden_weight=1.0, **FAST), calibration=TOKENS, teacher=teacher,
                  progress=False).steps[0]
    assert s["kl_after"] < 0.8 * s["kl_before"]


def test_gemma_offset_norms_and_norms_only():
    teacher = _teacher("gemma3", layer_types=("sliding_attention",) * 3 + ("full_attention",))
    with torch.no_grad():  # random tiny Gemma logits are near one-hot; soften them so KL is informative
        teacher.model.embed_tokens.weight.mul_(0.05)
    student = _noisy(copy.deepcopy(teacher), scale=0.5)
    s = compress_(student, DistillConfig(trainable="norms", **FAST), calibration=TOKENS, teacher=teacher,
                  progress=False).steps[0]
    assert s["trainable_params"] == sum(p.numel() for n, p in student.named_parameters() if "norm" in n)
    assert s["kl_after"] < s["kl_before"]


def test_svd_then_distill_recipe_trains_the_factors():
    model = _teacher()
    recipe = Recipe([SVDConfig(param_ratio=0.5), Step(DistillConfig(trainable="lowrank", **FAST))])
    report = compress_(model, recipe, calibration=TOKENS, progress=False)  # compress_ copies the teacher
    s = report.steps[1]
    lowrank = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert s["trainable_params"] == sum(m.num_parameters for m in lowrank)
    assert s["kl_after"] < 0.8 * s["kl_before"]


def test_student_state_after_training():
    teacher = _teacher()
    student = _remove_layers(copy.deepcopy(teacher), [1])
    student.train()  # compress_ restores the caller's mode; the handler itself leaves eval mode
    student.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    compress_(student, DistillConfig(**FAST), calibration=TOKENS, teacher=teacher, progress=False)
    assert student.training  # restored by compress_
    student.eval()
    compress_(student, DistillConfig(**FAST), calibration=TOKENS, teacher=teacher, progress=False)
    assert not any(m.training for m in student.modules())
    assert all(p.grad is None for p in student.parameters())
    assert not student.model.layers[0].mlp.up_proj.weight.requires_grad  # flags restored
    assert student.model.layers[0].mlp.down_proj.weight.requires_grad
    # the teacher never changes
    fresh = _teacher()
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), fresh.state_dict().values(),
                                                 strict=True))


def test_deterministic_given_the_seed():
    teacher = _teacher()
    runs = []
    for seed in (0, 0, 1):
        student = _remove_layers(copy.deepcopy(teacher), [2])
        compress_(student, DistillConfig(**{**FAST, "steps": 5}), calibration=TOKENS, teacher=teacher, seed=seed,
                  progress=False)
        runs.append(student.state_dict())
    same = all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    differ = any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])
    assert same and differ


def test_quantized_layers_stay_frozen():
    teacher = _teacher("qwen2", layer_types=("full_attention",) * 4)
    student = copy.deepcopy(teacher)
    compress_(student, Step(RTNConfig(bits=4, group_size=32), include=("model.layers.*.mlp.*",)), progress=False)
    quant = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in student.named_modules()
             if isinstance(m, QuantLinear)}
    ctx = CompressContext(student, Step(DistillConfig()), TOKENS)
    names = [n for n, _ in trainable_parameters(student, ctx, "float")]
    assert not any(n.split(".mlp.")[-1].startswith(("gate", "up", "down")) for n in names if ".mlp." in n)
    assert "model.norm.weight" in names and "model.layers.0.self_attn.q_proj.bias" in names
    assert not any(n.startswith(("lm_head", "model.embed_tokens")) for n in names)
    # a mild perturbation (4-bit MLPs) recovers with a gentler learning rate
    s = compress_(student, DistillConfig(**{**FAST, "lr": 3e-4}), calibration=TOKENS, teacher=teacher,
                  progress=False).steps[0]
    for n, m in student.named_modules():
        if isinstance(m, QuantLinear):
            assert all(torch.equal(v, quant[n][k]) for k, v in m.state_dict().items())
    assert s["kl_after"] < s["kl_before"]


def test_include_and_skip_narrow_what_trains():
    model = _teacher()
    step = Step(DistillConfig(trainable="linear"), include=("model.layers.1.*",),
                overrides=(Override("*.mlp.*", skip=True),))
    names = [n for n, _ in trainable_parameters(model, CompressContext(model, step, TOKENS), "linear")]
    assert names == [f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkvo"]


def test_chunked_loss_matches_unchunked():
    teacher, student = _teacher(), _noisy(_teacher())
    ids, pos = TOKENS[:2, :16], torch.arange(16)
    with torch.no_grad():
        h_t = teacher(ids, pos)
    h_s = student(ids, pos)
    g1, l1 = _chunked_logit_loss(student, teacher, h_s, h_t, "reverse_kl", 2.0, chunk=5)
    g2, l2 = _chunked_logit_loss(student, teacher, h_s, h_t, "reverse_kl", 2.0, chunk=1000)
    torch.testing.assert_close(g1, g2)
    assert l1 == pytest.approx(l2, rel=1e-5)


def test_errors():
    teacher = _teacher()
    with pytest.raises(ConfigError, match="calibration"):
        compress_(copy.deepcopy(teacher), DistillConfig(), teacher=teacher, progress=False)
    with pytest.raises(ConfigError, match="seq_len"):
        compress_(copy.deepcopy(teacher), DistillConfig(seq_len=64), calibration=TOKENS, teacher=teacher,
                  progress=False)
    with pytest.raises(ConfigError, match="holdout"):
        compress_(copy.deepcopy(teacher), DistillConfig(), calibration=TOKENS[:1], teacher=teacher,
                  progress=False)
    with pytest.raises(ConfigError, match="nothing to train"):
        compress_(copy.deepcopy(teacher), DistillConfig(trainable="lowrank"), calibration=TOKENS,
                  teacher=teacher, progress=False)


@pytest.mark.parametrize("bad,match", [
    ({"loss": "mse"}, "loss must be"),
    ({"trainable": "everything"}, "trainable must be"),
    ({"steps": 0}, "steps must be"),
    ({"lr": 0}, "lr must be"),
    ({"holdout": 1.0}, "holdout must be"),
    ({"seq_len": 1}, "seq_len must be"),
    ({"grad_clip": 0}, "grad_clip"),
])
def test_bad_distill_configs(bad, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"method": "distill", **bad})


def test_batches_crop_and_keep_a_common_bos():
    from leanfm.compress.distill.kd import _batches

    tokens = torch.arange(5 * 12).reshape(5, 12)
    cfg = DistillConfig(batch_size=3, seq_len=6)
    seen = set()
    for _, batch in zip(range(5), _batches(tokens, cfg, seed=0), strict=False):
        assert batch.shape == (3, 6)
        for row in batch:  # contiguous crops of one sample
            assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 6))
            seen.add(int(row[0]) // 12)
    assert seen == set(range(5))  # every sample once an epoch
    tokens[:, 0] = 1  # a common BOS stays in front of every crop
    for _, batch in zip(range(3), _batches(tokens, cfg, seed=0), strict=False):
        assert (batch[:, 0] == 1).all()
        assert all(torch.equal(row[1:], torch.arange(int(row[1]), int(row[1]) + 5)) for row in batch)
