"""``sherry compare``: the acc definition on hand-made requests, perplexity windows, the bytes and
bandwidth arithmetic, the profiler grouping, the report on a tiny model, and bad arguments."""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sherry_export.bandwidth import read_bandwidth
from sherry_export.cli import build_parser, main
from sherry_export.compare.accounting import ModelAccounting, WeightBytes, account
from sherry_export.compare.report import CompareResults, decode_bandwidth, target_rows
from sherry_export.compare.run import CompareConfig
from sherry_export.compare.scoring import TorchCausalLM, continuation_logprobs, perplexity, window_plan
from sherry_export.compare.settings import TASKS, AccuracySettings
from sherry_export.compare.speed import (
    LM_HEAD_GROUP,
    OUTSIDE_NODES,
    Profile,
    SpeedResults,
    SpeedSettings,
    Timing,
    decode_op_times,
)
from sherry_export.compare.tasks import (
    Question,
    encode_request,
    grade,
    hellaswag_question,
    load_task,
    mean_and_stderr,
    piqa_question,
    question_logprobs,
    subset,
    winogrande_question,
)
from sherry_export.export import ExportOptions
from sherry_export.export.llm import export_model
from sherry_export.formats import get_format
from sherry_export.models import tiny_llama

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_corpus.txt"


# --- fakes with known answers -----------------------------------------------------------------------


class CharTokenizer:
    """One token per character (its code point): splits are obvious, so expected sums can be written down."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) for c in text]}


class BigramLM:
    """Next-character log-probabilities from bigram counts of a text: knows which continuation is right."""

    def __init__(self, text: str, vocab: int = 128) -> None:
        counts = np.ones((vocab, vocab))
        for a, b in itertools.pairwise(text):
            counts[ord(a), ord(b)] += 50
        self.logits = np.log(counts / counts.sum(1, keepdims=True))

    def forward(self, input_ids: np.ndarray, past=None):
        return self.logits[np.asarray(input_ids)], None


class HistoryLM:
    """Logits that depend on the whole prefix (through a running sum), so a wrong cache shows up."""

    def __init__(self, vocab: int = 11, seed: int = 0) -> None:
        self.table = np.random.default_rng(seed).standard_normal((vocab, vocab))
        self.vocab = vocab

    def forward(self, input_ids: np.ndarray, past=None):
        ids = np.asarray(input_ids)[0]
        sums = (past or 0) + np.cumsum(ids)
        return self.table[sums % self.vocab][None], int(sums[-1])

    def full_logprob(self, context: list[int], continuation: list[int]) -> float:
        """The sum computed the slow way, one full sequence, for comparison."""
        seq = context + continuation
        logits = self.forward(np.array([seq[:-1]]))[0][0]
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return float(sum(logp[len(context) - 1 + i, t] for i, t in enumerate(continuation)))


# --- the acc definition ---------------------------------------------------------------------------------


def test_scorer_picks_the_known_answers():
    lm = BigramLM("the cat sat on the mat. the dog ate the bone. " * 3)
    questions = [  # the right answer repeats the text's character pairs, the wrong one has unseen pairs
        Question(("the cat sat on the",) * 2, (" mat", " mud"), gold=0, choice_lengths=(3, 3)),
        Question(("the dog ate the",) * 2, (" bxne", " bone"), gold=1, choice_lengths=(4, 4)),
    ]
    scores = [question_logprobs(lm, CharTokenizer(), q, max_positions=64) for q in questions]
    assert [int(np.argmax(s)) for s in scores] == [0, 1]
    assert grade("toy", questions, scores).acc == 1.0


def test_acc_sums_loglikelihoods_and_acc_norm_divides_by_characters():
    questions = [
        Question(("c",) * 2, (" a", " bbbbbbbbbb"), gold=1, choice_lengths=(1, 10)),  # acc wrong, acc_norm right
        Question(("c",) * 2, (" a", " b"), gold=0, choice_lengths=(1, 1)),  # both right
    ]
    result = grade("toy", questions, [[-2.0, -3.0], [-1.0, -5.0]])
    assert (result.docs, result.acc, result.acc_norm) == (2, 0.5, 1.0)
    assert result.acc_stderr == pytest.approx(0.5)  # sample sd 0.7071 / sqrt(2)
    wino = grade("winogrande", [Question(("x a", "x b"), (" y",) * 2, gold=1)], [[-4.0, -1.0]])
    assert wino.acc == 1.0 and wino.acc_norm is None


def test_mean_and_stderr():
    assert mean_and_stderr([1.0, 0.0, 1.0, 1.0]) == (0.75, pytest.approx(0.25))
    mean, se = mean_and_stderr([1.0])
    assert mean == 1.0 and math.isnan(se)


@given(
    context=st.lists(st.integers(0, 10), min_size=1, max_size=12),
    continuations=st.lists(st.lists(st.integers(0, 10), min_size=1, max_size=5), min_size=1, max_size=4),
)
def test_cached_context_equals_full_sequences(context, continuations):
    lm = HistoryLM()
    got = continuation_logprobs(lm, context, continuations, max_positions=100)
    assert got == pytest.approx([lm.full_logprob(context, c) for c in continuations], abs=1e-9)


def test_long_contexts_are_cut_from_the_left():
    lm = HistoryLM()
    context, continuations = list(range(1, 11)), [[1, 2, 3], [4]]
    got = continuation_logprobs(lm, context, continuations, max_positions=8)  # keeps 8 - 3 + 1 = 6 tokens
    assert got == pytest.approx([lm.full_logprob(context[-6:], c) for c in continuations])
    with pytest.raises(ValueError, match="does not fit"):
        continuation_logprobs(lm, context, [[1] * 8], max_positions=8)


def test_trailing_context_spaces_move_to_the_continuation():
    context, continuation = encode_request(CharTokenizer(), "Answer: ", "Paris")
    assert context == [ord(c) for c in "Answer:"] and continuation == [ord(c) for c in " Paris"]


def test_prompts_follow_lm_eval():
    hs = hellaswag_question(
        {
            "activity_label": "Cooking",
            "ctx_a": "A man cuts onions.",
            "ctx_b": "he",
            "endings": ["stirs the pot [title] Serve.", "[header] jumps."],
            "label": "0",
        }
    )
    assert hs.contexts[0] == "Cooking: A man cuts onions. He"
    # lm-eval strips before removing tags, so a leading tag leaves a space, kept as lm-eval keeps it
    assert hs.continuations == (" stirs the pot. Serve.", "  jumps.") and hs.gold == 0
    assert hs.choice_lengths == (len("stirs the pot. Serve."), len(" jumps."))
    pq = piqa_question({"goal": "Open a jar", "sol1": "twist", "sol2": "hammer", "label": 1})
    assert pq.contexts == ("Question: Open a jar\nAnswer:",) * 2 and pq.continuations == (" twist", " hammer")
    wg = winogrande_question(
        {"sentence": "Sarah beat Maria so _ was happy.", "option1": "Sarah", "option2": "Maria", "answer": "1"}
    )
    assert wg.contexts == ("Sarah beat Maria so Sarah", "Sarah beat Maria so Maria")
    assert wg.continuations == (" was happy.",) * 2 and wg.gold == 0 and wg.choice_lengths is None


def test_task_data_and_subsets():
    arc = load_task("arc_challenge")
    assert len(arc) == 1172  # the test split, as lm-eval scores it
    assert arc[0].contexts[0].startswith("Question: ") and arc[0].contexts[0].endswith("\nAnswer:")
    picked = subset(len(arc), 50)
    assert picked == subset(len(arc), 50) and picked == sorted(set(picked)) and len(picked) == 50
    assert subset(10, None) == subset(10, 99) == list(range(10))
    with pytest.raises(ValueError, match="unknown task"):
        load_task("lambada")


# --- perplexity -------------------------------------------------------------------------------------


@given(n=st.integers(1, 300), window=st.integers(2, 64), data=st.data())
def test_windows_score_every_token_once_with_context(n, window, data):
    stride = data.draw(st.integers(1, window - 1))
    windows = window_plan(n, window, stride)
    scored = [t for w in windows for t in range(w.first_target, w.end)]
    assert scored == list(range(1, n))
    for w in windows:
        assert w.end - w.start == min(window, n)
        assert w.start < w.first_target <= w.end
    for w in windows[1:]:
        assert w.first_target - w.start >= window - stride


def test_uniform_model_has_perplexity_of_its_vocabulary():
    class Uniform:
        def forward(self, input_ids, past=None):
            return np.zeros((*np.shape(input_ids), 50)), None

    result = perplexity(Uniform(), np.arange(100) % 50, window=16, stride=8)
    assert result.tokens == 99 and result.value == pytest.approx(50.0)


@pytest.mark.parametrize("fmt", ["fp32", "sherry"])
def test_onnx_cache_path_matches_pytorch(tiny_model, tmp_path, fmt):
    """The exported decoder scores a continuation on top of its cached context as PyTorch does (fp32
    exactly; Sherry against the same ternary weights in PyTorch, within the int8 activations' error)."""
    from sherry_export.export.llama import model_ternaries
    from sherry_export.generate import OnnxCausalLM
    from sherry_export.reference import kernel_reference_model

    options = ExportOptions(format=fmt, group_size=32)
    export_model(tiny_model, tmp_path, options)
    rng = np.random.default_rng(0)
    context, continuations = rng.integers(0, 256, 20).tolist(), [rng.integers(0, 256, n).tolist() for n in (1, 5, 9)]
    onnx_sums = continuation_logprobs(OnnxCausalLM(tmp_path / "model.onnx"), context, continuations, 256)
    reference = (
        tiny_model if fmt == "fp32" else kernel_reference_model(tiny_model, model_ternaries(tiny_model, options))
    )
    torch_sums = continuation_logprobs(TorchCausalLM(reference), context, continuations, 256)
    assert onnx_sums == pytest.approx(torch_sums, rel=1e-4 if fmt == "fp32" else 2e-2)


# --- bytes, bandwidth, speed arithmetic ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_llama(seed=0)


@pytest.mark.parametrize(("fmt", "code_bpw", "bpw"), [("sherry", 1.25, 1.75), ("nbits2", 2.0, 3.0)])
def test_accounting_matches_the_formats(tiny_model, tmp_path, fmt, code_bpw, bpw):
    gs = 32
    export_model(tiny_model, tmp_path, ExportOptions(format=fmt, group_size=gs))
    a = account(tmp_path)
    config = tiny_model.config
    h, i, layers, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes = [(h, h + 2 * kv), (h, h), (h, 2 * i), (i, h)]  # (K, N): qkv, o, gate+up, down
    assert a.projections.weights == layers * sum(k * n for k, n in shapes)
    if fmt == "sherry":  # the file holds exactly the format's bytes (docs/formats.md)
        spec = get_format("sherry")
        assert a.projections.code_bytes == layers * sum(n * spec.row_bytes(k, gs) for k, n in shapes)
        assert a.projections.scale_bytes == layers * sum(2 * n * (k // gs) for k, n in shapes)
    assert (a.projections.code_bits_per_weight, a.projections.bits_per_weight) == (code_bpw, bpw)  # nbits: fp32 scales
    assert a.lm_head.weights == v * h and a.lm_head.bits_per_weight == 32
    stored = sum(len(t.raw_data) for t in onnx.load(tmp_path / "model.onnx").graph.initializer)
    rotary = 2 * config.max_position_embeddings * (h // config.num_attention_heads // 2) * 4
    rows = 4 * h + 2 * 4 * (h // config.num_attention_heads // 2)  # one embedding row, one cos and one sin row
    assert a.embedding_bytes == 4 * v * h
    assert a.decode_weight_bytes == stored - a.embedding_bytes - rotary + rows
    assert a.kv_bytes_per_position == 2 * layers * kv * 4
    assert a.achieved_gb_per_s(0.01) == pytest.approx(a.decode_weight_bytes / 1e7)


@pytest.mark.parametrize(
    ("head", "embedding"), [("fp32", "auto"), ("nbits4", "auto"), ("fp32", "nbits8"), ("int8", "auto")]
)
def test_accounting_of_tied_and_quantized_embeddings(tmp_path, head, embedding):
    """A tied table stored once is the LM head's weight, read whole each step (the embedding stores nothing of
    its own); a table only gathered, quantized or not, is the embedding's, read one row per token."""
    tied = tiny_llama(seed=0, tie_word_embeddings=True)
    result = export_model(
        tied, tmp_path, ExportOptions(format="sherry", group_size=32, lm_head=head, embedding=embedding)
    )
    a = account(tmp_path)
    config = tied.config
    v, h = config.vocab_size, config.hidden_size
    # nbits: a float32 scale per block of 32; int8: a float16 one
    head_bits = {"fp32": 32, "nbits4": 4 + 32 / 32, "int8": 8 + 16 / 32}[head]
    assert a.lm_head.weights == v * h and a.lm_head.bits_per_weight == head_bits
    shared = result.options.embedding == head
    table = 0 if shared else v * h + 4 * v * h // 32  # nbits8 codes and float32 scales
    assert a.embedding_bytes == table == result.size_split["embedding"]
    assert a.lm_head.total_bytes == result.size_split["lm_head"]
    assert a.projections.total_bytes == result.size_split["projections"]
    stored = sum(len(t.raw_data) for t in onnx.load(tmp_path / "model.onnx").graph.initializer)
    rotary = 2 * config.max_position_embeddings * (h // config.num_attention_heads // 2) * 4
    rows = 2 * 4 * (h // config.num_attention_heads // 2) + (0 if shared else h + 4 * h // 32)
    assert a.decode_weight_bytes == stored - table - rotary + rows


def test_speedups_pair_repetitions():
    results = SpeedResults(SpeedSettings(prompt_tokens=100))
    for rep, (ours, theirs) in enumerate([(0.010, 0.012), (0.020, 0.026), (0.010, 0.011)], start=1):
        results.timings += [Timing("sherry", 2, rep, 0.5, [ours] * 3), Timing("i2s", 2, rep, 1.0, [theirs] * 3)]
    assert results.speedup("sherry", "i2s", 2) == pytest.approx(1.2)  # median of 1.2, 1.3, 1.1
    assert results.decode_tokens_per_s("sherry", 2) == pytest.approx(100.0)  # 1 / median of the medians
    assert results.prefill_tokens_per_s("i2s", 2) == pytest.approx(100.0)
    assert results.decode_range("sherry", 2) == pytest.approx((50.0, 100.0))


def test_decode_bandwidth_shares_and_thread_scaling():
    """Step bytes = weights + KV at the middle timed step's context; the projections' and head's rates come
    from their profiled node time; the 2-thread scaling pairs repetitions; all against the best probe."""
    settings = SpeedSettings(prompt_tokens=100, decode_steps=9)  # middle step attends over 105 positions
    speed = SpeedResults(settings, bandwidth_gb_per_s={1: [8.0, 10.0], 2: [20.0, 16.0]})
    for rep, (one, two) in enumerate([(0.010, 0.006), (0.012, 0.006), (0.010, 0.004)], start=1):
        speed.timings += [Timing("sherry", 1, rep, 1.0, [one] * 3), Timing("sherry", 2, rep, 1.0, [two] * 3)]
    speed.profiles += [
        Profile("sherry", 1, {"SherryMatMul": 2000.0, LM_HEAD_GROUP: 4000.0, "GroupQueryAttention": 500.0}),
        Profile("sherry", 2, {"SherryMatMul": 1000.0, OUTSIDE_NODES: 100.0}),
    ]
    size = ModelAccounting(
        file_bytes=0,
        projections=WeightBytes(weights=10**8, code_bytes=15_000_000, scale_bytes=1_000_000),
        lm_head=WeightBytes(weights=10**7, code_bytes=30_000_000, scale_bytes=2_000_000),
        embedding_bytes=0,
        other_bytes=0,
        decode_weight_bytes=48_950_000,
        kv_bytes_per_position=10_000,
    )
    results = CompareResults("m", "m", "p", "cpu", "today", {}, ["sherry"], {"sherry": size}, speed)
    one = decode_bandwidth(results, "sherry", 1)
    assert one.step_bytes == 50_000_000  # 48.95 MB of weights + 105 positions of 10 kB
    assert one.step_gb_per_s == pytest.approx(5.0)  # 50 MB per median step of 10 ms
    assert one.step_fraction == pytest.approx(0.5)  # of the best 1-thread probe, 10 GB/s
    assert one.projections_gb_per_s == pytest.approx(8.0) and one.projections_fraction == pytest.approx(0.8)
    assert one.lm_head_gb_per_s == pytest.approx(8.0) and one.scaling is None
    assert one.lm_head_ms == pytest.approx(4.0) and one.lm_head_fraction == pytest.approx(0.8)
    two = decode_bandwidth(results, "sherry", 2)
    assert two.step_fraction == pytest.approx(50e6 / 0.006 / 1e9 / 20)
    assert two.projections_fraction == pytest.approx(16.0 / 20) and two.lm_head_gb_per_s is None
    assert two.lm_head_ms is None and two.lm_head_fraction is None
    assert two.scaling == pytest.approx(2.0)  # median of 10/6, 12/6, 10/4
    targets = {row[0]: row[2:] for row in target_rows(results)}
    assert targets["sherry decode step, share of the probed bandwidth (1 thread)"] == ["50.0%", "NOT met"]
    assert targets["sherry decode tok/s, 2 threads / 1 thread"] == ["2.00", "met"]


def test_bandwidth_probe_pins_only_its_own_threads():
    """The probe reads with pinned threads of its own; the caller's affinity (which onnxruntime's threads
    would inherit) is untouched, and impossible requests are refused."""
    import os

    before = os.sched_getaffinity(0)
    for threads in (1, 2, len(before) + 1):
        assert 0 < read_bandwidth(threads, nbytes=4e6, passes=2) < math.inf
    assert os.sched_getaffinity(0) == before
    with pytest.raises(ValueError, match="at least 1"):
        read_bandwidth(0)
    with pytest.raises(ValueError, match="cannot be split"):
        read_bandwidth(4, nbytes=16)


def test_profile_events_grouped_per_decode_step():
    def run(ts):
        return {"cat": "Session", "name": "model_run", "ts": ts}

    def node(name, op, ts, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [run(0), run(100), run(200), run(300)]  # warm-up x3, then the prefill
    events += [node("layers.0.qkv_proj", "SherryMatMul", 301, 500)]  # prefill: not counted
    for step, start in enumerate((1000, 2000, 3000)):
        events += [run(start), node("layers.0.qkv_proj", "SherryMatMul", start + 1, 100 + step)]
        events += [node("lm_head", "MatMulNBits", start + 2, 50), node("x", "MatMulNBits", start + 3, 10)]
    times = decode_op_times(events, warm_runs=3, step_seconds=[0.001, 0.001, 0.005])
    assert times == {
        "SherryMatMul": 101,
        LM_HEAD_GROUP: 50,
        "MatMulNBits": 10,
        OUTSIDE_NODES: 840,
    }  # median of 840, 839, 4838


# --- the report end to end, and errors -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Llama with a byte-level BPE: a model folder as a user would pass it."""
    from sherry_export.data import train_bpe

    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = train_bpe([FIXTURE.read_text()], 300)
    tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=512).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_report_on_a_tiny_model(tiny_folder, tmp_path):
    argv = ["compare", str(tiny_folder), "-o", str(tmp_path), "--formats", "sherry", "i2s", "fp32"]
    argv += ["--group-size", "32", "--threads", "1", "2", "--limit", "2", "--ppl-text", str(FIXTURE)]
    argv += ["--ppl-tokens", "40", "--window", "32", "--repetitions", "2", "--prompt-tokens", "8"]
    argv += ["--decode-steps", "4", "--profile-steps", "2", "--bandwidth-bytes", "1e7", "--torch-baseline"]
    argv += ["--compare-with", str(tiny_folder)]  # the same float model again, as a QAT run's baseline would be
    assert main(argv) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["sizes"]) == {"sherry", "i2s", "fp32"}
    assert data["sizes"]["sherry"]["projections"]["code_bits_per_weight"] == 1.25
    assert data["sizes"]["i2s"]["projections"]["code_bits_per_weight"] == 2.0
    summary = {(s["format"], s["threads"]): s for s in data["speed"]["summary"]}
    assert {"speedup_vs_i2s", "speedup_vs_fp32"} <= set(summary["sherry", 2])
    assert all(s["decode_tokens_per_s"] > 0 and s["prefill_tokens_per_s"] > 0 for s in summary.values())
    for (fmt, threads), s in summary.items():  # every format and thread count was profiled
        assert s["step_bytes"] > data["sizes"][fmt]["decode_weight_bytes"] and s["step_fraction"] > 0  # + the KV
        assert s["projections_fraction"] > 0 and s["lm_head_fraction"] > 0
        assert (s["scaling"] is None) == (threads == 1)
    rows = {row["label"]: row for row in data["accuracy"]}
    assert list(rows) == ["sherry", "i2s", "fp32", "PyTorch float", f"{tiny_folder.name} (full precision)"]
    assert rows["PyTorch float"]["tasks"] == rows[f"{tiny_folder.name} (full precision)"]["tasks"]
    assert {label: {t: r["tasks"][t]["docs"] for t in r["tasks"]} for label, r in rows.items()} == dict.fromkeys(
        rows, dict.fromkeys(TASKS, 2)
    )  # every task scored on its 2 documents, for every row
    fp32, torch_ppl = (rows[k]["perplexity"]["tiny_corpus.txt"] for k in ("fp32", "PyTorch float"))
    assert fp32["tokens"] == torch_ppl["tokens"] == 40
    assert fp32["value"] == pytest.approx(torch_ppl["value"], rel=1e-4)  # onnxruntime and PyTorch agree
    for task in ("arc_easy", "winogrande"):
        assert rows["fp32"]["tasks"][task]["acc"] == rows["PyTorch float"]["tasks"][task]["acc"]
    report = (tmp_path / "report.md").read_text()
    headings = ("## Headline", "## Size", "## Speed", "### Where decode time goes", "### Memory bandwidth")
    for heading in (*headings, "## Accuracy"):
        assert heading in report
    assert "sherry/i2s" in report and "arc_easy 2" in report
    for column in ("× 1-thread decode", "step % of probe", "projections % of probe", "LM head % of probe"):
        assert column in report
    assert "sherry decode tok/s, 2 threads / 1 thread" in report
    headline = report.split("## Headline")[1].split("## Size")[0]
    assert "| PyTorch float " in headline and "| sherry " in headline and "decode tok/s (2 thr)" in headline
    for png in ("latency_vs_bpw.png", "accuracy_vs_bpw.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "models" / "sherry" / "model.onnx").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--formats", "sherry", "int3"], "invalid choice"),
        (["--limit", "0"], "positive integer"),
        (["--limit", "-5"], "positive integer"),
        (["--threads", "0"], "positive integer"),
        (["--tasks", "lambada"], "invalid choice"),
        (["--speed-only", "--accuracy-only"], "not allowed with"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["compare", "smollm2", "-o", "out", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{missing}"], "not found"),
        (["shape:llama-3.2-1b"], "--speed-only"),
        (["shape:llama-9b", "--speed-only"], "unknown shape"),
        (["smollm2", "--formats", "sherry", "sherry"], "formats repeat"),
        (["smollm2", "--window", "8", "--stride", "8"], "less than the window"),
        (["smollm2", "--ppl-text", "{missing}"], "is not a file"),
        (["smollm2", "--speed-only", "--torch-baseline"], "need the accuracy part"),
        (["smollm2", "--compare-with", "{missing}"], "not found"),
    ],
)
def test_bad_values_are_clear_errors(argv, message, tmp_path, capsys):
    argv = [a.replace("{missing}", str(tmp_path / "nowhere")) for a in argv]
    assert main(["compare", *argv, "-o", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # rejected before any work


def test_demo_config_names_the_shipped_models(tmp_path):
    """`make demo` = `sherry demo` compares the shipped Sherry model with the dense-ternary and
    full-precision ones beside it (test_assets.py runs that configuration end to end)."""
    from sherry_export.compare.run import demo_config, qat_kind
    from sherry_export.models import DEFAULT_FP_MODEL, DEFAULT_MODEL, DEFAULT_TERNARY_MODEL
    from sherry_export.qat import load_qat_model

    config = demo_config(tmp_path, (1,))  # validates: the shipped models are there
    assert config.model == str(DEFAULT_MODEL) and config.compare_with == (DEFAULT_TERNARY_MODEL, DEFAULT_FP_MODEL)
    assert set(config.formats) == {"sherry", "tl2", "i2s", "nbits2", "nbits4", "fp32"}
    assert config.accuracy.limit and config.accuracy.ppl_tokens  # small subsets: minutes, not hours
    assert qat_kind(load_qat_model(DEFAULT_TERNARY_MODEL)[0]) == "dense-ternary QAT, packed i2s"
    assert qat_kind(load_qat_model(DEFAULT_FP_MODEL)[0]) == "full precision"


def test_config_validation():
    with pytest.raises(ValueError, match="unknown format"):
        CompareConfig("smollm2", Path("out"), formats=("sherry", "int3"))
    with pytest.raises(ValueError, match="threads"):
        CompareConfig("smollm2", Path("out"), threads=(2, 2))
    with pytest.raises(ValueError, match="limit"):
        AccuracySettings(limit=0)
    with pytest.raises(ValueError, match="decode_steps"):
        SpeedSettings(decode_steps=0)


# --- a small real check ------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_answers_obvious_questions():
    """The scorer on the real SmolLM2-135M in PyTorch: questions any language model gets right."""
    from sherry_export.models import load_causal_lm, load_tokenizer

    model, source = load_causal_lm("smollm2")
    tokenizer = load_tokenizer(source)
    questions = [
        ("The capital of France is", [" a banana", " Paris"], 1),
        ("One, two, three, four,", [" five", " purple"], 0),
        ("The sun rises in the", [" sandwich", " east"], 1),
        ("Question: What do bees make?\nAnswer:", [" honey", " bricks"], 0),
    ]
    mc = [Question((c,) * 2, tuple(x), g, tuple(len(s) for s in x)) for c, x, g in questions]
    scores = [question_logprobs(TorchCausalLM(model), tokenizer, q, max_positions=2048) for q in mc]
    assert grade("obvious", mc, scores).acc == 1.0
