"""AngelSlim checkpoints: a plain Hugging Face Llama folder of *latent* float weights trained through
Sherry's projection (AngelSlim's ``save_format: fake``), with no marker and no group size.

The fixture trains a tiny 2-layer Llama quantization-aware (Sherry, group 64 or 128) on a task that
needs attention (continue a period-2 pattern ``a b a b …``), then saves only the latent weights with
``save_pretrained``, as AngelSlim does. Exported with ``--qat sherry``, every format, fp32 included,
must be the model AngelSlim evaluates: the latent weights through AngelSlim's fake quantization in a
PyTorch forward, written out here from AngelSlim's ``NMQuant`` rule independently of the package.
"""

import json

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from sherry_export.cli import build_parser, main
from sherry_export.compare.run import CompareConfig, export_all
from sherry_export.export import ExportOptions
from sherry_export.export.llm import MANIFEST_FILE, export_llm
from sherry_export.export.projections import EXPORT_FORMATS
from sherry_export.generate import OnnxCausalLM
from sherry_export.models import load_causal_lm, tiny_llama
from sherry_export.provenance import LATENT, POST_TRAINING, prepare_checkpoint
from sherry_export.qat import SherryConfig, quantize_

SHAPE = dict(seed=0, hidden_size=128, intermediate_size=256)
"""K = 128 and 256: group 64 and group 128 give different scales."""
VOCAB = 256
PROMPT = [17, 200, 17]


def patterns(generator: torch.Generator, n: int, length: int) -> torch.Tensor:
    """``n`` rows ``a b a b …`` of ``length`` tokens with random ``a``, ``b``: the next token is the one two back."""
    pairs = torch.randint(0, VOCAB, (n, 2), generator=generator)
    return pairs.repeat(1, length // 2)


def train_latent_checkpoint(folder, group_size: int) -> None:
    """Sherry QAT (straight-through, as AngelSlim trains), then the latent weights alone in a plain folder."""
    model = tiny_llama(**SHAPE)
    quantize_(model, SherryConfig(group_size=group_size))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(group_size)
    for _ in range(120):
        ids = patterns(generator, 16, 16)
        logits = model(ids).logits[:, 1:-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 2:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5, f"the fixture did not learn its task (loss {loss.item():.2f})"
    plain = tiny_llama(**SHAPE)  # AngelSlim's layout: an ordinary LlamaForCausalLM, config without a recipe
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(folder)
    assert "sherry_qat" not in json.loads((folder / "config.json").read_text())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[int, object]:
    root = tmp_path_factory.mktemp("angelslim")
    folders = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread, and far faster on a busy machine
    try:
        for group_size in (64, 128):
            folders[group_size] = root / f"sherry-g{group_size}"
            train_latent_checkpoint(folders[group_size], group_size)
    finally:
        torch.set_num_threads(threads)
    return folders


def angelslim_fake_quant(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """AngelSlim's ``NMQuant`` (N=3, M=4) forward: in each block of 4 consecutive weights of a row the
    smallest |w| becomes 0, the rest sign(w)·α, α = Σ|kept| / (group_size·3/4) per row and group."""
    n, k = weight.shape
    blocks = weight.reshape(n, k // 4, 4)
    keep = torch.ones_like(blocks, dtype=torch.bool).scatter_(-1, blocks.abs().argmin(-1, keepdim=True), False)
    kept = (blocks.abs() * keep).reshape(n, k // group_size, group_size)
    alpha = kept.sum(-1, keepdim=True) / (group_size * 3 / 4)
    signs = torch.where(blocks >= 0, 1.0, -1.0) * keep
    return (signs.reshape(n, k // group_size, group_size) * alpha).reshape(n, k)


def fake_quantized_reference(folder, group_size: int) -> LlamaForCausalLM:
    """The checkpoint as AngelSlim runs it: plain linears holding the fake-quantized latent weights."""
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1].endswith("_proj"):
                module.weight.copy_(angelslim_fake_quant(module.weight, group_size))
    return model


def logits_of(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def greedy(model, prompt: list[int], steps: int) -> list[int]:
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(logits_of(model, np.array([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def eval_ids() -> np.ndarray:
    return patterns(torch.Generator().manual_seed(99), 8, 32).numpy()


@pytest.fixture(scope="module")
def references(checkpoints) -> dict[int, tuple[np.ndarray, list[int]]]:
    """Per group size: the fake-quantized reference's logits on :func:`eval_ids` and its greedy 32 tokens."""
    answers = {}
    for group_size, folder in checkpoints.items():
        reference = fake_quantized_reference(folder, group_size)
        answers[group_size] = logits_of(reference, eval_ids()), greedy(reference, PROMPT, 32)
    return answers


@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_every_format_is_the_trained_sherry_model(checkpoints, references, tmp_path, group_size, fmt):
    result = export_llm(
        checkpoints[group_size], tmp_path, ExportOptions(format=fmt, group_size=group_size), True, qat="sherry"
    )
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert result.provenance == manifest["provenance"] == LATENT
    assert (manifest["group_size"], manifest["group_size_origin"]) == (group_size, "--group-size")
    expected, tokens = references[group_size]
    lm = OnnxCausalLM(result.model_path)
    logits = lm.forward(eval_ids())[0]
    assert (logits.argmax(-1) == expected.argmax(-1)).mean() >= 0.99
    if fmt == "fp32":  # the dequantized ternary weights α·t, not the latent ones: the same model to float rounding
        np.testing.assert_allclose(logits, expected, atol=1e-4 * np.abs(expected).max())
    assert lm.generate(PROMPT, 32).tokens == tokens


def test_onnxruntime_genai_generates_the_reference_tokens(checkpoints, references, tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    result = export_llm(checkpoints[128], tmp_path, ExportOptions(format="sherry", group_size=128), True, qat="sherry")
    params = og.GeneratorParams(model := og.Model(str(result.out_dir)))
    params.set_search_options(max_length=len(PROMPT) + 32, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(PROMPT)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    assert tokens == references[128][1]


def sherry_logit_error(folder, out, argv: list[str], reference: LlamaForCausalLM) -> float:
    assert main(["export", str(folder), "-o", str(out), "--format", "sherry", "--qat", "sherry", *argv]) == 0
    ids = eval_ids()
    expected = logits_of(reference, ids)
    return float(np.abs(OnnxCausalLM(out / "model.onnx").forward(ids)[0] - expected).max() / np.abs(expected).max())


def test_a_group_size_the_checkpoint_does_not_record_is_assumed_loudly(checkpoints, tmp_path, capsys):
    """Without --group-size, 128 is assumed and said in one stderr line; on a group-64 checkpoint that
    costs accuracy the manifest makes traceable (the group size and where it came from)."""
    reference = fake_quantized_reference(checkpoints[64], 64)
    right = sherry_logit_error(checkpoints[64], tmp_path / "g64", ["--group-size", "64"], reference)
    assert "assuming" not in capsys.readouterr().err
    wrong = sherry_logit_error(checkpoints[64], tmp_path / "assumed", [], reference)
    notes = [line for line in capsys.readouterr().err.splitlines() if "assuming" in line]
    assert len(notes) == 1 and "assuming group size 128" in notes[0] and "--group-size" in notes[0]
    manifest = json.loads((tmp_path / "assumed" / MANIFEST_FILE).read_text())
    assert manifest["group_size"] == 128 and manifest["group_size_origin"].startswith("assumed")
    assert wrong > 5 * right, (wrong, right)


def test_a_marked_checkpoint_says_what_it_is_and_a_clash_is_an_error(checkpoints, tmp_path, capsys):
    """``quantization_config: {quant_method: sherry, group_size: N}`` in config.json marks a latent Sherry
    checkpoint: no flag needed, no assumption made, and flags that contradict it stop the export."""
    folder = tmp_path / "marked"
    model, _ = load_causal_lm(checkpoints[64])
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "sherry", "group_size": 64}
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert main(["export", str(folder), "-o", str(out), "--format", "fp32"]) == 0
    assert "assuming" not in capsys.readouterr().err
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert (manifest["provenance"], manifest["group_size"], manifest["group_size_origin"]) == (LATENT, 64, "checkpoint")
    assert main(["export", str(folder), "-o", str(tmp_path / "clash"), "--group-size", "128"]) == 2
    assert "--group-size 128 contradicts the checkpoint, whose config records group size 64" in capsys.readouterr().err
    assert main(["export", str(folder), "-o", str(tmp_path / "clash"), "--qat", "ternary"]) == 2
    assert "--qat ternary contradicts the checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "clash").exists()


def test_without_a_word_a_latent_folder_is_a_float_model(checkpoints, tmp_path):
    """AngelSlim's folder carries no marker: without --qat it is projected post-training (and fp32 keeps
    the latent weights), which is why the flag exists."""
    for fmt, provenance in (("sherry", POST_TRAINING), ("fp32", "float weights")):
        result = export_llm(checkpoints[128], tmp_path / fmt, ExportOptions(format=fmt))
        assert result.provenance == provenance


def test_compare_exports_one_model_in_every_format(checkpoints, tmp_path):
    """``sherry compare --qat sherry``: the fp32 row is the same ternary model as the packed rows."""
    args = build_parser().parse_args(["compare", str(checkpoints[64]), "-o", str(tmp_path), "--qat", "sherry"])
    assert (args.qat, args.group_size_given) == ("sherry", False)
    config = CompareConfig(
        model=str(checkpoints[64]),
        output=tmp_path,
        formats=("fp32", "sherry"),
        qat="sherry",
        group_size=64,
        group_size_explicit=True,
        run_accuracy=False,
    )
    model, src = load_causal_lm(config.model)
    source = prepare_checkpoint(model, config.qat, config.group_size, config.group_size_explicit)
    folders, provenance = export_all(model, None, src.label, config, source)
    assert provenance == LATENT
    ids = eval_ids()
    fp32, sherry = (OnnxCausalLM(folders[fmt] / "model.onnx").forward(ids)[0] for fmt in ("fp32", "sherry"))
    assert (fp32.argmax(-1) == sherry.argmax(-1)).mean() >= 0.99
    np.testing.assert_allclose(fp32, sherry, atol=0.02 * np.abs(fp32).max())
