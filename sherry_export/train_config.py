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

if TYPE_CHECKING:
    from sherry_export.qat import QATConfig

QUANT_METHODS = ("sherry", "ternary", "none")
LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``sherry train`` can set; :meth:`validate` rejects bad values with a reason."""

    init: str = "scratch"
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int | None = None
    intermediate: int | None = None
    vocab: int = 8192
    quant: str = "sherry"
    group_size: int | str | None = None
    arenas: bool | None = None
    lambda_max: float = 1.0
    warmup_ratio: float = 0.1
    lr: float | None = None
    lr_schedule: str = "cosine"
    lr_warmup_ratio: float = 0.02
    weight_decay: float = 0.0
    steps: int = 200
    batch: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    bf16: bool = False
    compile: bool = False
    threads: int | None = None
    data: str = "corpora"
    eval_every: int = 0
    eval_batches: int = 16
    diagnostics: bool = False
    """Log the gradient effective rank and the ternary pattern-flip rates at every evaluation
    (:mod:`sherry_export.diagnostics`)."""
    log_every: int = 10
    save_every: int = 100
    save_limit: int = 2
    output: Path = Path("runs/qat")
    resume: str | None = None
    seed: int = 0
    cache: Path | None = None
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
        """Arenas defaults on for Sherry (the paper's recipe) and off for the dense-ternary baseline."""
        return self.quant == "sherry" if self.arenas is None else self.arenas

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


def _group_size(text: str) -> int | str:
    if text in ("channel", "tensor"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, 'channel' or 'tensor', got {text}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sherry train`` to the command line."""
    from sherry_export.arguments import lazy_command, positive_int, thread_count

    defaults = TrainConfig()
    parser = subparsers.add_parser(
        "train",
        description="Train a Llama-family model with Sherry or dense-ternary QAT through the Hugging Face "
        "Trainer. Launch with torchrun or accelerate launch for DDP/FSDP. Example: "
        "`sherry train --init scratch --hidden 256 --layers 4 --steps 200 --output runs/s256`.",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--init", default=defaults.init, help="'scratch', 'smollm2', a .gguf file or an HF folder")
    model.add_argument("--hidden", type=positive_int, default=defaults.hidden, help="scratch: hidden size")
    model.add_argument("--layers", type=positive_int, default=defaults.layers, help="scratch: decoder layers")
    model.add_argument("--heads", type=positive_int, default=defaults.heads, help="scratch: attention heads")
    model.add_argument("--kv-heads", type=positive_int, help="scratch: key/value heads (default: --heads)")
    model.add_argument("--intermediate", type=positive_int, help="scratch: FFN width (default: 8/3·hidden, to 128)")
    model.add_argument("--vocab", type=positive_int, default=defaults.vocab, help="scratch: BPE vocabulary size")
    quant = parser.add_argument_group("quantization")
    quant.add_argument("--quant", choices=QUANT_METHODS, default=defaults.quant, help="QAT method (default: sherry)")
    quant.add_argument(
        "--group-size",
        type=_group_size,
        default=defaults.group_size,
        help="scale group along K: a number, 'channel' (sherry) or 'tensor' (ternary); default 128 / tensor",
    )
    quant.add_argument(
        "--arenas",
        action=argparse.BooleanOptionalAction,
        help="Arenas residual λ·x·Wᵀ during training (default: on for sherry, off for ternary)",
    )
    quant.add_argument("--lambda-max", type=float, default=defaults.lambda_max, help="Arenas peak λ (default: 1)")
    quant.add_argument(
        "--warmup-ratio", type=float, default=defaults.warmup_ratio, help="Arenas λ warm-up share of the steps"
    )
    optim = parser.add_argument_group("optimization")
    optim.add_argument("--lr", type=float, help="peak learning rate (default: 1e-3 scratch, 1e-4 pretrained)")
    optim.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=defaults.lr_schedule)
    optim.add_argument("--lr-warmup-ratio", type=float, default=defaults.lr_warmup_ratio)
    optim.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    optim.add_argument("--steps", type=positive_int, default=defaults.steps, help="optimizer steps")
    optim.add_argument("--batch", type=positive_int, default=defaults.batch, help="sequences per micro-batch")
    optim.add_argument("--seq-len", type=positive_int, default=defaults.seq_len)
    optim.add_argument("--grad-accum", type=positive_int, default=defaults.grad_accum)
    optim.add_argument("--seed", type=int, default=defaults.seed)
    speed = parser.add_argument_group("speed")
    speed.add_argument("--bf16", action="store_true", help="bf16 autocast (AMX/AVX-512 BF16 on CPU)")
    speed.add_argument("--compile", action="store_true", help="torch.compile the model")
    speed.add_argument("--threads", type=thread_count, help="intra-op threads (default: torch's)")
    io = parser.add_argument_group("data and checkpoints")
    io.add_argument("--data", default=defaults.data, help="'corpora' (run `sherry data` first) or a text file")
    io.add_argument("--cache", type=Path, help="cache folder (default: $SHERRY_CACHE or ~/.cache/sherry-export)")
    io.add_argument("--output", type=Path, default=defaults.output, help=f"run folder (default: {defaults.output})")
    io.add_argument("--resume", nargs="?", const="last", help="resume from CHECKPOINT, or alone: the latest one")
    io.add_argument("--log-every", type=positive_int, default=defaults.log_every)
    io.add_argument("--save-every", type=positive_int, default=defaults.save_every)
    io.add_argument("--save-limit", type=positive_int, default=defaults.save_limit, help="checkpoints kept")
    io.add_argument("--eval-every", type=int, default=defaults.eval_every, help="held-out loss every N steps (0: no)")
    io.add_argument("--eval-batches", type=positive_int, default=defaults.eval_batches)
    io.add_argument(
        "--diagnostics",
        action="store_true",
        help="at every evaluation also log the effective rank of the loss gradient at each layer's input and the "
        "fraction of 3:4 patterns (zero positions) and ternary values that changed: the paper's trapping metrics",
    )
    parser.set_defaults(func=lazy_command("sherry_export.train", "cmd_train"))

