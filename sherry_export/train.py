"""Quantization-aware training with the Hugging Face ``Trainer``: ``sherry train``.

The Trainer brings what a research run needs without code of ours: progress bars, logging,
checkpoints with optimizer/scheduler/RNG state (``--resume``), bf16 autocast, ``torch.compile``, and
DDP/FSDP when the same command is launched by ``torchrun`` or ``accelerate launch``. What is ours:

* the model: from scratch (``--init scratch --hidden … --layers …``) or a pretrained source
  (``--init smollm2``), then :func:`sherry_export.qat.quantize_` (``--quant sherry|ternary|none``);
* :class:`ArenasCallback`, which sets the shared Arenas λ from the optimizer step (so gradient
  accumulation and resuming do not shift it) and logs it;
* checks that turn bad hyper-parameters and corrupt or mismatched checkpoints into clear errors
  before any work starts (the Trainer would load a mismatched checkpoint with a warning only).

Checkpoints hold latent full-precision weights under the plain model's parameter names, and
``config.json`` records the QAT recipe under ``sherry_qat`` (:func:`sherry_export.qat.load_qat_model`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint

from sherry_export.arguments import from_options
from sherry_export.qat import CONFIG_KEY, ArenasSchedule, arenas_schedule, quantize_
from sherry_export.train_config import TrainConfig

__all__ = ["TrainConfig", "check_checkpoint", "run", "train"]

LOG_HISTORY_FILE = "log_history.json"
"""Written into the run folder at the end: every logged loss, λ, evaluation and diagnostic, by step."""

def scratch_model(cfg: TrainConfig, vocab_size: int, eos_id: int | None = None) -> LlamaForCausalLM:
    """A randomly initialised Llama of ``cfg``'s shape, tied embeddings like SmolLM2.

    The default FFN width is 8/3·hidden rounded up to a multiple of 128, so its rows fill whole
    scale groups of 128.
    """
    intermediate = cfg.intermediate or 128 * math.ceil(8 * cfg.hidden / 3 / 128)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden,
        intermediate_size=intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads or cfg.heads,
        max_position_embeddings=cfg.seq_len,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def pretrained_model(source: str) -> tuple[PreTrainedModel, Any]:
    """A pretrained model and its tokenizer (``None`` if the source has none), rebuilt as a plain, saveable model.

    ``save_pretrained`` refuses models loaded from GGUF, so the weights move into a fresh model built
    from the same config without its ``quantization_config``.
    """
    from sherry_export.models import load_causal_lm, load_tokenizer

    loaded, src = load_causal_lm(source)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    model = type(loaded)(type(loaded.config).from_dict(config_dict))
    model.load_state_dict(loaded.state_dict())
    return model, load_tokenizer(src)


class TokenBlocks(torch.utils.data.Dataset):
    """Consecutive, non-overlapping windows of ``seq_len`` tokens of one stream; labels = inputs (the model
    shifts them). Documents are already separated by EOS in the stream, so windows cross documents as in
    AngelSlim's packing, without its padding."""

    def __init__(self, tokens: np.ndarray, seq_len: int, limit: int | None = None) -> None:
        self.tokens, self.seq_len = tokens, seq_len
        self.count = len(tokens) // seq_len if limit is None else min(limit, len(tokens) // seq_len)
        if self.count == 0:
            raise ValueError(f"{len(tokens)} tokens are too few for one sequence of {seq_len}; lower --seq-len")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = index * self.seq_len
        ids = torch.from_numpy(np.asarray(self.tokens[start : start + self.seq_len], dtype=np.int64))
        return {"input_ids": ids, "labels": ids}


class ArenasCallback(TrainerCallback):
    """Drives the model's shared Arenas schedule from the Trainer's optimizer-step count and logs λ.

    Before optimizer step k (1-based) runs, λ is set to λ(k), so all micro-batches of a gradient
    accumulation cycle share it; a resumed run picks up at its saved global step.
    """

    def __init__(self, schedule: ArenasSchedule) -> None:
        self.schedule = schedule

    def on_train_begin(self, args, state, control, **kwargs):
        self.schedule.start(state.max_steps)

    def on_step_begin(self, args, state, control, **kwargs):
        self.schedule.step = state.global_step + 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            # The Trainer appended this log to state.log_history before calling back: keep λ there too.
            logs["arenas_lambda"] = state.log_history[-1]["arenas_lambda"] = self.schedule.value


class ThroughputCallback(TrainerCallback):
    """Logs training tokens per second (all processes together) over each logging interval."""

    def __init__(self, tokens_per_step: int) -> None:
        self.tokens_per_step = tokens_per_step
        self.mark: tuple[float, int] = (time.perf_counter(), 0)

    def on_train_begin(self, args, state, control, **kwargs):
        self.mark = (time.perf_counter(), state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        now, (then, step) = time.perf_counter(), self.mark
        if state.global_step > step:
            logs["tokens_per_s"] = state.log_history[-1]["tokens_per_s"] = round(
                self.tokens_per_step * (state.global_step - step) / (now - then)
            )
        self.mark = (now, state.global_step)


def _safetensors_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes in a checkpoint's safetensors file(s), read from the headers (no tensor data)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else None
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"checkpoint index {index} is unreadable: {error}") from error
    files = files or ["model.safetensors"]
    shapes = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise ValueError(f"checkpoint {folder} has no {name}; it is incomplete or not a training checkpoint")
        try:
            with safe_open(path, framework="pt") as handle:
                shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})  # noqa: SIM118
        except Exception as error:  # safetensors raises its own error types for truncated or garbled files
            raise ValueError(f"checkpoint weights {path} are unreadable (truncated or corrupt?): {error}") from error
    return shapes


def check_checkpoint(folder: Path, model: torch.nn.Module) -> None:
    """Make sure ``folder`` is a complete checkpoint of exactly this model and recipe, or explain why not.

    The Trainer itself loads weights non-strictly (missing keys are a warning) and fails late, deep in
    ``load_state_dict``, on shape mismatches; this checks the architecture, the QAT recipe, every
    tensor's name and shape, and that the optimizer state and trainer state are readable.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint {folder} does not exist")
    try:
        saved = json.loads((folder / "config.json").read_text())
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"checkpoint {folder} lacks a readable config.json/trainer_state.json: {error}") from error
    config = model.config.to_dict()
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", CONFIG_KEY):
        if saved.get(key) != config.get(key):
            raise ValueError(
                f"checkpoint {folder} was trained with {key}={saved.get(key)!r}, this run has {config.get(key)!r}; "
                "resume with the same model and quantization flags"
            )
    shapes = _safetensors_shapes(folder)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(expected.keys() - shapes.keys() - tied)
    unexpected = sorted(shapes.keys() - expected.keys())
    wrong = sorted(key for key in expected.keys() & shapes.keys() if expected[key] != shapes[key])
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise ValueError(f"checkpoint {folder} does not match the model ({detail})")
    optimizer = folder / "optimizer.pt"
    try:
        torch.load(optimizer, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises RuntimeError/EOFError/pickle errors for damaged files
        raise ValueError(f"optimizer state {optimizer} is unreadable (truncated or corrupt?): {error}") from error


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from: ``--resume`` alone means the latest under the output folder."""
    if cfg.resume is None:
        if cfg.output.is_dir() and get_last_checkpoint(str(cfg.output)):
            raise ValueError(f"{cfg.output} already holds checkpoints; pass --resume or choose another --output")
        return None
    if cfg.resume == "last":
        last = get_last_checkpoint(str(cfg.output)) if cfg.output.is_dir() else None
        if last is None:
            raise FileNotFoundError(f"no checkpoint-* folder in {cfg.output} to resume from")
        return Path(last)
    return Path(cfg.resume)


def training_arguments(cfg: TrainConfig) -> TrainingArguments:
    """The Trainer's settings for ``cfg``."""
    has_eval = cfg.eval_every > 0
    cpu = not torch.cuda.is_available()  # accelerate runs CPU DDP (gloo) only when told it is on CPU
    arguments = dict(
        use_cpu=cpu,
        dataloader_pin_memory=not cpu,
        output_dir=str(cfg.output),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch,
        per_device_eval_batch_size=cfg.batch,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_schedule,
        warmup_steps=cfg.lr_warmup_ratio,  # a float < 1 is a ratio of max_steps
        weight_decay=cfg.weight_decay,
        bf16=cfg.bf16,
        torch_compile=cfg.compile,
        logging_steps=cfg.log_every,
        save_steps=cfg.save_every,
        save_total_limit=cfg.save_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_every if has_eval else None,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
    )
    arguments.update(cfg.extra_args)
    return TrainingArguments(**arguments)


def train(
    cfg: TrainConfig,
    model: PreTrainedModel,
    streams: dict[str, np.ndarray],
    resume_from: Path | None = None,
) -> Trainer:
    """Train an already built (and quantized, or not) ``model`` on token ``streams`` (``train``, optionally
    ``heldout``). Returns the Trainer, whose ``state.log_history`` has the losses and λ."""
    args = training_arguments(cfg)
    eval_set = None
    if cfg.eval_every and "heldout" in streams:
        eval_set = TokenBlocks(streams["heldout"], cfg.seq_len, limit=cfg.eval_batches * cfg.batch)
    callbacks: list[TrainerCallback] = [ThroughputCallback(cfg.batch * cfg.grad_accum * cfg.seq_len * args.world_size)]
    schedule = arenas_schedule(model)
    if schedule is not None:
        callbacks.insert(0, ArenasCallback(schedule))
    if cfg.diagnostics:
        from sherry_export.diagnostics import DiagnosticsCallback

        probe = TokenBlocks(streams.get("heldout", streams["train"]), cfg.seq_len, limit=cfg.batch)
        callbacks.append(DiagnosticsCallback(model, torch.stack([probe[i]["input_ids"] for i in range(len(probe))])))
    if resume_from is not None:
        check_checkpoint(resume_from, model)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=TokenBlocks(streams["train"], cfg.seq_len),
        eval_dataset=eval_set,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    return trainer


def prepare(cfg: TrainConfig) -> tuple[PreTrainedModel, Any, dict[str, np.ndarray]]:
    """Tokenizer, token streams and the (quantized) model for ``cfg``."""
    from sherry_export import data

    root = cfg.cache or data.cache_dir()
    text_file = None if cfg.data == "corpora" else Path(cfg.data)
    if text_file is not None and not text_file.is_file():
        raise FileNotFoundError(f"--data {cfg.data!r}: give 'corpora' (after `sherry data`) or a text file")
    if cfg.init == "scratch":
        tokenizer = data.bpe_tokenizer(cfg.vocab, root, text_file)
        model = scratch_model(cfg, len(tokenizer), data.separator_id(tokenizer))
    else:
        model, tokenizer = pretrained_model(cfg.init)
        if tokenizer is None:
            raise ValueError(f"--init {cfg.init!r} has no tokenizer to turn the training text into its token ids")
        if cfg.seq_len > model.config.max_position_embeddings:
            raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's {model.config.max_position_embeddings}")
    streams = data.text_file_tokens(text_file, tokenizer) if text_file else data.corpus_tokens(tokenizer, root)
    if cfg.quant != "none":
        quantize_(model, cfg.qat_config())
    return model, tokenizer, streams


def run(cfg: TrainConfig) -> Trainer:
    """``sherry train``: validate, prepare, train, save the final model and tokenizer to ``cfg.output``."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    resume_from = resolve_resume(cfg)
    with training_arguments(cfg).main_process_first(desc="data preparation"):
        model, tokenizer, streams = prepare(cfg)
    trainer = train(cfg, model, streams, resume_from)
    trainer.save_model(str(cfg.output))
    if trainer.is_world_process_zero():
        (cfg.output / LOG_HISTORY_FILE).write_text(json.dumps(trainer.state.log_history, indent=1))
        tokenizer.save_pretrained(str(cfg.output))
        recipe_text = json.dumps(getattr(model.config, CONFIG_KEY, None))
        print(f"saved {cfg.output} (latent weights; recipe {recipe_text})")
    return trainer


def end_distributed() -> None:
    """Leave the process group a distributed run (torchrun) started, once every rank is done.

    A process that exits with its gloo group alive can abort in the group's worker threads at
    interpreter exit ("terminate called without an active exception", SIGABRT) after all its work
    is saved; the barrier keeps a fast rank from tearing the group down under a slow one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def cmd_train(args: argparse.Namespace) -> int:
    """``sherry train``: the settings from the command line, then :func:`run`."""
    trainer = run(from_options(TrainConfig, args))
    final = [entry for entry in trainer.state.log_history if "train_runtime" in entry]
    if final and trainer.is_world_process_zero():
        print(f"train loss {final[-1].get('train_loss', float('nan')):.4f} in {final[-1]['train_runtime']:.1f} s")
    end_distributed()
    return 0
