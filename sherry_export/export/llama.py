"""Llama-family causal LMs to a lean ONNX decoder with a KV cache, built node by node.

The graph uses onnxruntime's fused ops: ``GroupQueryAttention`` (rotary embedding inside, past and
present KV), ``RMSNormalization`` (opset 23) and ``SkipSimplifiedLayerNormalization`` (RMSNorm with
the residual add fused). Q/K/V become one fused projection, and so do gate/up, so a decode step is
4 matmul ops per layer plus the LM head. One graph serves prefill and decode.

Graph inputs follow onnxruntime-genai's names: ``input_ids [batch, sequence]``,
``attention_mask [batch, total_sequence]``, ``past_key_values.{i}.key|value
[batch, kv_heads, past_sequence, head_dim]``; outputs ``logits [batch, sequence, vocab]`` and
``present.{i}.key|value``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir
import torch
from transformers import PreTrainedModel

from sherry_export.export.graph import FLOAT, INT32, INT64, MS_DOMAIN, GraphBuilder
from sherry_export.export.projections import (
    NBitsWeight,
    Projection,
    emit_projection,
    gather_nbits,
    nbits_matmul,
    nbits_weight,
    quantize_float_nbits,
)
from sherry_export.formats import (
    EMBEDDINGS,
    EXPORT_FORMATS,
    FORMATS,
    FP32,
    HEAD_FORMATS,
    LM_HEADS,
    REFERENCE_FORMAT,
    get_format,
    pack,
    quantize_int8,
)
from sherry_export.models import SUPPORTED_ARCHITECTURES
from sherry_export.onnx_ops import SHERRY_DOMAIN
from sherry_export.qat import PTQConfig, quantized_linear
from sherry_export.quant import Ternary, dequantize_ternary
from sherry_export.ternary import PROJECTION_NAMES
from sherry_export.verify import MAX_POSITIONS_KEY

LM_HEAD_BLOCK = 32
"""Block size when the LM head or the embedding is quantized: small blocks, because the head's error goes
straight into the logits; one block size for both, so a tied table is stored once."""
EMBED_NODE = "embed"
LM_HEAD_NODE = "lm_head"
"""Node names of the embedding lookup and the LM head (``sherry_export.export.sizes`` reads them)."""


@dataclass(frozen=True)
class ExportOptions:
    format: str = REFERENCE_FORMAT
    group_size: int | None = 128
    lm_head: str = FP32
    embedding: str = "auto"
    """Precision of the input embedding table; see ``EMBEDDINGS``."""
    projection: str = "sherry"
    """How plain float linears become ternary (post-training), when the model was not trained ternary."""

    def __post_init__(self) -> None:
        if self.format not in EXPORT_FORMATS:
            raise ValueError(f"unknown format {self.format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
        if self.lm_head not in LM_HEADS:
            raise ValueError(f"unknown LM head {self.lm_head!r}; choose one of {', '.join(LM_HEADS)}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"unknown embedding {self.embedding!r}; choose one of {', '.join(EMBEDDINGS)}")
        if self.projection not in PROJECTION_NAMES:
            raise ValueError(f"unknown projection {self.projection!r}; choose one of {', '.join(PROJECTION_NAMES)}")

    @property
    def uses_op_library(self) -> bool:
        """Whether the graph has ``ai.sherry`` nodes: ternary projections, or an LM head in one of our formats."""
        return self.format in FORMATS or self.lm_head in HEAD_FORMATS


def _numpy(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to(torch.float32).cpu().numpy()


def linear_projection(module: torch.nn.Module, options: ExportOptions) -> Projection:
    """The weight of one linear layer as the chosen format needs it.

    A ternary module (one with ``ternary()`` and ``group_size``: QAT, packed, or ``quantize_``d with
    ``PTQConfig``) gives its own ternary weights; a plain ``nn.Linear`` is projected post-training by
    ``quantize_``'s own module for ``PTQConfig(options.projection, options.group_size)``, made for this
    layer alone so the caller's model stays float (``sherry compare`` exports it to fp32 too).
    """
    bias = _numpy(getattr(module, "bias", None))
    if not hasattr(module, "ternary"):
        if options.format == FP32:
            return Projection(weight=_numpy(module.weight), bias=bias)
        module = quantized_linear(module, PTQConfig(options.projection, options.group_size))
    ternary, group_size = module.ternary(), module.group_size
    if options.format == FP32:
        return Projection(weight=dequantize_ternary(ternary, group_size).numpy(), bias=bias)
    return Projection(
        ternary=Ternary(*(t.detach().cpu() for t in ternary)),
        group_size=group_size or ternary.values.shape[1],
        bias=bias,
    )


def fuse(projections: list[Projection]) -> Projection:
    """Stack projections that read the same input along N (rows are packed independently)."""
    first = projections[0]
    if any(p.group_size != first.group_size for p in projections):
        raise ValueError("fused projections must share one group size")
    biases = [p.bias for p in projections]
    bias = (
        None
        if all(b is None for b in biases)
        else np.concatenate(
            [
                b
                if b is not None
                else np.zeros(len(p.weight if p.weight is not None else p.ternary.values), np.float32)
                for b, p in zip(biases, projections, strict=True)
            ]
        )
    )
    if first.ternary is None:
        return Projection(weight=np.concatenate([p.weight for p in projections]), bias=bias)
    values = torch.cat([p.ternary.values for p in projections])
    scales = torch.cat([p.ternary.scales for p in projections])
    return Projection(ternary=Ternary(values, scales), group_size=first.group_size, bias=bias)


def rotary_caches(model: PreTrainedModel) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin ``[max_positions, head_dim/2]`` from the model's own rotary module (rope scaling included)."""
    rotary = model.model.rotary_emb
    positions = torch.arange(model.config.max_position_embeddings, dtype=torch.float32)
    angles = torch.outer(positions, rotary.inv_freq.to(torch.float32))
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    return (torch.cos(angles) * scaling).numpy(), (torch.sin(angles) * scaling).numpy()


def check_architecture(model: PreTrainedModel) -> None:
    name = type(model).__name__
    if name not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"cannot export {name}: supported architectures are {', '.join(SUPPORTED_ARCHITECTURES)}")
    config = model.config
    if getattr(config, "use_sliding_window", False):
        raise ValueError("cannot export sliding-window attention yet; set use_sliding_window=False if it is unused")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"cannot export hidden_act={config.hidden_act!r}: the graph implements SiLU-gated MLPs")


def build_decoder(model: PreTrainedModel, options: ExportOptions, progress: bool = False) -> ir.Model:
    """The decoder of a Llama-family model in ``options.format``, to be written with ``graph.save_model``.

    Its float tables and norms are the model's own memory, not copies: a change to the model's weights
    before the decoder is saved is saved too.
    """
    from tqdm import tqdm

    check_architecture(model)
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    eps = float(config.rms_norm_eps)
    b = GraphBuilder("sherry_decoder")

    input_ids = b.add_input("input_ids", INT64, ["batch", "sequence"])
    mask = b.add_input("attention_mask", INT64, ["batch", "total_sequence"])
    kv_shape = ["batch", kv_heads, "past_sequence", head_dim]
    present_shape = ["batch", kv_heads, "total_sequence", head_dim]

    # GroupQueryAttention wants int32 lengths: seqlens_k = tokens so far - 1, and the total length.
    seqlens = b.op(
        "Cast",
        b.op("Sub", b.op("ReduceSum", mask, b.constant("axis1", [1]), keepdims=0), b.constant("one", [1])),
        to=INT32,
        name="seqlens_k",
    )
    total = b.op(
        "Cast",
        b.op("Gather", b.op("Shape", mask), b.constant("index1", [1]), axis=0),
        to=INT32,
        name="total_sequence_length",
    )
    cos, sin = rotary_caches(model)
    cos_value, sin_value = b.initializer("cos_cache", cos), b.initializer("sin_cache", sin)
    b.metadata[MAX_POSITIONS_KEY] = str(cos.shape[0])

    tied = tied_embedding(model)
    options = resolve_embedding(options, tied)
    shared = tied and options.embedding == options.lm_head
    embed = _numpy(model.model.embed_tokens.weight)
    embed_table = store_table(b, "embed_tokens", embed, options.embedding, gather_only=not shared)
    hidden = emit_embedding(b, input_ids, embed_table)
    layers = model.model.layers
    normed = b.op(
        "RMSNormalization",
        hidden,
        b.initializer("layers.0.input_norm", _numpy(layers[0].input_layernorm.weight)),
        axis=-1,
        epsilon=eps,
        name="layers.0.input_norm",
    )
    residual = hidden
    for i, layer in enumerate(tqdm(layers, desc=f"export {options.format}", unit="layer", disable=not progress)):
        attn, mlp = layer.self_attn, layer.mlp
        qkv = emit_projection(
            b,
            normed,
            f"layers.{i}.qkv_proj",
            fuse([linear_projection(m, options) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]),
            options.format,
        )
        past_k = b.add_input(f"past_key_values.{i}.key", FLOAT, kv_shape)
        past_v = b.add_input(f"past_key_values.{i}.value", FLOAT, kv_shape)
        present = [f"present.{i}.key", f"present.{i}.value"]
        attn_out, *present_values = b.node(
            "GroupQueryAttention",
            [qkv, None, None, past_k, past_v, seqlens, total, cos_value, sin_value],
            [f"layers.{i}.attn/out", *present],
            domain=MS_DOMAIN,
            name=f"layers.{i}.attn",
            num_heads=heads,
            kv_num_heads=kv_heads,
            do_rotary=1,
            rotary_interleaved=0,
            scale=float(head_dim**-0.5),
        )
        for value, name in zip(present_values, present, strict=True):
            b.add_output(value, name, FLOAT, present_shape)
        o = emit_projection(b, attn_out, f"layers.{i}.o_proj", linear_projection(attn.o_proj, options), options.format)
        normed, _, _, residual = b.node(
            "SkipSimplifiedLayerNormalization",
            [o, residual, b.initializer(f"layers.{i}.post_norm", _numpy(layer.post_attention_layernorm.weight))],
            [f"layers.{i}.post_norm/out", "", "", f"layers.{i}.post_norm/sum"],
            domain=MS_DOMAIN,
            name=f"layers.{i}.post_norm",
            epsilon=eps,
        )
        gate_up = emit_projection(
            b,
            normed,
            f"layers.{i}.gate_up_proj",
            fuse([linear_projection(m, options) for m in (mlp.gate_proj, mlp.up_proj)]),
            options.format,
        )
        gate, up = b.node(
            "Split",
            [gate_up, b.constant(f"layers.{i}.split", [config.intermediate_size] * 2)],
            2,
            name=f"layers.{i}.split",
            axis=-1,
        )
        act = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up, name=f"layers.{i}.swiglu")
        down = emit_projection(
            b, act, f"layers.{i}.down_proj", linear_projection(mlp.down_proj, options), options.format
        )
        last = i + 1 == len(layers)
        gamma = model.model.norm.weight if last else layers[i + 1].input_layernorm.weight
        norm_name = "final_norm" if last else f"layers.{i + 1}.input_norm"
        normed, _, _, residual = b.node(
            "SkipSimplifiedLayerNormalization",
            [down, residual, b.initializer(norm_name, _numpy(gamma))],
            [f"{norm_name}/out", "", "", f"{norm_name}/sum"],
            domain=MS_DOMAIN,
            name=norm_name,
            epsilon=eps,
        )
    head_table = embed_table if shared else store_table(b, "lm_head", _numpy(model.lm_head.weight), options.lm_head)
    logits = emit_lm_head(b, normed, head_table)
    b.add_output(logits, "logits", FLOAT, ["batch", "sequence", config.vocab_size])
    return b.model()


def tied_embedding(model: PreTrainedModel) -> bool:
    """Whether the LM head is the input embedding's table, one tensor (``tie_word_embeddings``, as in SmolLM2)."""
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    return embed is head or (embed.shape == head.shape and embed.data_ptr() == head.data_ptr())


def resolve_embedding(options: ExportOptions, tied: bool) -> ExportOptions:
    """``options`` with ``embedding="auto"`` made concrete: the head's precision when tied, else fp32."""
    if options.embedding != "auto":
        return options
    return replace(options, embedding=options.lm_head if tied else FP32)


@dataclass(frozen=True)
class PackedTable:
    """A ``[V, H]`` table in one of our head formats (``HEAD_FORMATS``): its codes ``B [V, H]`` (uint8, w + 128)
    and float16 ``scales [V, blocks]``, which ``Int8MatMul`` and ``GatherBlockQuantized`` (8 bits, its default
    zero point 128) both read as they are."""

    format: str
    b: ir.Value
    scales: ir.Value
    n: int
    k: int
    group_size: int


Table = ir.Value | NBitsWeight | PackedTable
"""A ``[vocab, hidden]`` table in the graph: a float32 initializer, a block-quantized MatMulNBits weight, or one
in our int8 format."""


def store_table(b: GraphBuilder, name: str, weight: np.ndarray, kind: str, gather_only: bool = False) -> Table:
    """Store ``weight [V, H]`` once, in float32 or block-quantized (``LM_HEAD_BLOCK``); the embedding lookup and
    the LM head both read this form, so a tied table serves both (``gather_only``: no matmul reads it)."""
    if kind == FP32:
        return b.initializer(f"{name}.weight", weight)
    if kind in HEAD_FORMATS:
        packed = pack(kind, quantize_int8(weight, LM_HEAD_BLOCK), LM_HEAD_BLOCK)
        return PackedTable(
            kind,
            b.initializer(f"{name}.B", packed.data),
            b.initializer(f"{name}.scales", packed.scales),
            packed.n,
            packed.k,
            packed.group_size,
        )
    bits = int(kind.removeprefix("nbits"))
    q, scales = quantize_float_nbits(weight, bits, LM_HEAD_BLOCK)
    return nbits_weight(b, name, q, scales, bits, LM_HEAD_BLOCK, gather_only=gather_only)


def emit_embedding(b: GraphBuilder, ids: ir.Value, table: Table) -> ir.Value:
    """Rows ``ids`` of the table: ``Gather`` on float32, ``GatherBlockQuantized`` on the quantized bytes.

    An int8 table's rows come out of ``GatherBlockQuantized`` in float16 (the type of its scales) and are cast
    to float32: each value is the float16 rounding of (w·α), 2^-11 relative, far below the 8-bit step.
    """
    if isinstance(table, NBitsWeight):
        return gather_nbits(b, ids, EMBED_NODE, table)
    if isinstance(table, PackedTable):
        rows = b.op(
            "GatherBlockQuantized",
            table.b,
            ids,
            table.scales,
            domain=MS_DOMAIN,
            name=EMBED_NODE,
            gather_axis=0,
            quantize_axis=1,
            block_size=table.group_size,
            bits=8,
        )
        return b.op("Cast", rows, to=FLOAT, name=f"{EMBED_NODE}.float")
    return b.op("Gather", table, ids, name=EMBED_NODE)


def emit_lm_head(b: GraphBuilder, x: ir.Value, table: Table) -> ir.Value:
    """The LM head ``logits = x @ W.T`` on the ``[V, H]`` table as stored; identical across projection formats
    so comparisons stay fair.

    Float32 uses ``FusedMatMul`` with ``transB=1`` on the table itself rather than a transposed copy, so a
    tied table is stored once: onnxruntime packs the transposed weight once at load, as it does for a
    plain ``MatMul`` (equal decode time, measured in docs/export.md), and no node copies it per step.
    """
    if isinstance(table, NBitsWeight):
        return nbits_matmul(b, x, LM_HEAD_NODE, table)
    if isinstance(table, PackedTable):
        return b.op(
            get_format(table.format).op_type,
            x,
            table.b,
            table.scales,
            domain=SHERRY_DOMAIN,
            name=LM_HEAD_NODE,
            K=table.k,
            N=table.n,
            group_size=table.group_size,
        )
    return b.op("FusedMatMul", x, table, domain=MS_DOMAIN, name=LM_HEAD_NODE, transB=1)


def model_ternaries(model: PreTrainedModel, options: ExportOptions) -> dict[str, tuple[Ternary, int]]:
    """The ternary weights and group size each projection is exported with (for reference models)."""
    from sherry_export.quant import quantizable_linears

    ternaries = {}
    for name, module in quantizable_linears(model).items():
        proj = linear_projection(
            module, replace(options, format=REFERENCE_FORMAT if options.format == FP32 else options.format)
        )
        ternaries[name] = (proj.ternary, proj.group_size)
    return ternaries
