"""Cost harness (leanfm.bench.cost) and machine meters (leanfm.bench.system) on tiny random models."""

from __future__ import annotations

import pytest
import torch

from leanfm.bench import system
from leanfm.bench.cost import CostConfig, CostConfigError, measure_cost, model_bytes, prompt_ids
from leanfm.utils.errors import LeanfmError

pytestmark = pytest.mark.usefixtures("single_thread")


class CharTokenizer:
    """Enough of a tokenizer for the cost harness: one id per character, inside a 128-token vocab."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [3 + ord(c) % 120 for c in text]


# ------------------------------------------------------------------ config
def test_cost_config_validates_and_round_trips():
    cfg = CostConfig(prefill_lengths=[16, 32], decode_batches=[1, 2], decode_tokens=8, warmup=0, repeats=1)
    assert cfg.prefill_lengths == (16, 32)
    assert CostConfig.from_dict(cfg.to_dict()) == cfg
    for bad in (dict(prefill_lengths=()), dict(decode_batches=(1, 0)), dict(decode_tokens=1),
                dict(repeats=0), dict(warmup=-1), dict(prefill_lengths=(True,))):
        with pytest.raises(CostConfigError):
            CostConfig(**bad)
    assert issubclass(CostConfigError, LeanfmError) and issubclass(CostConfigError, ValueError)


def test_prompt_ids_are_real_text_repeated():
    tok = CharTokenizer()
    ids = prompt_ids(tok, 3000)
    assert len(ids) == 3000  # the passage is ~1.3k chars: repeated
    assert prompt_ids(tok, 10, offset=5) == ids[5:15]


# ------------------------------------------------------------------ measure_cost
def test_measure_cost_structure(tiny_model, tmp_path):
    model = tiny_model("gemma3")  # max_position_embeddings 256, tied embeddings, sliding window 8
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x" * 1000)
    cfg = CostConfig(prefill_lengths=(16, 300), decode_batches=(1, 3), decode_tokens=6, warmup=1, repeats=3,
                     decode_prompt_tokens=20)
    cost = measure_cost(model, CharTokenizer(), cfg, weight_files=[weights], machine_gb_s=10.0)

    assert set(cost["prefill"]) == {"16", "300"} and set(cost["decode"]) == {"1", "3"}
    assert cost["prefill"]["300"]["tokens"] == 256 and cost["prefill"]["300"]["clamped"]
    assert not cost["prefill"]["16"]["clamped"]
    for r in cost["prefill"].values():
        s = r["tokens_per_second"]
        assert 0 < s["min"] <= s["median"] <= s["max"]
    for b, r in cost["decode"].items():
        assert r["batch"] == int(b) and r["new_tokens"] == 6 and r["prompt_tokens"] == 20
        per, total = r["tokens_per_second_per_sequence"]["median"], r["tokens_per_second_total"]["median"]
        assert per > 0 and total == pytest.approx(per * int(b))
        assert r["energy"]["joules_per_token"] > 0
    assert cost["ttft_seconds"]["prompt_tokens"] == 16 and cost["ttft_seconds"]["median"] > 0
    assert cost["tpot_seconds"]["median"] == pytest.approx(1 / cost["decode"]["1"]["tokens_per_second_per_sequence"]
                                                           ["median"], rel=1e-6)
    mem = cost["memory"]
    assert mem["disk_bytes"] == 1000 and mem["peak_rss_bytes"] > mem["model_bytes"] > 0
    bw = cost["bandwidth"]
    assert bw["bytes_per_param"] == pytest.approx(4.0, rel=0.05)
    assert bw["achieved_gb_s"] > 0 and bw["fraction"] == pytest.approx(bw["achieved_gb_s"] / 10.0)
    assert cost["energy"]["batch"] == 1 and cost["energy"]["energy_source"] in ("rapl", "estimate")
    assert cost["dtype"] == "float32" and cost["config"] == cfg.to_dict()
    assert set(cost["load_avg_1m"]) == {"start", "end"} and isinstance(cost["warnings"], list)


def test_measure_cost_at_context_limit(tiny_model):
    model = tiny_model("llama", max_position_embeddings=32)
    cfg = CostConfig(prefill_lengths=(32, 64), decode_batches=(2,), decode_tokens=40, warmup=0, repeats=1)
    cost = measure_cost(model, CharTokenizer(), cfg, machine_gb_s=5.0)
    d = cost["decode"]["2"]
    assert d["prompt_tokens"] + d["new_tokens"] <= 32 and d["new_tokens"] == 31
    assert cost["prefill"]["64"]["tokens"] == 32
    assert cost["tpot_seconds"] is None and cost["energy"]["batch"] == 2  # no batch-1 run
    assert cost["bandwidth"]["achieved_gb_s"] is None


def test_measure_cost_rejects_tokenizer_beyond_vocab(tiny_model):
    class Wide(CharTokenizer):
        def encode(self, text, add_special_tokens=True):
            return [500] * len(text)

    with pytest.raises(LeanfmError, match="vocabulary"):
        measure_cost(tiny_model("llama"), Wide(), CostConfig(prefill_lengths=(8,), decode_batches=(1,),
                                                             decode_tokens=2, repeats=1), machine_gb_s=1.0)


def test_model_bytes_counts_tied_weights_once(tiny_model):
    model = tiny_model("gemma3")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    unique = {p.data_ptr(): p.numel() * 4 for p in model.parameters()}
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert model_bytes(model) == sum(unique.values()) + buffers
    assert model_bytes(model.to(torch.bfloat16)) < model_bytes(tiny_model("gemma3"))


# ------------------------------------------------------------------ system
def test_machine_info_and_rss():
    info = system.machine_info()
    assert info["cpu"]["model"] and isinstance(info["cpu"]["flags"], list)
    assert info["torch_threads"] >= 1 and (info["ram_bytes"] is None or info["ram_bytes"] > 0)
    system.reset_peak_rss()  # (some kernels accept the reset and keep the old mark: the peak is only >= now)
    before = system.current_rss_bytes()
    assert system.peak_rss_bytes() > 0 and before > 0
    big = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB touched
    now = system.current_rss_bytes()
    assert now >= before + 32 * 1024 * 1024
    assert system.peak_rss_bytes() >= now
    del big


def test_busy_warning(monkeypatch):
    monkeypatch.setattr(system.os, "cpu_count", lambda: 2)
    assert system.busy_warning(None) is None and system.busy_warning(1.5) is None
    assert "busy" in system.busy_warning(7.25) and "7.2 on 2" in system.busy_warning(7.25)
    load = system.load_average()
    assert load is None or load >= 0


def test_memory_bandwidth_small():
    bw = system.measure_memory_bandwidth(buffer_mib=4, threads=1, repeats=2)
    assert bw["copy_gb_s"] > 0 and bw["triad_gb_s"] > 0
    assert bw["gb_s"] == max(bw["copy_gb_s"], bw["triad_gb_s"]) and bw["buffer_bytes"] == 4 << 20
    with pytest.raises(ValueError):
        system.measure_memory_bandwidth(buffer_mib=0)


def test_counter_delta_wraps():
    assert system.counter_delta(100, 250, 1000) == 150
    assert system.counter_delta(900, 50, 999) == 150  # wrapped at 999 -> 0
    assert system.counter_delta(900, 50, None) == 0


def _fake_zone(root, name, label, energy, max_range=1_000_000):
    z = root / name
    z.mkdir(parents=True)
    (z / "name").write_text(label + "\n")
    (z / "energy_uj").write_text(f"{energy}\n")
    (z / "max_energy_range_uj").write_text(f"{max_range}\n")
    return z


def test_energy_meter_reads_rapl_with_wraparound(tmp_path):
    pkg = _fake_zone(tmp_path, "intel-rapl:0", "package-0", 999_000)
    _fake_zone(tmp_path, "intel-rapl:0:0", "core", 5)  # a sub-zone: not counted twice
    _fake_zone(tmp_path, "intel-rapl:1", "psys", 5)  # platform: overlaps the package
    meter = system.EnergyMeter(root=tmp_path)
    assert [z.name for z in meter.zones] == ["intel-rapl:0"]
    meter.start()
    (pkg / "energy_uj").write_text("2000\n")  # wrapped past 1_000_000
    r = meter.stop()
    assert r["energy_source"] == "rapl" and r["assumption"] is None
    assert r["joules"] == pytest.approx((1_000_001 - 999_000 + 2000) / 1e6)


def test_energy_meter_estimates_without_rapl(tmp_path):
    with system.EnergyMeter(watts_per_core=7.0, root=tmp_path / "absent") as meter:
        sum(i * i for i in range(200_000))
    r = meter.reading()
    assert r["energy_source"] == "estimate" and "ESTIMATE" in r["assumption"] and "7 W" in r["assumption"]
    assert r["joules"] == pytest.approx(7.0 * r["cpu_seconds"]) and r["cpu_seconds"] > 0
