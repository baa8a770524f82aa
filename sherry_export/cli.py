"""The ``sherry`` command line: one verb per pipeline stage (quantize → pack → export → run → measure)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

DESCRIPTION = """\
sherry-export: ternary LLMs (Sherry 1.25-bit, TL2 1.67-bit, I2_S 2-bit) from PyTorch to fast CPU
inference with ONNX and onnxruntime.

Start with `sherry sizes smollm2`: it projects SmolLM2-135M's linear layers to Sherry, packs them in
every format, and prints bits per weight, file sizes and the matmul error on real activations.
"""


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("no token ids given")
    return ids


def group_size_arg(text: str) -> int | None:
    """``--group-size`` accepts a positive multiple of 4, or ``channel`` for one scale per row."""
    if text == "channel":
        return None
    value = positive_int(text)
    if value % 4:
        raise argparse.ArgumentTypeError(f"must be a multiple of 4 (a Sherry block) or 'channel', got {text}")
    return value


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
    from sherry_export.report import markdown_table

    options = ExportOptions(
        format=args.format,
        group_size=args.group_size,
        lm_head=args.lm_head,
        embedding=args.embedding,
        projection=args.projection,
    )
    result = export_llm(args.source, args.output, options, group_size_explicit=args.group_size_given, progress=True)
    print(f"\nexported {args.source} as {args.format} ({result.provenance}) to {result.out_dir}\n")
    print(markdown_table(["file", "MB"], [[f.name, f.stat().st_size / 1e6] for f in result.files]))
    print(f"\nweights by part (embedding {result.options.embedding}, LM head {result.options.lm_head}):\n")
    print(markdown_table(["part", "MB", "share"], split_rows(result.size_split)))
    print(f"\nrun it: sherry generate {result.out_dir} --prompt 'Once upon a time'")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from sherry_export.generate import OnnxCausalLM

    model_path = args.model_dir / "model.onnx"
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path} not found; make one with `sherry export SOURCE -o {args.model_dir}`")
    has_tokenizer = (args.model_dir / "tokenizer_config.json").is_file()
    if args.prompt_ids is None and not has_tokenizer:
        raise ValueError(f"{args.model_dir} has no tokenizer (a random-weight shape export); pass --prompt-ids")
    if args.prompt_ids is None and args.prompt is None:
        raise ValueError("give --prompt TEXT (or --prompt-ids 1,2,3)")
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir) if has_tokenizer else None
    lm = OnnxCausalLM(model_path, threads=args.threads, kernel=args.kernel)
    if args.prompt_ids is not None:
        ids = args.prompt_ids
    elif args.chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False).input_ids
    else:
        ids = tokenizer(args.prompt).input_ids
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
        f"({args.threads} thread{'s' if args.threads > 1 else ''})",
        file=sys.stderr,
    )
    return 0


class GroupSizeAction(argparse.Action):
    """Stores the group size and remembers that the user gave one (to detect a clash with the checkpoint)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.group_size_given = True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sherry", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sizes = sub.add_parser(
        "sizes",
        help="project a model to Sherry, pack it in every format, print sizes and errors",
        description="Project every attention/MLP projection of MODEL to Sherry's 3:4 ternary "
        "values, pack the same values as sherry, tl2 and i2s, and print the size "
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

    from sherry_export.export.llama import EMBEDDINGS, LM_HEADS, PROJECTIONS
    from sherry_export.export.projections import EXPORT_FORMATS
    from sherry_export.runtime import KERNEL_PATHS

    export = sub.add_parser(
        "export",
        help="export a causal LM to an ONNX decoder with a KV cache",
        description="Export SOURCE to OUT_DIR: model.onnx with the packed weights in the chosen format, the "
        "tokenizer, genai_config.json (onnxruntime-genai) and sherry_export.json. Linear layers of a "
        "quantization-aware checkpoint keep their trained ternary weights; plain float layers are "
        "projected post-training, which costs accuracy (the manifest says which).",
        epilog="example: sherry export smollm2 -o out/smollm2-sherry --format sherry",
    )
    export.add_argument("source", help="'smollm2', a .gguf file, or a Hugging Face Llama-family folder")
    export.add_argument("-o", "--output", required=True, type=Path, help="output folder (created if missing)")
    export.add_argument(
        "--format",
        default="sherry",
        choices=EXPORT_FORMATS,
        help="weight format of the attention/MLP projections (default: sherry)",
    )
    export.add_argument(
        "--group-size",
        type=group_size_arg,
        default=128,
        action=GroupSizeAction,
        help="scale group size for post-training projection; a checkpoint's config wins (default: 128)",
    )
    export.add_argument(
        "--lm-head",
        default="fp32",
        choices=LM_HEADS,
        help="LM head precision, kept the same across formats for fair comparisons (default: fp32)",
    )
    export.add_argument(
        "--embedding",
        default="auto",
        choices=EMBEDDINGS,
        help="input embedding precision; nbits8/nbits4 use onnxruntime's GatherBlockQuantized. auto: a tied "
        "embedding (tie_word_embeddings) takes the LM head's precision and shares its one stored table, "
        "an untied one stays fp32 (default: auto)",
    )
    export.add_argument(
        "--projection",
        default="sherry",
        choices=list(PROJECTIONS),
        help="post-training rule for float layers: sherry (3:4) or absmean (dense, not for "
        "--format sherry) (default: sherry)",
    )
    export.set_defaults(func=cmd_export, group_size_given=False)

    generate = sub.add_parser(
        "generate",
        help="generate text with an exported model in onnxruntime",
        description="Greedy or sampled generation with a KV cache in plain onnxruntime, "
        "streaming the text and printing prefill and decode tokens/s.",
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
    generate.add_argument("--temperature", type=float, default=0.0, help="0 for greedy (default), else sampling")
    generate.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    generate.add_argument("--threads", type=positive_int, default=2, help="onnxruntime intra-op threads (default: 2)")
    generate.add_argument(
        "--kernel",
        choices=KERNEL_PATHS,
        default=None,
        help="force a kernel path of the ai.sherry ops (default: the best the CPU has)",
    )
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.set_defaults(func=cmd_generate)
    from sherry_export import bench, compare, data, train

    data.register(sub)
    train.register(sub)
    bench.register(sub)
    compare.register(sub)
    from tvm_schedules import relax_run, tune

    tune.register(sub)
    relax_run.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"sherry {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
