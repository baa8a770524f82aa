"""What ``sherry train`` can set (:class:`TrainConfig`) and its command line.

Light on purpose (the training machinery in :mod:`sherry_export.train` loads PyTorch and
transformers), so ``sherry train --help`` answers at once.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sherry_export.arguments import add_options, lazy_command, option, positive_int, thread_count

if TYPE_CHECKING:
    from sherry_export.qat import QATConfig

QUANT_METHODS = ("sherry", "ternary", "none")
LR_SCHEDULES = ("constant", "cosine", "linear")


def _group_size(text: str) -> int | str:
    if text in ("channel", "tensor"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, 'channel' or 'tensor', got {text}") from None


MODEL, QUANT, OPTIM, SPEED, IO = "model", "quantization", "optimization", "speed", "data and checkpoints"
"""The groups of ``sherry train --help``."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``sherry train`` can set; :meth:`validate` rejects bad values with a reason.

    Each field declared with :func:`~sherry_export.arguments.option` is the command-line option of its name
    (``kv_heads`` is ``--kv-heads``), with its default, type and help written once, here.
    """

    init: str = option("scratch", group=MODEL, help="'scratch', 'smollm2', a .gguf file or an HF folder")
    hidden: int = option(256, group=MODEL, type=positive_int, help="scratch: hidden size (default: %(default)s)")
    layers: int = option(4, group=MODEL, type=positive_int, help="scratch: decoder layers (default: %(default)s)")
    heads: int = option(4, group=MODEL, type=positive_int, help="scratch: attention heads (default: %(default)s)")
    kv_heads: int | None = option(
        None, group=MODEL, type=positive_int, help="scratch: key/value heads (default: --heads)"
    )
    intermediate: int | None = option(
        None, group=MODEL, type=positive_int, help="scratch: FFN width (default: 8/3·hidden, to 128)"
    )
    vocab: int = option(
        8192, group=MODEL, type=positive_int, help="scratch: BPE vocabulary size (default: %(default)s)"
    )
    quant: str = option("sherry", group=QUANT, choices=QUANT_METHODS, help="QAT method (default: %(default)s)")
    group_size: int | str | None = option(
        None,
        group=QUANT,
        type=_group_size,
        help="scale group along K: a number, 'channel' (sherry) or 'tensor' (ternary); default 128 / tensor",
    )
    arenas: bool | None = option(
        None,
        group=QUANT,
        help="Arenas residual λ·x·Wᵀ during training (default: off; it did not help at this project's scale, "
        "docs/experiments.md; the paper uses it on LLaMA-3.2)",
    )
    lambda_max: float = option(1.0, group=QUANT, help="Arenas peak λ (default: %(default)s)")
    warmup_ratio: float = option(0.1, group=QUANT, help="Arenas λ warm-up share of the steps (default: %(default)s)")
    lr: float | None = option(None, group=OPTIM, help="peak learning rate (default: 1e-3 scratch, 1e-4 pretrained)")
    lr_schedule: str = option(
        "cosine", group=OPTIM, choices=LR_SCHEDULES, help="learning-rate schedule after warm-up (default: %(default)s)"
    )
    lr_warmup_ratio: float = option(
        0.02, group=OPTIM, help="learning-rate warm-up share of the steps (default: %(default)s)"
    )
    weight_decay: float = option(0.0, group=OPTIM, help="AdamW weight decay (default: %(default)s)")
    steps: int = option(200, group=OPTIM, type=positive_int, help="optimizer steps (default: %(default)s)")
    batch: int = option(8, group=OPTIM, type=positive_int, help="sequences per micro-batch (default: %(default)s)")
    seq_len: int = option(256, group=OPTIM, type=positive_int, help="tokens per sequence (default: %(default)s)")
    grad_accum: int = option(
        1, group=OPTIM, type=positive_int, help="micro-batches per optimizer step (default: %(default)s)"
    )
    seed: int = option(0, group=OPTIM, help="seed of the initialization and the data order (default: %(default)s)")
    bf16: bool = option(False, group=SPEED, help="bf16 autocast (AMX/AVX-512 BF16 on CPU)")
    compile: bool = option(False, group=SPEED, help="torch.compile the model")
    threads: int | None = option(None, group=SPEED, type=thread_count, help="intra-op threads (default: torch's)")
    data: str = option("corpora", group=IO, help="'corpora' (run `sherry data` first) or a text file")
    cache: Path | None = option(None, group=IO, help="cache folder (default: $SHERRY_CACHE or ~/.cache/sherry-export)")
    output: Path = option(Path("runs/qat"), group=IO, help="run folder (default: %(default)s)")
    resume: str | None = option(
        None, group=IO, nargs="?", const="last", help="resume from CHECKPOINT, or alone: the latest one"
    )
    log_every: int = option(10, group=IO, type=positive_int, help="log the loss every N steps (default: %(default)s)")
    save_every: int = option(
        100, group=IO, type=positive_int, help="save a checkpoint every N steps (default: %(default)s)"
    )
    save_limit: int = option(2, group=IO, type=positive_int, help="checkpoints kept (default: %(default)s)")
    eval_every: int = option(0, group=IO, help="held-out loss every N steps (0: no)")
    eval_batches: int = option(
        16, group=IO, type=positive_int, help="held-out batches per evaluation (default: %(default)s)"
    )
    diagnostics: bool = option(
        False,
        group=IO,
        help="at every evaluation also log the effective rank of the loss gradient at each layer's input and the "
        "fraction of 3:4 patterns (zero positions) and ternary values that changed: the paper's trapping metrics",
    )
    """Measured by :mod:`sherry_export.diagnostics` at every evaluation, so it needs ``eval_every``."""
    extra_args: dict[str, Any] = field(default_factory=dict)
    """More ``TrainingArguments`` (tests use it to, e.g., silence the progress bar)."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        if self.quant not in QUANT_METHODS:
            raise ValueError(f"unknown --quant {self.quant!r}; choose one of {', '.join(QUANT_METHODS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown --lr-schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        positive = ("hidden", "layers", "heads", "vocab", "steps", "batch", "seq_len", "grad_accum", "eval_batches")
        positive += ("log_every", "save_every", "save_limit")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("kv_heads", "intermediate", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: no evaluation), got {self.eval_every}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"learning rate must be a positive finite number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.lr_warmup_ratio < 1:
            raise ValueError(f"lr warm-up ratio must be in [0, 1), got {self.lr_warmup_ratio}")
        if self.init == "scratch":
            kv_heads = self.kv_heads or self.heads
            if self.hidden % self.heads or (self.hidden // self.heads) % 2:
                raise ValueError(f"hidden {self.hidden} must split into {self.heads} heads of even size (RoPE)")
            if self.heads % kv_heads:
                raise ValueError(f"heads {self.heads} must be a multiple of kv_heads {kv_heads}")
        if self.diagnostics and not self.eval_every:
            raise ValueError("--diagnostics are measured at every evaluation: give --eval-every N too")
        if self.quant == "none" and self.arenas:
            raise ValueError("--arenas needs a quantized model (--quant sherry or ternary)")
        if self.use_arenas:
            from sherry_export.qat import ArenasConfig, ArenasSchedule

            ArenasSchedule(ArenasConfig(self.lambda_max, self.warmup_ratio)).start(self.steps)
        if self.quant != "none":
            self.qat_config()

    @property
    def use_arenas(self) -> bool:
        """Arenas is off unless asked for: from scratch and from a pretrained model it matched or trailed plain
        Sherry QAT in our ablations (docs/experiments.md), though the paper trains LLaMA-3.2 with it."""
        return bool(self.arenas)

    def qat_config(self) -> QATConfig:
        """The ``quantize_`` recipe; ``group_size`` is a number, ``channel`` (Sherry), ``tensor`` (ternary) or
        ``None`` for the method's default (128 for Sherry, per tensor for BitNet)."""
        from sherry_export.qat import ArenasConfig, SherryConfig, TernaryConfig

        arenas = ArenasConfig(self.lambda_max, self.warmup_ratio) if self.use_arenas else None
        gs = self.group_size
        if self.quant == "sherry":
            if gs == "tensor":
                raise ValueError("Sherry scales are per group or per channel, not per tensor")
            return SherryConfig(128 if gs is None else None if gs == "channel" else gs, arenas)
        if self.quant == "ternary":
            if gs == "channel":
                raise ValueError("the ternary baseline's scales are per tensor or per group, not per channel")
            return TernaryConfig(None if gs in (None, "tensor") else gs, arenas)
        raise ValueError("--quant none has no QAT recipe")

    @property
    def learning_rate(self) -> float:
        """``--lr``, else 1e-3 from scratch and AngelSlim's 1e-4 when fine-tuning a pretrained model."""
        return self.lr if self.lr is not None else 1e-3 if self.init == "scratch" else 1e-4


# --- command line ---------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sherry train`` to the command line: the options are :class:`TrainConfig`'s fields."""
    parser = subparsers.add_parser(
        "train",
        description="Train a Llama-family model with Sherry or dense-ternary QAT through the Hugging Face "
        "Trainer. Launch with torchrun or accelerate launch for DDP/FSDP. Example: "
        "`sherry train --init scratch --hidden 256 --layers 4 --steps 200 --output runs/s256`.",
    )
    add_options(parser, TrainConfig)
    parser.set_defaults(func=lazy_command("sherry_export.train", "cmd_train"))
