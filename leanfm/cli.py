"""`leanfm ...`: the command line. Builds configs from flags and calls the Python APIs.

User errors (LeanfmError, bad flags) print one line `error: ...` to stderr and exit with status 1;
no traceback. Set LEANFM_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import click
import typer

from leanfm.cli_common import (
    DTYPES,
    AdapterOpt,
    DtypeOpt,
    ModelOpt,
    ThreadsOpt,
    load_for_inference,
    setup_torch,
)
from leanfm.utils.errors import LeanfmError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="leanfm: make foundation models cheap to run and adapt.",
)

SeedOpt = Annotated[int | None, typer.Option(help="random seed for sampling")]


def _sampling(max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop):
    from leanfm.engine.params import SamplingParams

    try:
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                              stop=tuple(stop or ()))
    except ValueError as e:
        raise LeanfmError(str(e)) from None


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the text to continue")],
    model: ModelOpt = "gemma-3-270m",
    max_tokens: Annotated[int, typer.Option(help="new tokens at most")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.8,
    top_k: int = 0,
    top_p: float = 0.95,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    stop: Annotated[list[str] | None, typer.Option(help="stop string (repeatable)")] = None,
    chat_template: Annotated[bool, typer.Option("--chat-template", help="wrap the prompt as a user turn")] = False,
    stats: Annotated[bool, typer.Option(help="print timing and tokens/s to stderr")] = False,
    threads: ThreadsOpt = 0,
    dtype: DtypeOpt = "float32",
    seed: SeedOpt = None,
    adapter: AdapterOpt = None,
    speculative: Annotated[str | None, typer.Option(help="speculative decoding: ngram | draft | layer_skip")] = None,
    num_speculative_tokens: Annotated[int, typer.Option(help="draft tokens verified per step")] = 4,
    draft_model: Annotated[str | None, typer.Option(help="--speculative draft: alias, .gguf or HF dir "
                                                          "with the same tokenizer")] = None,
    skip_layers: Annotated[str | None, typer.Option(help="--speculative layer_skip: layers to skip, e.g. 5,7,9 "
                                                          "[default: every other middle layer]")] = None,
) -> None:
    """Continue PROMPT, streaming the text to stdout."""
    from leanfm.engine.llm import LLM

    torch_dtype, _ = setup_torch(threads, dtype, seed)
    params = _sampling(max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop)
    spec = _speculative(speculative, num_speculative_tokens, draft_model, skip_layers)
    loaded = load_for_inference(model, torch_dtype, adapter, for_generation=True)
    tok = loaded.tokenizer
    if chat_template:  # the template writes BOS itself where the model wants one
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
    else:
        ids = tok.encode(prompt)
    virtual = getattr(loaded.model, "num_virtual_tokens", 0)  # a prompt/prefix tuning adapter's, in front
    total = min(virtual + len(ids) + max_tokens, loaded.config.max_position_embeddings)
    llm = LLM(loaded.model, tok, max_num_seqs=1, num_blocks=-(-total // 16) + 2,  # a KV cache for this request only
              speculative=spec)
    final = None
    for out in llm.stream(ids, params):
        if out.new_text:
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
        final = out
    sys.stdout.write("\n")
    if stats and final is not None:
        m = final.metrics
        typer.echo(
            f"[load {loaded.load_seconds:.2f}s | prompt {m.num_prompt_tokens} tok, first token "
            f"{(m.ttft or 0.0) * 1e3:.0f} ms | {len(final.token_ids)} tok at "
            f"{m.decode_tokens_per_second:.1f} tok/s | finish: {final.finish_reason}"
            + (f" | drafts accepted {m.num_accepted_tokens}/{m.num_draft_tokens}, "
               f"{m.mean_accepted_length:.2f} tok/step" if spec else "") + "]",
            err=True,
        )


def _speculative(method: str | None, k: int, draft_model: str | None, skip_layers: str | None) -> dict | None:
    """The engine's speculative option from the generate flags (validated by EngineConfig)."""
    if method is None:
        if draft_model is not None or skip_layers is not None:
            raise LeanfmError("--draft-model and --skip-layers need --speculative draft / layer_skip")
        return None
    spec: dict = {"method": method, "num_speculative_tokens": k}
    if draft_model is not None:
        spec["draft_model"] = draft_model
    if skip_layers is not None:
        try:
            spec["skip_layers"] = [int(i) for i in skip_layers.split(",") if i.strip()]
        except ValueError:
            raise LeanfmError(f"--skip-layers takes comma-separated layer indices, got {skip_layers!r}") from None
    return spec


@app.command()
def chat(
    model: ModelOpt = "gemma-3-270m",
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
    max_tokens: int = 256,
    temperature: float = 0.7,
    top_k: int = 0,
    top_p: float = 0.95,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    threads: ThreadsOpt = 0,
    dtype: DtypeOpt = "float32",
    seed: SeedOpt = None,
    adapter: AdapterOpt = None,
) -> None:
    """Interactive multi-turn chat with the model's chat template. /reset clears, /exit or Ctrl-D quits."""
    from leanfm.engine.chat import ChatSession

    torch_dtype, _ = setup_torch(threads, dtype, seed)
    params = _sampling(max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, None)
    loaded = load_for_inference(model, torch_dtype, adapter, for_generation=True)
    session = ChatSession(loaded.model, loaded.tokenizer, params, system=system)
    interactive = sys.stdin.isatty()
    if interactive:
        typer.echo(f"leanfm chat with {model} — /reset clears the history, /exit quits", err=True)
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            session.reset()
            continue
        for piece in session.send(line):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()


@app.command()
def info(model: ModelOpt = "gemma-3-270m", dtype: DtypeOpt = "float32") -> None:
    """Architecture, parameters and bytes per component, FLOPs per token and KV-cache bytes."""
    from leanfm.checkpoint.inspect import read_config
    from leanfm.models.report import format_info

    setup_torch(0, dtype, None)
    config, source = read_config(model)
    measured, extra = None, None
    if Path(source).is_dir() and (Path(source) / "leanfm_compressed.json").is_file():
        from leanfm.checkpoint.artifact import describe

        measured, extra = describe(source)
    from leanfm.engine.config import EngineConfig

    chunk = EngineConfig.__dataclass_fields__["max_num_batched_tokens"].default
    typer.echo(format_info(config, DTYPES[dtype], source, measured=measured, engine_chunk=chunk))
    if extra:
        typer.echo(extra)


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="alias, .gguf file, HF directory or compressed artifact")],
    dst: Annotated[str, typer.Argument(help="output HF directory, or a .gguf file")],
    type_: Annotated[str | None, typer.Option("--type", help="GGUF tensor type: f32, f16, q8_0, q4_0 "
                                                             "(DST ending in .gguf) [default: f16]")] = None,
    dtype: DtypeOpt = "float32",
    overwrite: Annotated[bool, typer.Option(help="replace DST if it exists")] = False,
) -> None:
    """Convert a model into a Hugging Face directory transformers loads, or (DST.gguf) a GGUF llama.cpp loads.

    Compressed artifacts are written dequantized (their float weights, real layer count and widths).
    """
    from leanfm.checkpoint.gguf_export import GGUF_TYPES, dense_model, export_gguf
    from leanfm.checkpoint.hf import save_hf_dir
    from leanfm.checkpoint.loader import ALIASES, load_model

    to_gguf = dst.lower().endswith(".gguf")
    if type_ is not None and (not to_gguf or type_.lower() not in GGUF_TYPES):
        raise typer.BadParameter(f"{type_!r}: choose one of {', '.join(GGUF_TYPES)}, with a DST ending in .gguf",
                                 param_hint="--type")
    if to_gguf and Path(dst).exists() and not overwrite:
        raise LeanfmError(f"{dst} exists; choose another path or pass --overwrite")
    torch_dtype, _ = setup_torch(0, "float32" if to_gguf else dtype, None)
    loaded = load_model(src, dtype=torch_dtype, progress=True)
    model = loaded.model
    if to_gguf:
        source = loaded.gguf_path or (ALIASES[src].gguf_path() if src in ALIASES else None)
        out = export_gguf(model, loaded.tokenizer, dst, type_ or "f16", source_gguf=source, overwrite=overwrite)
    else:
        if any(hasattr(m, "form_spec") for m in model.modules()):
            model = dense_model(model).to(torch_dtype)
        out = save_hf_dir(model, dst, tokenizer=loaded.tokenizer, overwrite=overwrite)
    typer.echo(f"wrote {out}")


def _register_measure_commands() -> None:
    from leanfm.bench.commands import bench_cmd, eval_cmd, report_cmd
    from leanfm.cli_compress import compress_cmd
    from leanfm.cli_finetune import finetune_cmd

    app.command("compress", help=compress_cmd.__doc__)(compress_cmd)
    app.command("finetune", help=finetune_cmd.__doc__)(finetune_cmd)

    app.command("eval", help=eval_cmd.__doc__)(eval_cmd)
    app.command("bench", help=bench_cmd.__doc__)(bench_cmd)
    app.command("report", help=report_cmd.__doc__)(report_cmd)
    from leanfm.bench.tour import tour_cmd

    app.command("tour", help=tour_cmd.__doc__)(tour_cmd)
    from leanfm.cli_serve import serve_cmd

    app.command("serve", help=serve_cmd.__doc__)(serve_cmd)


_register_measure_commands()


# typer before 0.21 raises click's exceptions for usage errors; later typers raise their own
_USAGE_ERRORS = tuple(
    cls for cls in (getattr(typer, "TyperException", None), click.ClickException) if cls is not None
)


def main() -> None:
    try:
        app(standalone_mode=False)
    except LeanfmError as e:
        _fail(str(e))
    except FileExistsError as e:
        _fail(f"{e}; pass --overwrite to replace it")
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _fail("aborted", 130)
    except _USAGE_ERRORS as e:  # usage errors: bad option values, unknown commands
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        _fail(f"{message} (see leanfm --help)", getattr(e, "exit_code", 2))
    except Exception as e:
        if os.environ.get("LEANFM_DEBUG"):
            raise
        _fail(f"{type(e).__name__}: {e} (set LEANFM_DEBUG=1 for a traceback)")


def _fail(message: str, code: int = 1) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(code)


if __name__ == "__main__":
    main()
