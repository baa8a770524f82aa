"""``sherry pack``: a source checkpoint to a packed model folder, the pack stage's artifact.

The folder (``config.json`` with the ``sherry_packed`` record, ``weights.safetensors``, the tokenizer;
:mod:`sherry_export.packed_model`, docs/formats.md) is what the shipped models are and what
``sherry export`` and ``sherry compare`` take. Every kind of source packs (:mod:`sherry_export.provenance`):

- a trained checkpoint (``sherry train``, AngelSlim's latent weights with ``--qat``, a packed folder)
  packs its own ternary weights at the group size it was trained with, and the record keeps the recipe
  (``trained_with``): its exports read "quantization-aware (packed checkpoint)";
- a float model is quantized first, ``quantize_(model, PTQConfig(projection, group_size))``, and the
  record says so (``projected_with``): its exports read "post-training projection".

Packing a packed folder again in its own format reproduces it byte for byte.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from sherry_export.errors import output_folder
from sherry_export.formats import get_format
from sherry_export.models import load_causal_lm, load_tokenizer, resolve_source
from sherry_export.packed_model import PACKED_KEY, read_config, save_packed_model
from sherry_export.provenance import packed_provenance, post_training_warning, prepare_checkpoint
from sherry_export.qat import PTQConfig, quantize_


@dataclass(frozen=True)
class PackResult:
    out_dir: Path
    files: list[Path]
    format: str
    provenance: str
    """The label the folder's exports carry (``sherry_export.provenance``)."""


def pack_checkpoint(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    format: str,
    group_size: int | None = 128,
    group_size_explicit: bool = False,
    qat: str | None = None,
    projection: str = "sherry",
) -> PackResult:
    """Load ``source`` (anything ``sherry export`` takes), make its projections ternary and write the
    packed folder ``out_dir`` in ``format`` (a key of :data:`~sherry_export.formats.FORMATS`).

    ``group_size``/``group_size_explicit``/``qat`` are ``--group-size``, whether it was given, and
    ``--qat``, as for :func:`~sherry_export.provenance.prepare_checkpoint`; ``projection`` and
    ``group_size`` project a float source (:class:`~sherry_export.qat.PTQConfig`).
    """
    get_format(format)
    PTQConfig(projection)  # an unknown projection is an error before the model loads
    out = output_folder(out_dir, create=False)
    folder = resolve_source(source).folder
    if (folder / "config.json").is_file() and out.exists() and out.resolve() == folder.resolve():
        raise ValueError(f"the output folder {out} is the source's own folder; pack into another folder")
    model, src = load_causal_lm(source)
    prepared = prepare_checkpoint(model, qat, group_size, group_size_explicit, label=src.label)
    if not prepared.provenance.holds_ternary:
        quantize_(model, PTQConfig(projection, prepared.group_size))
    out = save_packed_model(model, output_folder(out), format, load_tokenizer(src))
    files = sorted(path for path in out.iterdir() if path.is_file())
    provenance = packed_provenance(read_config(out)[PACKED_KEY]).label(format)
    return PackResult(out, files, format, provenance)


def cmd_pack(args: argparse.Namespace) -> int:
    from sherry_export.report import markdown_table

    result = pack_checkpoint(
        args.source,
        args.output,
        args.format,
        group_size=args.group_size,
        group_size_explicit=args.group_size_given,
        qat=args.qat,
        projection=args.projection,
    )
    print(f"\npacked {args.source} as {result.format} ({result.provenance}) to {result.out_dir}\n")
    if warning := post_training_warning(result.provenance, result.format, str(result.out_dir)):
        print(warning, file=sys.stderr)
    print(markdown_table(["file", "MB"], [[f.name, f.stat().st_size / 1e6] for f in result.files]))
    print(f"\nexport it: sherry export {result.out_dir} -o OUT_DIR --format {result.format}")
    return 0
