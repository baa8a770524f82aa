"""The ``sherry`` command line: one verb per pipeline stage (quantize → pack → export → run → measure)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from sherry_export import errors
from sherry_export.arguments import (
    add_checkpoint_args,
    checked,
    group_size_arg,
    lazy_command,
    positive_int,
    thread_count,
    token_ids,
)

DESCRIPTION = """\
sherry-export: ternary LLMs (Sherry 1.25-bit, TL2 1.67-bit, I2_S 2-bit) from PyTorch to fast CPU
inference with ONNX and onnxruntime.

Start with `sherry demo`: it exports the shipped Sherry model (trained with Sherry + Arenas QAT) in
every format, times decode side by side and scores accuracy. Then `sherry export
sherry-qat-5m -o out` and `sherry generate out --prompt "Once upon a time"`.
"""


COMMANDS: dict[str, tuple[str, str]] = {
    # name: (the module whose register() adds the command's parser, its line in `sherry --help`)
    "setup": ("sherry_export.assets", "fetch SmolLM2, the zero-shot task data and the text corpora (once)"),
    "data": ("sherry_export.data", "fetch, clean and split the packaged text corpora (and optionally tokenize them)"),
    "train": (
        "sherry_export.train_config",
        "quantization-aware training (Sherry + Arenas, the dense-ternary baseline, or full precision)",
    ),
    "sizes": (__name__, "project a model to Sherry, pack it in every format, print sizes and errors"),
    "pack": (__name__, "pack a checkpoint's ternary weights into a packed model folder (what models/ ships)"),
    "export": (__name__, "export a causal LM to an ONNX decoder with a KV cache"),
    "generate": (__name__, "generate text with an exported model in onnxruntime"),
    "verify": (
        "sherry_export.verify",
        "check an export folder: weight checksums, manifest, onnx.checker, an onnxruntime session",
    ),
    "bench": ("sherry_export.bench", "benchmarks: kernels side by side, and large exports"),
    "compare": ("sherry_export.compare.cli", "size, speed and accuracy of one model in every format, side by side"),
    "demo": (
        "sherry_export.compare.cli",
        "the main job on the shipped model: sherry compare in a few minutes (what `make demo` runs)",
    ),
    "tune": ("tvm_schedules.tune", "tune the TVM kernels with MetaSchedule for a CPU target into a database"),
    "tvm-run": (
        "tvm_schedules.relax_run",
        "compile an export with TVM (Relax VM) and generate; optionally race onnxruntime",
    ),
}
"""Every command, and where its parser lives: only the module of the command being run is imported,
so `sherry --help` and `sherry CMD --help` answer without loading PyTorch or onnxruntime."""


class CommandTable(argparse._SubParsersAction):
    """Subcommands whose one-line help comes from :data:`COMMANDS`, so each line is written once."""

    def add_parser(self, name: str, **kwargs):  # type: ignore[override]
        kwargs.setdefault("help", COMMANDS[name][1])
        return super().add_parser(name, **kwargs)


def cmd_sizes(args: argparse.Namespace) -> int:
    from sherry_export.models import load_causal_lm, load_tokenizer
    from sherry_export.report import capture_linear_inputs, error_rows, markdown_table, pack_model_layers, size_rows

    model, source = load_causal_lm(args.model)
    layers = pack_model_layers(model, args.group_size)
    weights = sum(layer.weight.numel() for layer in layers)
    gs = "per channel" if args.group_size is None else args.group_size
    print(f"\n{source.label}: {len(layers)} linear layers, {weights / 1e6:.1f}M weights, group size {gs}\n")
    print(
        markdown_table(
            ["format", "code bits/weight", "bits/weight incl. scales", "MB", "x smaller than fp16"], size_rows(layers)
        )
    )
    tokenizer = load_tokenizer(source)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    sample = [layer.name for layer in layers[: args.layers]]
    inputs = capture_linear_inputs(model, ids, sample)
    print(
        f"\nMatmul error on the activations of {ids.shape[1]} prompt tokens (relative Frobenius norm vs the "
        "original weight; int8 = the kernels' numerics):\n"
    )
    print(
        markdown_table(
            ["layer", "ternary (float)", "ternary (int8 acts)", "int8 vs float", "formats agree"],
            error_rows([layer for layer in layers if layer.name in inputs], inputs),
        )
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from sherry_export.export import ExportOptions, export_llm
    from sherry_export.export.sizes import split_rows
    from sherry_export.provenance import post_training_warning
    from sherry_export.report import markdown_table

    errors.output_folder(args.output, create=False)  # refuse a bad -o before loading the model
    options = ExportOptions(
        format=args.format,
        group_size=args.group_size,
        lm_head=args.lm_head,
        embedding=args.embedding,
        projection=args.projection,
    )
    result = export_llm(
        args.source, args.output, options, group_size_explicit=args.group_size_given, progress=True, qat=args.qat
    )
    print(f"\nexported {args.source} as {args.format} ({result.provenance}) to {result.out_dir}\n")
    if warning := post_training_warning(result.provenance, args.format, str(result.out_dir)):
        print(warning, file=sys.stderr)
    print(markdown_table(["file", "MB"], [[f.name, f.stat().st_size / 1e6] for f in result.files]))
    print(f"\nweights by part (embedding {result.options.embedding}, LM head {result.options.lm_head}):\n")
    print(markdown_table(["part", "MB", "share"], split_rows(result.size_split)))
    print(f"\nrun it: sherry generate {result.out_dir} --prompt 'Once upon a time'")
    return 0


ENGINE_NAMES = {"genai": "onnxruntime-genai", "sherry": "sherry runner"}
"""``sherry generate --engine`` choices (:mod:`sherry_export.genai`), and how the summary line names them."""


def cmd_generate(args: argparse.Namespace) -> int:
    from sherry_export.genai import open_generator
    from sherry_export.models import ModelSource, load_tokenizer
    from sherry_export.provenance import post_training_warning
    from sherry_export.verify import MANIFEST_FILE, read_manifest

    model_path = args.model_dir / "model.onnx"
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path} not found; make one with `sherry export SOURCE -o {args.model_dir}`")
    if args.prompt_ids is None and args.prompt is None:
        raise ValueError("give --prompt TEXT (or --prompt-ids 1,2,3)")
    tokenizer = load_tokenizer(ModelSource(args.model_dir))  # also for the output of --prompt-ids
    if args.prompt_ids is None and tokenizer is None:
        raise ValueError(f"{args.model_dir} has no tokenizer (a random-weight shape export); pass --prompt-ids")
    lm, engine = open_generator(
        args.model_dir, args.engine, threads=args.threads, kernel=args.kernel, verify=not args.no_verify
    )
    manifest = read_manifest(args.model_dir) if (args.model_dir / MANIFEST_FILE).is_file() else {}
    fmt = manifest.get("options", {}).get("format", "")
    if warning := post_training_warning(manifest.get("provenance", ""), fmt, str(args.model_dir)):
        print(warning, file=sys.stderr)
    if args.prompt_ids is not None:
        ids = args.prompt_ids
    elif args.chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False).input_ids
    else:
        ids = tokenizer(args.prompt).input_ids
    if not ids:
        raise ValueError(f"--prompt {args.prompt!r} gives no tokens; give some text")
    if max(ids) >= lm.vocab_size or min(ids) < 0:
        raise ValueError(f"prompt token ids must lie in [0, {lm.vocab_size})")
    lm.check_length(len(ids) + args.max_new_tokens - 1)
    generated: list[int] = []
    shown = ""

    def stream(token: int) -> None:
        nonlocal shown
        generated.append(token)
        if tokenizer is None:
            print(f" {token}", end="", flush=True)
            return
        text = tokenizer.decode(generated, skip_special_tokens=True)
        print(text[len(shown) :], end="", flush=True)
        shown = text

    print(args.prompt if args.prompt and not args.chat and args.prompt_ids is None else "", end="", flush=True)
    stop = {tokenizer.eos_token_id} if tokenizer is not None and tokenizer.eos_token_id is not None else set()
    result = lm.generate(
        ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_tokens=stop,
        on_token=stream,
    )
    print(
        f"\n\nprefill: {result.prompt_tokens} tokens, {result.prefill_tokens_per_second:.1f} tokens/s; "
        f"decode: {len(result.tokens)} tokens, {result.decode_tokens_per_second:.1f} tokens/s "
        f"({args.threads} thread{'s' if args.threads > 1 else ''}, {ENGINE_NAMES[engine]})",
        file=sys.stderr,
    )
    return 0


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``sherry`` parser with the full parsers of ``commands`` (None: all of them); every other
    command is listed by its one-line help only, so its module is not imported."""
    parser = argparse.ArgumentParser(
        prog="sherry", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.register("action", "parsers", CommandTable)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = list(COMMANDS) if commands is None else [c for c in commands if c in COMMANDS]
    for module in dict.fromkeys(COMMANDS[name][0] for name in wanted):
        importlib.import_module(module).register(sub)
    for name in COMMANDS:
        if name not in sub.choices:
            sub.add_parser(name, add_help=False)
    return parser


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``sherry sizes``, ``sherry pack``, ``sherry export`` and ``sherry generate``."""
    from sherry_export.formats import EMBEDDINGS, EXPORT_FORMATS, FORMATS, FP32, LM_HEADS, REFERENCE_FORMAT
    from sherry_export.runtime import KERNEL_PATHS
    from sherry_export.ternary import PROJECTION_NAMES

    sizes = sub.add_parser(
        "sizes",
        description="Project every attention/MLP projection of MODEL to Sherry's 3:4 ternary "
        f"values, pack the same values in each format ({', '.join(FORMATS)}), and print the size "
        "table and the reference matmul error on real activations.",
    )
    sizes.add_argument(
        "model",
        nargs="?",
        default="smollm2",
        help="'smollm2' (packaged SmolLM2-135M), a .gguf file, or a Hugging Face folder (default: smollm2)",
    )
    sizes.add_argument(
        "--group-size",
        type=group_size_arg,
        default=128,
        help="weights per scale group along K, a multiple of 4, or 'channel' (default: 128)",
    )
    sizes.add_argument(
        "--prompt",
        default="The capital of France is Paris. The Eiffel Tower was built in 1889.",
        help="text whose activations the error table uses",
    )
    sizes.add_argument(
        "--layers", type=positive_int, default=7, help="how many layers the error table shows (default: 7)"
    )
    sizes.set_defaults(func=cmd_sizes)

    projection_help = (
        "post-training rule for float layers: sherry (3:4) or absmean (dense, not for --format sherry) (default: "
        "sherry)"
    )
    packer = sub.add_parser(
        "pack",
        description="Pack SOURCE into OUT_DIR: config.json (with the sherry_packed record of how the weights were "
        "made), weights.safetensors (each projection's packed codes and float16 scales, embeddings in float16) "
        "and the tokenizer; the folder the shipped models are, which `sherry export` and `sherry compare` take. "
        "A trained checkpoint packs its trained ternary weights; a float model is projected post-training first "
        "(quantize_ with PTQConfig), which destroys a pretrained LLM, and the record says so.",
        epilog="examples:\n  sherry pack runs/arenas -o models/sherry-qat-5m --format sherry\n"
        "  sherry pack angelslim-ckpt --qat sherry --group-size 128 -o out/angelslim-packed --format tl2\n"
        "  sherry pack smollm2 -o out/smollm2-packed --format i2s   (post-training: sizes and speed only)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    packer.add_argument(
        "source",
        help="a `sherry train` run folder, a packed folder (shipped or not), 'smollm2', a .gguf file, or a Hugging "
        "Face Llama-family folder",
    )
    packer.add_argument("-o", "--output", required=True, type=Path, help="output folder (created if missing)")
    packer.add_argument("--format", required=True, choices=FORMATS, help="how the projections are packed")
    add_checkpoint_args(packer)
    packer.add_argument("--projection", default="sherry", choices=PROJECTION_NAMES, help=projection_help)
    packer.set_defaults(func=lazy_command("sherry_export.pack", "cmd_pack"))

    export = sub.add_parser(
        "export",
        description="Export SOURCE to OUT_DIR: model.onnx with the packed weights in the chosen format, the "
        "tokenizer, genai_config.json (onnxruntime-genai) and sherry_export.json. Linear layers of a "
        "quantization-aware checkpoint keep their trained ternary weights (a folder of latent float weights, "
        "like AngelSlim's, needs --qat); plain float layers are projected post-training, which destroys a "
        "pretrained LLM (the manifest's provenance says which).",
        epilog="examples:\n  sherry export sherry-qat-5m -o out/ship\n"
        "  sherry export angelslim-ckpt --qat sherry --group-size 128 -o out/angelslim-sherry\n"
        "  sherry export smollm2 -o out/smollm2-sherry --format sherry   (post-training: sizes and speed only)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument(
        "source",
        help="a shipped model (sherry-qat-5m, ...), 'smollm2', a .gguf file, or a Hugging Face "
        "Llama-family folder",
    )
    export.add_argument("-o", "--output", required=True, type=Path, help="output folder (created if missing)")
    export.add_argument(
        "--format",
        default=REFERENCE_FORMAT,
        choices=EXPORT_FORMATS,
        help="weight format of the attention/MLP projections (default: %(default)s)",
    )
    add_checkpoint_args(export)
    export.add_argument(
        "--lm-head",
        default=FP32,
        choices=LM_HEADS,
        help="LM head precision, kept the same across formats for fair comparisons: fp32, onnxruntime's "
        "MatMulNBits at 8 or 4 bits, or int8 (our Int8MatMul, 8 bits with float16 scales) (default: %(default)s)",
    )
    export.add_argument(
        "--embedding",
        default="auto",
        choices=EMBEDDINGS,
        help="input embedding precision; nbits8/nbits4/int8 use onnxruntime's GatherBlockQuantized. auto: a tied "
        "embedding (tie_word_embeddings) takes the LM head's precision and shares its one stored table, "
        "an untied one stays fp32 (default: auto)",
    )
    export.add_argument("--projection", default="sherry", choices=PROJECTION_NAMES, help=projection_help)
    export.set_defaults(func=cmd_export)

    generate = sub.add_parser(
        "generate",
        description="Greedy or sampled generation with a KV cache, streaming the text and printing prefill "
        "and decode tokens/s. The engine is onnxruntime-genai, which runs the export folder as it is (its "
        "genai_config.json registers the folder's ai.sherry op library and decodes in one shared KV buffer); "
        "where genai cannot load the folder, sherry's own onnxruntime runner generates, with a note that says "
        "why.",
        epilog="example: sherry generate out/smollm2-sherry --prompt 'The capital of France'",
    )
    generate.add_argument("model_dir", type=Path, help="a folder written by `sherry export`")
    generate.add_argument("--prompt", help="the prompt text")
    generate.add_argument(
        "--prompt-ids",
        type=token_ids,
        help="the prompt as token ids, e.g. 1,450,3681 (for exports without a tokenizer, like random-weight shapes)",
    )
    generate.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate (default: 64)")
    sampling = {
        "--temperature": (float, errors.check_temperature, 0.0, "0: greedy (default), else sampling"),
        "--top-k": (int, errors.check_top_k, 0, "sample among the k most likely tokens (default: 0, all)"),
        "--top-p": (float, errors.check_top_p, 1.0, "nucleus sampling mass in (0, 1] (default: 1.0)"),
    }
    for flag, (parse, check, default, text) in sampling.items():
        generate.add_argument(flag, type=checked(parse, check), default=default, help=text)
    generate.add_argument("--seed", type=checked(int, errors.check_seed), default=0, help="sampling seed (default: 0)")
    generate.add_argument("--threads", type=thread_count, default=2, help="onnxruntime intra-op threads (default: 2)")
    generate.add_argument(
        "--kernel",
        choices=KERNEL_PATHS,
        default=None,
        help="force a kernel path of the ai.sherry ops (default: the best the CPU has)",
    )
    generate.add_argument(
        "--engine",
        choices=ENGINE_NAMES,
        help="genai: onnxruntime-genai, an error if it cannot load the folder; sherry: sherry's own onnxruntime "
        "runner (what sherry compare and bench time). Default: genai where it loads the folder, else sherry (with a "
        "note that says why), and sherry while SHERRY_OPS_LIBRARY names another build of the op library. "
        "Greedy tokens are the same; sampling draws differ",
    )
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument(
        "--no-verify",
        action="store_true",
        help="skip checking the weight files against the checksums recorded at export (sherry_export.json)",
    )
    generate.set_defaults(func=cmd_generate)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; bad input (files, flags, environment) is one line on stderr and exit status 2.

    Loaders of user input raise :class:`sherry_export.errors.InputError` (a ValueError) naming the file
    or setting; OSError covers what the standard library says about paths. Anything else is a bug and
    keeps its traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser([command] if command else []).parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as error:  # InputError is a ValueError
        print(f"sherry {args.command}: error: {errors.one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
