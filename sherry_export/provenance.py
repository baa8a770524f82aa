"""What a source checkpoint is (its provenance) and which scale group size its ternary weights hold.

Sources reach the exporter (and ``sherry pack``) in six kinds (:class:`Provenance`), each with its label in
``sherry_export.json``:

- ``sherry-train``: ``config.json`` has ``sherry_qat`` (``sherry train``); the projections export their
  trained ternary. ``quantization-aware (sherry train checkpoint)``.
- ``latent``: ``--qat METHOD``, or ``quantization_config.quant_method`` is ``sherry``/``ternary``; the
  projections export METHOD's projection of the latent float weights, in every format, fp32 included.
  ``quantization-aware (latent weights, AngelSlim layout)``.
- ``packed``: ``config.json`` has ``sherry_packed``; the stored ternary. ``quantization-aware (packed
  checkpoint)`` when its record says how it was trained (``trained_with``), or ``packed checkpoint
  (training unrecorded)`` when the folder does not say how it was made.
- ``projected``: the projections hold a post-training projection of float weights: ``quantize_(model,
  PTQConfig(...))`` (``config.sherry_ptq``), or a packed folder whose record has ``projected_with``
  (``sherry pack`` of a float model). ``post-training projection`` in every format, fp32 included.
- ``trained``: an in-memory model whose projections have ``ternary()``. ``quantization-aware``.
- ``float``: anything else; exported as a post-training projection (the float weights in fp32).
  ``post-training projection``, or ``float weights`` for fp32.

AngelSlim (Sherry's training code) saves QAT checkpoints as a plain Hugging Face folder of latent float
weights (``save_format: fake``) with no marker and no group size, so only the command line can say what
such a folder is. Every label of a trained source starts with ``quantization-aware``
(:func:`is_quantization_aware`). :func:`prepare_checkpoint` is the one place that turns a loaded model
into what the exporters need; ``sherry export`` and ``sherry compare`` call it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

from torch import nn

from sherry_export.formats import FP32
from sherry_export.packed_model import PACKED_KEY, PROJECTED_WITH, TRAINED_WITH
from sherry_export.qat import (
    CONFIG_KEY,
    CONFIGS,
    PTQ_KEY,
    config_from_recipe,
    ptq_from_record,
    quantize_,
    requantize_from_config,
)
from sherry_export.quant import quantizable_linears
from sherry_export.ternary import QAT_METHODS

"""Values of ``--qat``: the rule a latent-weight checkpoint was trained with (``sherry``: 3:4 sparse
ternary; ``ternary``: BitNet b1.58's dense absmean ternary)."""
MARKER_KEY = "quantization_config"
"""A config key whose ``quant_method`` (one of :data:`QAT_METHODS`) marks a latent-weight checkpoint."""
GROUP_SIZE_KEYS = ("group_size", "w_group_size", "weight_group_size")

QUANTIZATION_AWARE = "quantization-aware"
SHERRY_TRAIN = f"{QUANTIZATION_AWARE} (sherry train checkpoint)"
LATENT = f"{QUANTIZATION_AWARE} (latent weights, AngelSlim layout)"
PACKED = f"{QUANTIZATION_AWARE} (packed checkpoint)"
PACKED_UNRECORDED = "packed checkpoint (training unrecorded)"
POST_TRAINING = "post-training projection"
FLOAT = "float weights"

ORIGIN_CHECKPOINT = "checkpoint"
ORIGIN_FLAG = "--group-size"
ORIGIN_ASSUMED = "assumed (the checkpoint does not record it)"
ORIGIN_DEFAULT = "default"
ORIGIN_OPTIONS = "export options"

Kind = Literal["sherry-train", "latent", "packed", "projected", "trained", "float"]


def post_training_warning(provenance: str, fmt: str, where: str) -> str | None:
    """The one line ``sherry export``, ``sherry pack`` and ``sherry generate`` print for weights projected
    to ternary from a float model without training; None for trained or float exports (a float model's
    fp32 export is labelled ``float weights``)."""
    if provenance != POST_TRAINING:
        return None
    return (
        f"note: {where} holds a post-training ternary projection of float weights ({fmt}): without quantization-aware "
        "training this destroys a pretrained LLM (text turns to 'some some the the'); train it with `sherry "
        "train`, or export a trained checkpoint (`--qat` for AngelSlim's latent weights)"
    )


def is_quantization_aware(provenance: str) -> bool:
    """Whether a provenance label names ternary weights that were trained (not projected after training)."""
    return provenance.startswith(QUANTIZATION_AWARE)


@dataclass(frozen=True)
class Provenance:
    """A source's kind and, when known, the QAT method (``sherry`` or ``ternary``) it was trained with
    (for ``projected``: the projection, ``sherry`` or ``absmean``)."""

    kind: Kind
    method: str | None = None

    def label(self, fmt: str) -> str:
        """The manifest's ``provenance`` for an export in ``fmt``."""
        if self.kind == "float":
            return FLOAT if fmt == FP32 else POST_TRAINING
        if self.kind == "projected":
            return POST_TRAINING
        if self.kind == "packed":
            return PACKED if self.method else PACKED_UNRECORDED
        return {"sherry-train": SHERRY_TRAIN, "latent": LATENT, "trained": QUANTIZATION_AWARE}[self.kind]

    @property
    def holds_ternary(self) -> bool:
        """Whether the projections carry (or, once prepared, will carry) their own ternary weights and
        group size: every kind but ``float``, whose ternary the export options decide."""
        return self.kind != "float"


def _marker_method(config: object) -> str | None:
    marker = getattr(config, MARKER_KEY, None)
    method = marker.get("quant_method") if isinstance(marker, dict) else getattr(marker, "quant_method", None)
    return method if method in QAT_METHODS else None


def _check_method(qat: str | None, recorded: str | None, what: str) -> str | None:
    if qat is not None and qat not in QAT_METHODS:
        raise ValueError(f"unknown QAT method {qat!r}; choose one of {', '.join(QAT_METHODS)}")
    if qat is not None and recorded is not None and qat != recorded:
        raise ValueError(f"--qat {qat} contradicts the checkpoint ({what} trained with {recorded}); drop --qat")
    return recorded or qat


def _projected(projection: str, qat: str | None, what: str) -> Provenance:
    if qat is not None:
        raise ValueError(
            f"--qat {qat} contradicts the checkpoint ({what} holds a post-training {projection} projection of "
            "float weights, not trained ones); drop --qat"
        )
    return Provenance("projected", projection)


def packed_provenance(record: dict, qat: str | None = None) -> Provenance:
    """What a packed folder's ``sherry_packed`` record says its weights are (``qat`` as in
    :func:`checkpoint_provenance`)."""
    if record.get(PROJECTED_WITH) is not None:
        return _projected(ptq_from_record(record[PROJECTED_WITH]).projection, qat, "a packed checkpoint")
    trained_with = record.get(TRAINED_WITH)
    recorded = config_from_recipe(trained_with).module_class.method if trained_with else None
    return Provenance("packed", _check_method(qat, recorded, "a packed checkpoint"))


def checkpoint_provenance(model: nn.Module, qat: str | None = None) -> Provenance:
    """What ``model`` (as loaded, before :func:`prepare_checkpoint`) is; ``qat`` is ``--qat``, the user's
    word that a folder holds latent weights trained with that method. A ``qat`` that contradicts what the
    checkpoint records is an error. Pure: ``model`` is not changed (``sherry pack`` can call it too)."""
    config = getattr(model, "config", None)
    packed = getattr(config, PACKED_KEY, None)
    if packed is not None:
        return packed_provenance(packed, qat)
    record = getattr(config, CONFIG_KEY, None)
    if record is not None:
        method = config_from_recipe(record).module_class.method
        return Provenance("sherry-train", _check_method(qat, method, "a `sherry train` checkpoint"))
    ptq = getattr(config, PTQ_KEY, None)
    if ptq is not None:
        return _projected(ptq_from_record(ptq).projection, qat, "the model")
    marker = _marker_method(config)
    if marker is not None or qat is not None:
        return Provenance("latent", _check_method(qat, marker, f"its {MARKER_KEY} says it was"))
    if any(hasattr(m, "ternary") for m in model.modules()):
        return Provenance("trained")
    return Provenance("float")


def config_group_size(config: object) -> int | None:
    """A Sherry group size recorded in a checkpoint's config (AngelSlim-style keys), if any."""
    for holder in (getattr(config, CONFIG_KEY, None), getattr(config, MARKER_KEY, None), config):
        if isinstance(holder, dict):
            found = next((holder[k] for k in GROUP_SIZE_KEYS if k in holder), None)
        else:
            found = next((getattr(holder, k) for k in GROUP_SIZE_KEYS if getattr(holder, k, None) is not None), None)
        if found is not None:
            return int(found)
    return None


def _clash(requested: int | None, recorded: object, whose: str = "config records") -> ValueError:
    shown = "channel" if requested is None else requested
    return ValueError(
        f"--group-size {shown} contradicts the checkpoint, whose {whose} group size {recorded}; "
        f"drop --group-size or pass --group-size {recorded}"
    )


def held_group_size(model: nn.Module) -> int | dict[str, int] | None:
    """The scale group size the ternary projections of ``model`` hold: one number, ``None`` when every
    layer has one group per row, or the per-layer sizes when they differ. Call it on a model whose
    projections have ``ternary()`` (a QAT or packed model)."""
    modules = {name: m for name, m in quantizable_linears(model).items() if hasattr(m, "ternary")}
    if not modules:
        raise ValueError(f"{type(model).__name__} has no ternary projections to read a group size from")
    declared = {m.group_size for m in modules.values()}
    if len(declared) == 1:
        return declared.pop()
    effective = {name: m.group_size or m.in_features for name, m in modules.items()}
    if all(size == modules[name].in_features for name, size in effective.items()):
        return None
    return effective


def check_held_group_size(model: nn.Module, requested: int | None) -> int | dict[str, int] | None:
    """:func:`held_group_size`, and an error when ``requested`` (an explicit ``--group-size``) is not it."""
    held = held_group_size(model)
    for module in quantizable_linears(model).values():
        k = module.in_features
        if hasattr(module, "ternary") and (requested or k) != (module.group_size or k):
            raise _clash(requested, "channel" if held is None else held, "weights hold")
    return held


def resolve_group_size(model: nn.Module, requested: int | None, explicit: bool) -> int | None:
    """The group size to project float weights with: the config's, unless the command line says otherwise.

    A command-line value that contradicts the checkpoint's config is an error, not a silent choice:
    projecting a Sherry checkpoint with another group size than it was trained with loses accuracy.
    """
    recorded = config_group_size(getattr(model, "config", None))
    if recorded is None:
        return requested
    if explicit and requested != recorded:
        raise _clash(requested, recorded)
    return recorded


def describe_group_size(group_size: int | None, method: str | None) -> str:
    """A group size in words: ``None`` is one scale per tensor for ``ternary`` (absmean) and per channel for Sherry."""
    if group_size is not None:
        return f"group size {group_size}"
    return "one scale per tensor" if method == "ternary" else "one scale per channel"


@dataclass(frozen=True)
class PreparedSource:
    """A loaded checkpoint made ready for export: what it is and the group size its ternary weights hold."""

    provenance: Provenance
    group_size: int | dict[str, int] | None
    """``None``: one scale group per row; a dict: per-layer sizes that differ (a packed checkpoint)."""
    group_size_origin: str

    @property
    def options_group_size(self) -> int | None:
        """The value for ``ExportOptions.group_size`` (per-layer sizes come from the modules themselves)."""
        return None if isinstance(self.group_size, dict) else self.group_size


def prepare_checkpoint(
    model: nn.Module, qat: str | None, requested: int | None, explicit: bool, label: str = "the checkpoint"
) -> PreparedSource:
    """Decide what ``model`` is (:func:`checkpoint_provenance`), give its projections the ternary weights
    they export, and settle the group size. Changes ``model`` in place:

    - a ``sherry train`` checkpoint gets its QAT modules back (its recorded recipe);
    - a latent-weight checkpoint gets METHOD's QAT modules at the group size its config records, else
      ``--group-size``, else METHOD's default, said on stderr in one line (a group size the checkpoint
      was not trained with costs accuracy without any other sign);
    - a model ``quantize_``d with ``PTQConfig`` (or a checkpoint of one, ``sherry_ptq``) gets its
      projection back;
    - a packed checkpoint keeps its stored ternary.

    For every trained kind the checkpoint's group size wins, and an explicit ``--group-size`` that
    contradicts it is an error. ``requested``/``explicit``: ``--group-size`` and whether it was given.
    """
    provenance = checkpoint_provenance(model, qat)
    swapped = any(hasattr(m, "ternary") for m in quantizable_linears(model).values())
    if provenance.kind in ("sherry-train", "projected") and not swapped:
        requantize_from_config(model)  # a packed folder records no recipe: its modules hold the ternary
    if provenance.kind == "latent":
        recorded = config_group_size(getattr(model, "config", None))
        recipe = CONFIGS[provenance.method]
        if recorded is not None:
            if explicit and requested != recorded:
                raise _clash(requested, recorded)
            group_size, origin = recorded, ORIGIN_CHECKPOINT
        elif explicit:
            group_size, origin = requested, ORIGIN_FLAG
        else:
            group_size, origin = recipe().group_size, ORIGIN_ASSUMED
            print(
                f"sherry: assuming {describe_group_size(group_size, provenance.method)} for the latent "
                f"{provenance.method} weights of {label}, which does not record the group size it was trained "
                "with; pass --group-size N (or channel) if it was trained with another",
                file=sys.stderr,
            )
        quantize_(model, recipe(group_size=group_size))
        return PreparedSource(provenance, group_size, origin)
    if provenance.holds_ternary:
        held = check_held_group_size(model, requested) if explicit else held_group_size(model)
        return PreparedSource(provenance, held, ORIGIN_CHECKPOINT)
    group_size = resolve_group_size(model, requested, explicit)
    recorded = config_group_size(getattr(model, "config", None)) is not None
    origin = ORIGIN_CHECKPOINT if recorded else ORIGIN_FLAG if explicit else ORIGIN_DEFAULT
    return PreparedSource(provenance, group_size, origin)


def manifest_group_size(group_size: int | dict[str, int] | None) -> int | str | dict[str, int]:
    """How ``sherry_export.json`` writes a group size: a number, ``"channel"`` (one group per row), or per layer."""
    return "channel" if group_size is None else group_size
