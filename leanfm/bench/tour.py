"""The tour: compress a model with a few recipes, then measure each artifact against the float base.

For every variant: load the base, compress it (calibration from the harness' `calib` split), save the
artifact, reload it from disk (what a user deploys), and measure on the same footing as the base:
perplexity on the held-out `eval` split (same windows for all), batch-1 decode tokens/s, and size
(bytes on disk, bits per weight). The rows are printed side by side and written as run records plus a
report (table and Pareto plots) by leanfm.bench.report.

    rows = run_tour(TourConfig(model="gemma-3-270m", variants=("int8", "gptq-4")))

`benchmarks/bench_compress.py` runs the full set behind the README's compression table.
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from leanfm.utils.errors import LeanfmError

_LAYERS_AND_HEAD = ["model.layers.*", "lm_head"]

# name -> recipe (Recipe.to_dict() form). "base" is the float model itself. The 4-bit rows quantize the
# decoder layers at 4 bits (group 128) and the LM head - tied to the embedding, 63% of gemma-3-270m's
# weights - at 8 bits, as llama.cpp's Q4_K_M does; "int4-all" puts the head at 4 bits too (the smallest).
_HEAD8 = {"method": "rtn", "bits": 8, "group_size": -1, "include": ["lm_head"]}
RECIPES: dict[str, list[dict[str, Any]]] = {
    "int8": [{"method": "rtn", "bits": 8, "group_size": -1, "include": _LAYERS_AND_HEAD}],
    "rtn-4": [{"method": "rtn", "bits": 4, "group_size": 128}, _HEAD8],
    "gptq-4": [{"method": "gptq", "bits": 4, "group_size": 128}, _HEAD8],
    "awq-4": [{"method": "awq", "bits": 4, "group_size": 128}, _HEAD8],
    "int4-all": [{"method": "rtn", "bits": 4, "group_size": 128, "include": _LAYERS_AND_HEAD}],
    "wanda-50+int4": [{"method": "wanda", "sparsity": 0.5}, {"method": "rtn", "bits": 4, "group_size": 128}, _HEAD8],
}
TOUR_VARIANTS = ("int8", "gptq-4", "wanda-50+int4")


@dataclass(frozen=True)
class TourConfig:
    model: str = "gemma-3-270m"
    variants: tuple[str, ...] = TOUR_VARIANTS
    out_dir: str = "tour"
    calib_samples: int = 32
    calib_seq_len: int = 512
    calib_corpus: str = "wiki"
    ppl_corpus: str = "wiki"
    ppl_ctx: int = 512
    ppl_windows: int = 16
    decode_tokens: int = 64
    decode_repeats: int = 3
    seed: int = 0
    recipes: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: dict(RECIPES))

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v != "base" and v not in self.recipes]
        if unknown:
            raise LeanfmError(f"unknown tour variant(s) {unknown}; choose from {['base', *self.recipes]} "
                              "or pass a recipe file")
        for name in ("calib_samples", "calib_seq_len", "ppl_ctx", "ppl_windows", "decode_tokens", "decode_repeats"):
            if getattr(self, name) < 1:
                raise LeanfmError(f"tour: {name} must be >= 1, got {getattr(self, name)}")


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer, shared tensors once (what the weights occupy in memory)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.dtype, t.shape)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def decode_tokens_per_second(model, tokenizer, n_tokens: int, repeats: int) -> float:
    """Median batch-1 greedy decode speed (EOS ignored), after one warm-up run."""
    from leanfm.engine.generate import Generator
    from leanfm.engine.params import SamplingParams

    gen = Generator(model, tokenizer)
    prompt = "The history of the printing press begins in"
    gen.generate(prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    params = SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True)
    return statistics.median(gen.generate(prompt, params).decode_tokens_per_second for _ in range(repeats))


def measure(model, tokenizer, cfg: TourConfig) -> dict[str, Any]:
    """Perplexity on the held-out windows and decode speed of a model prepared for inference."""
    from leanfm.bench.corpora import load_corpus
    from leanfm.bench.perplexity import PerplexityConfig, perplexity
    from leanfm.engine.runtime import prepare_for_inference

    prepare_for_inference(model)
    pcfg = PerplexityConfig(ctx=cfg.ppl_ctx, max_tokens=cfg.ppl_windows * (cfg.ppl_ctx - 1))
    with torch.inference_mode():
        p = perplexity(model, tokenizer, load_corpus(cfg.ppl_corpus, "eval"), pcfg, progress=True)
        tps = decode_tokens_per_second(model, tokenizer, cfg.decode_tokens, cfg.decode_repeats)
    return {"ppl": p.ppl, "ppl_windows": p.n_windows, "ppl_scored_tokens": p.n_scored_tokens,
            "decode_tok_s": tps, "memory_bytes": stored_bytes(model)}


def probe_logits(model) -> torch.Tensor:
    """Logits of a fixed 32-token input: to check that a saved artifact reloads to the same model."""
    ids = torch.arange(1, 33).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(32)))


def reference_logits_path(artifact: Path) -> Path:
    """Where run_variant keeps the in-memory model's probe logits (beside the artifact, not in it)."""
    return artifact.parent / f"{artifact.name}.probe-logits.pt"


def _calibration(tokenizer, cfg: TourConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    from leanfm.bench.corpora import calibration_samples

    tokens = calibration_samples(tokenizer, cfg.calib_samples, cfg.calib_seq_len, cfg.seed, cfg.calib_corpus)
    info = {"corpus": cfg.calib_corpus, "split": "calib", "samples": cfg.calib_samples,
            "seq_len": cfg.calib_seq_len, "seed": cfg.seed}
    return tokens, info


def run_variant(name: str, cfg: TourConfig, base_params: int) -> dict[str, Any]:
    """Compress (unless `base`), save, reload from disk and measure one variant."""
    from leanfm.checkpoint.loader import load_model

    out = Path(cfg.out_dir) / name
    t0 = time.perf_counter()
    if name == "base":
        loaded = load_model(cfg.model, progress=True)
        row = {"variant": "base", "recipe": None, "compress_seconds": 0.0, "path": str(loaded.path),
               "disk_bytes": sum(f.stat().st_size for f in Path(loaded.path).glob("*.safetensors"))}
    else:
        from leanfm.checkpoint.artifact import save_compressed
        from leanfm.compress import Recipe, compress_

        recipe = Recipe.from_dict(cfg.recipes[name])
        loaded = load_model(cfg.model, progress=True)
        tokens, info = _calibration(loaded.tokenizer, cfg) if recipe.needs_calibration else (None, None)
        report = compress_(loaded.model, recipe, calibration=tokens, calibration_info=info, seed=cfg.seed)
        save_compressed(loaded.model, loaded.tokenizer, out, report=report.to_dict(), overwrite=True)
        seconds = time.perf_counter() - t0
        before = probe_logits(loaded.model)
        torch.save(before, reference_logits_path(out))
        del loaded
        gc.collect()
        loaded = load_model(str(out), progress=False)  # measure what was saved, not what is in memory
        row = {"variant": name, "recipe": recipe.to_dict(), "compress_seconds": round(seconds, 1), "path": str(out),
               "disk_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
               "reload_identical": bool(torch.equal(before, probe_logits(loaded.model)))}
    row.update(measure(loaded.model, loaded.tokenizer, cfg))
    row["bits_per_weight"] = row["disk_bytes"] * 8 / base_params
    manifest = out / "leanfm_compressed.json"
    if name != "base" and manifest.exists():  # bits per weight of the decoder layers and embedding/head apart
        bpw = json.loads(manifest.read_text()).get("sizes", {}).get("bits_per_weight", {})
        row["bpw_layers"], row["bpw_embedding_head"] = bpw.get("decoder_layers"), bpw.get("embedding_head")
    else:
        row["bpw_layers"] = row["bpw_embedding_head"] = 32.0
    return row


def run_tour(cfg: TourConfig, echo=print) -> list[dict[str, Any]]:
    """Base first, then every variant; returns the rows (also written to OUT/tour.json)."""
    from leanfm.checkpoint.loader import load_model

    base_params = load_model(cfg.model, progress=True).model.num_parameters()
    rows = []
    for name in ("base", *[v for v in cfg.variants if v != "base"]):
        echo(f"== {name}")
        rows.append(run_variant(name, cfg, base_params))
        echo(format_rows(rows))
        gc.collect()
    base_row = rows[0]
    for r in rows:
        r["ppl_increase_pct"] = 100 * (r["ppl"] / base_row["ppl"] - 1)
        r["decode_speedup"] = r["decode_tok_s"] / base_row["decode_tok_s"]
        r["size_vs_base"] = r["disk_bytes"] / base_row["disk_bytes"]
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tour.json").write_text(json.dumps({"config": {k: v for k, v in cfg.__dict__.items()}, "rows": rows},
                                              indent=2, default=str))
    return rows


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The side-by-side table (plain text)."""
    base = rows[0]
    head = f"{'variant':<19}{'bits/w':>8}{'disk':>10}{'ppl':>10}{'Δppl':>9}{'decode tok/s':>14}{'speed-up':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = r["ppl"] / base["ppl"]
        ppl = f"{r['ppl']:.3f}" if r["ppl"] < 1e4 else f"{r['ppl']:.2e}"
        dppl = f"{100 * (ratio - 1):+.1f}%" if ratio < 100 else f"{ratio:.1e}x"
        lines.append(f"{r['variant']:<19}{r['bits_per_weight']:>8.2f}{_fmt_bytes(r['disk_bytes']):>10}"
                     f"{ppl:>10}{dppl:>9}{r['decode_tok_s']:>14.1f}"
                     f"{r['decode_tok_s'] / base['decode_tok_s']:>9.2f}x")
    return "\n".join(lines)


def pareto_plot(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Perplexity against size (bits per weight), each variant labelled; the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted((r["bits_per_weight"], r["ppl"], r["variant"]) for r in rows if math.isfinite(r["ppl"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts])
    for x, y, label in pts:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front, best = [], math.inf
    for x, y, _ in pts:
        if y < best:
            front.append((x, y))
            best = y
    ax.plot([p[0] for p in front], [p[1] for p in front], linestyle="--", linewidth=1)
    ax.set_xlabel("bits per weight (disk bytes x 8 / base parameters)")
    ax.set_ylabel("perplexity (held-out wiki split)")
    ax.set_title(title or "size vs quality")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def tour_cmd(
    model: Annotated[str, typer.Option(help="model alias, .gguf file or HF directory")] = "gemma-3-270m",
    variants: Annotated[str, typer.Option(help=f"comma-separated, from {', '.join(RECIPES)}")] = ",".join(TOUR_VARIANTS),
    out: Annotated[Path, typer.Option("--output", "-o", help="directory for artifacts, tour.json and plots")] = Path("tour"),
    calib_samples: Annotated[int, typer.Option(help="calibration samples (calib split)")] = 32,
    calib_seq_len: Annotated[int, typer.Option(help="tokens per calibration sample")] = 512,
    ppl_windows: Annotated[int, typer.Option(help="held-out perplexity windows")] = 16,
    ctx: Annotated[int, typer.Option(help="perplexity window, tokens")] = 512,
    decode_tokens: Annotated[int, typer.Option(help="tokens per decode-speed run")] = 64,
    threads: Annotated[int, typer.Option(help="CPU threads (0 = all cores)")] = 0,
    seed: Annotated[int, typer.Option(help="calibration sampling seed")] = 0,
) -> None:
    """Compress the model with a few recipes, measure each against the base, print the table, plot."""
    from leanfm.cli_common import setup_torch

    setup_torch(threads, "float32", seed)
    cfg = TourConfig(model=model, variants=tuple(v.strip() for v in variants.split(",") if v.strip()),
                     out_dir=str(out), calib_samples=calib_samples, calib_seq_len=calib_seq_len,
                     ppl_windows=ppl_windows, ppl_ctx=ctx, decode_tokens=decode_tokens, seed=seed)
    rows = run_tour(cfg, echo=typer.echo)
    typer.echo("\n" + format_rows(rows))
    plot = pareto_plot(rows, out / "pareto.png", f"{model}: compression recipes (4-bit GGUF base, dequantized)")
    typer.echo(f"wrote {out / 'tour.json'} and {plot}")
