"""``sherry tune``: MetaSchedule tuning of the TVM kernels, per (format, shape, target), into a database.

Each kernel is a TensorIR workload (:func:`tvm_schedules.kernels.workload`) of element-wise decode,
dot and epilogue blocks; its design space (:func:`tvm_schedules.kernels.design_space`) samples the
tiles per parallel step and the quad unroll (``sample_perfect_tile``) in two loop orders and
tensorizes the decode and the dot with the target ISA's intrinsics (tvm_schedules/intrinsics.py). MetaSchedule's
evolutionary search (XGBoost cost model, tile-size mutation) builds and times the candidates in this
process on one thread (M = 1, hot), ``--trials`` per kernel, and appends every measured trace to the
target's JSON database (``<target>/database_workload.json``, ``database_tuning_record.json``). The
summary ``<target>/tuned.json`` names each kernel's best decisions and times; ``make lib`` compiles
the best traces from the database (tvm_schedules/build.py) without tuning. ``sherry tune --verify``
(after ``make lib``) adds both kernels' times as onnxruntime nodes, hot and cold, and the CPU model
that measured them, which is what the op library's auto mode compares. ``--formulation lut`` tunes
the sherry activation-lookup-table form instead (tvm_schedules/lut.py; the AVX-512 and the AVX2
kernels' pair records and tables), its M = 1 function only. Tuning stays out of CI.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from sherry_export import formats
from tvm_schedules.layout import Shape

FORMATS = tuple(formats.FORMATS)
LLAMA_1B_SHAPES = [(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048)]
TARGETS: dict[str, dict] = {
    "avx2": {"kind": "llvm", "mcpu": "x86-64-v3"},
    "avx512": {"kind": "llvm", "mcpu": "x86-64-v4", "mattr": ["+avx512vbmi", "+avx512vnni"]},
}
"""Generic targets; ``native`` is the CPU LLVM detects (``llvm_get_system_cpu``). avx512 adds VBMI (vpermb)
and VNNI (vpdpbusd), which the op's AVX-512 path requires anyway."""


TRIALS_PER_ITER = 8
"""Candidates per search round: MetaSchedule builds and times them as one batch, then evolves the next."""

COST_MODEL = "xgb"
"""MetaSchedule's learned cost model (XGBoost on per-store features), from the xgboost-cpu dependency."""


def cost_model() -> Any:
    """MetaSchedule's XGBoost cost model, to share between the kernels of one run. It is trained after
    every measured round and ranks the next round's candidates from the first round on: its default
    warm-up (random ranking until 100 measured candidates) is longer than our design spaces (at most
    a few dozen points), which it would never leave."""
    try:
        import xgboost  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "MetaSchedule's xgb cost model needs xgboost, a declared dependency of sherry-export: "
            "`pip install xgboost-cpu` (the CPU-only wheel; plain xgboost pulls CUDA's NCCL)"
        ) from e
    from tvm.s_tir import meta_schedule as ms

    return ms.cost_model.XGBModel(
        extractor=ms.feature_extractor.PerStoreFeature(), num_warmup_samples=TRIALS_PER_ITER, num_tuning_cores=1
    )


def cpu_model() -> tuple[str, str]:
    """This CPU's model as the op library names it (dispatch.cc ``cpu_model_id``): ``"<vendor> family <f>
    model <m>"`` from /proc/cpuinfo, and its model name. Verified timings hold for that model."""
    info: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if not line.strip():
            break  # the first processor is enough
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    ident = f"{info.get('vendor_id', 'unknown')} family {info.get('cpu family', '?')} model {info.get('model', '?')}"
    return ident, info.get("model name") or ident


@functools.cache
def host_isa() -> str:
    """``avx512`` if this CPU has the AVX-512 subset our dispatcher requires, else ``avx2``."""
    flags = Path("/proc/cpuinfo").read_text().split()
    need = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512vbmi")
    return "avx512" if all(f in flags for f in need) else "avx2"


def target_config(name: str) -> tuple[dict, str]:
    """The TVM target dict (one core) and the ISA its objects need."""
    if name == "native":
        from tvm.target import codegen

        return {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": 1}, host_isa()
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose native, {', '.join(TARGETS)}")
    return {**TARGETS[name], "num-cores": 1}, name


def model_shapes(model_dir: Path) -> list[tuple[int, int, int]]:
    """(K, N, group_size) of the quantized projections of a packed model folder or an exported ONNX dir."""
    config = json.loads((model_dir / "config.json").read_text())
    packed = config.get("sherry_packed", {})
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or hidden // heads
    dims = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv * head_dim),
        "v_proj": (hidden, kv * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    shapes = set()
    for name, gs in packed.get("group_sizes", {}).items():
        k, n = dims[name.rsplit(".", 1)[1]]
        shapes.add((k, n, gs))
    if not shapes:
        raise ValueError(f"{model_dir}/config.json has no sherry_packed.group_sizes")
    return sorted(shapes)


@dataclass
class Entry:
    format: str
    k: int
    n: int
    group_size: int
    target: str
    isa: str
    mcpu: str
    tiles: int
    """The best trace's decisions (:class:`tvm_schedules.kernels.Knobs`): tiles per parallel step."""
    unroll: int
    """Quads of a group unrolled together."""
    order: str
    """Loop order inside a group (``kernels.ORDERS``)."""
    tvm_us: float
    hand_us: float | None
    trials: int
    """Candidates MetaSchedule measured for this kernel (in this run)."""
    tune_seconds: float
    tvm_node_us: float | None = None
    """The TVM kernel as one onnxruntime node (M = 1, one thread, hot), from ``sherry tune --verify``."""
    hand_node_us: float | None = None
    """The hand-written kernel of the same ISA, timed interleaved with ``tvm_node_us`` the same way."""
    tvm_cold_us: float | None = None
    """As ``tvm_node_us``, with cold weights (a graph of distinct copies)."""
    hand_cold_us: float | None = None
    cpu: str | None = None
    """The CPU model that ran ``--verify`` (:func:`cpu_model`): auto mode trusts the four times on that
    model only."""
    cpu_name: str | None = None
    block_tiles: int | None = None
    """The block function's best trace (M = ``kernels.BLOCK_M``, tuned on its own): tiles per step."""
    block_unroll: int | None = None
    block_order: str | None = None
    """Its loop order (``kernels.BLOCK_ORDERS``)."""
    block_rows: int | None = None
    """Its rows of A per decode (``kernels.BLOCK_ROWS``)."""
    block_tvm_us: float | None = None
    """The bare block function, one call of ``kernels.BLOCK_M`` rows (what its search ranks by)."""
    block_trials: int | None = None
    block_tune_seconds: float | None = None
    batch: int | None = None
    """Rows of A of the batch timing of ``--verify`` (:data:`BATCH_ROWS`)."""
    tvm_batch_us: float | None = None
    """The TVM kernel as one onnxruntime node at ``batch`` rows of A (one thread, hot), from ``--verify``:
    what auto mode compares for calls of ``batch_min_rows`` rows or more."""
    hand_batch_us: float | None = None
    """The hand-written kernel of the same ISA at ``batch`` rows, timed interleaved with ``tvm_batch_us``."""
    batch_min_rows: int | None = None
    """The fewest rows of A of a call for which auto mode applies the batch verdict (:data:`BATCH_MIN_ROWS`)."""
    formulation: str = "plane"
    """The M = 1 kernel's formulation (``lut.FORMULATIONS``): ``plane`` (kernels.py: decoded weight planes,
    a byte per code) or ``lut`` (lut.py: activation lookup tables, 1.25-bit sherry, AVX-512); entries
    without it are plane kernels."""


BATCH_ROWS = 128
"""Rows of A of ``--verify``'s batch timing (prefill)."""
BATCH_MIN_ROWS = 16
"""Auto mode's batch regime, M >= this: the block function's (``kernels.BLOCK_ROWS`` rows per decode)
and the hand-written kernels' GEMM paths (from 6 to 64 rows, kernel_avx2.cc and kernel_avx512.cc) are
the ones that run there; below it, the M = 1 verdict holds."""


def node_us(
    fmt: str, k: int, n: int, gs: int, kernels: tuple[str, ...], cold: bool = False, runs: int = 100, rows: int = 1
) -> list[float] | None:
    """Median µs of one ``fmt`` node (M = ``rows``, one thread, onnxruntime profiler) on each kernel path of
    ``kernels`` (e.g. ``("tvm", "avx512")``), sessions run interleaved so load hits each alike. Cold:
    a graph of distinct weight copies (``COLD_BYTES`` in all), so every node reads from memory.
    None when a path cannot run (the library is not built, this CPU lacks the ISA, no tuned kernel)."""
    import torch

    from sherry_export.bench import COLD_BYTES, cold_copies
    from sherry_export.bench.kernels import replicate
    from sherry_export.formats import pack
    from sherry_export.onnx_ops import matmul_model
    from sherry_export.profiling import kernel_events, read_profile
    from sherry_export.qat import PROJECTIONS
    from sherry_export.runtime import make_session

    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    ternary = PROJECTIONS[formats.FORMATS[fmt].projection](weight, gs)  # the densest values the format holds
    packed = pack(fmt, ternary, gs)
    copies = cold_copies(COLD_BYTES, packed.data.nbytes + packed.scales.nbytes) if cold else 1
    model = replicate(matmul_model(packed, leading_dims=(rows,)), copies)
    calls = max(2, runs // copies)
    a = np.random.default_rng(0).standard_normal((rows, k), dtype=np.float32)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sessions = [
                make_session(model, threads=1, kernel=path, profile_prefix=os.path.join(tmp, path)) for path in kernels
            ]
            for _ in range(calls + 1):  # the first call of each session is a warm-up
                for session in sessions:
                    session.run(None, {"A": a})
            profiles = [read_profile(session.end_profiling()) for session in sessions]
    except Exception as e:  # any failure to run means: not timed, and the message says why
        print(f"  ({fmt} K={k} N={n} on {', '.join(kernels)} not timed: {e})")
        return None
    return [statistics.median(float(e["dur"]) for e in kernel_events(events)[copies:]) for events in profiles]


def handwritten_us(fmt: str, k: int, n: int, gs: int, isa: str, runs: int = 200) -> float | None:
    """Median µs of the hand-written kernel on ``isa`` (one node, M = 1, one thread, onnxruntime profiler)."""
    times = node_us(fmt, k, n, gs, (isa,), runs=runs)
    return None if times is None else times[0]


AUTO_MIN_SPEEDUP = 1.05
"""Auto mode takes a TVM kernel only where it was timed at least this much faster (hand-written time over
TVM time): one verify run moves by a few percent on a shared machine, and a node whose regimes take
different kernels holds its weights twice. Mirrors ``kTvmMinSpeedup`` (custom_ops/src/kernel_tvm_table.h),
which the op library applies."""


def _wins(tvm_us: float | None, hand_us: float | None) -> bool:
    return tvm_us is not None and hand_us is not None and tvm_us > 0 and hand_us / tvm_us >= AUTO_MIN_SPEEDUP


def verified_faster(entry: dict) -> bool:
    """Auto mode's rule on the times: the TVM kernel beat the hand-written one as an onnxruntime node by
    :data:`AUTO_MIN_SPEEDUP`, hot and cold. The op library applies it only on the CPU model that measured
    them (``entry["cpu"]``)."""
    return all(_wins(entry.get(f"tvm_{m}_us"), entry.get(f"hand_{m}_us")) for m in ("node", "cold"))


def verified_faster_batch(entry: dict) -> bool:
    """Auto mode's rule for calls of ``batch_min_rows`` rows of A or more: the TVM node beat the
    hand-written one at ``batch`` rows by :data:`AUTO_MIN_SPEEDUP` (on the CPU model that measured it)."""
    return _wins(entry.get("tvm_batch_us"), entry.get("hand_batch_us"))


def verify(target_name: str, out_dir: Path) -> list[dict]:
    """Time every database entry of ``target_name`` as an onnxruntime node, TVM against the hand-written
    kernel of the same ISA, interleaved, with the op library as built now (``make lib`` from this
    database first): M = 1 hot and cold, and :data:`BATCH_ROWS` rows hot. The op's auto mode takes a
    TVM kernel only where this node-level comparison says it is faster (per regime: M = 1, and calls
    of :data:`BATCH_MIN_ROWS` rows or more): the tuning times alone compare a bare function with a
    whole node."""
    from tqdm import tqdm

    summary_path = out_dir / target_name / "tuned.json"
    entries = load_entries(summary_path)
    if not entries:
        raise FileNotFoundError(f"{summary_path} has no entries: run `sherry tune --target {target_name}` first")
    os.environ["SHERRY_TVM_TARGET"] = target_name  # the forced tvm path runs this target's objects
    cpu, cpu_name = cpu_model()
    try:
        for e in tqdm(entries, desc=f"verify {target_name}", unit="kernel"):
            for mode in ("node", "cold"):
                times = node_us(e["format"], e["k"], e["n"], e["group_size"], ("tvm", e["isa"]), cold=mode == "cold")
                e[f"tvm_{mode}_us"], e[f"hand_{mode}_us"] = (None, None) if times is None else times
            times = node_us(e["format"], e["k"], e["n"], e["group_size"], ("tvm", e["isa"]), runs=10, rows=BATCH_ROWS)
            e["tvm_batch_us"], e["hand_batch_us"] = (None, None) if times is None else times
            e["batch"], e["batch_min_rows"] = BATCH_ROWS, BATCH_MIN_ROWS
            e["cpu"], e["cpu_name"] = cpu, cpu_name
            summary_path.write_text(json.dumps(sorted(entries, key=_order), indent=1) + "\n")
    finally:
        del os.environ["SHERRY_TVM_TARGET"]
    return entries


def entry_functions(e: dict) -> dict[str, tuple[str, Any]]:
    """The bare functions of a ``tuned.json`` entry by name, each with its knobs in words: ``m1`` (its
    formulation's M = 1 function) and, for a plane entry with a block record, ``block``
    (``kernels.BLOCK_M`` rows)."""
    from tvm_schedules import kernels, lut

    shape = Shape(e["format"], e["k"], e["n"], e["group_size"])
    knobs = kernels.Knobs(e["tiles"], e["unroll"], e["order"])
    formulation = e.get("formulation", "plane")
    words = f"{formulation} {knobs.tiles}x{knobs.unroll} {knobs.order}"
    if formulation == "lut":
        return {"m1": (words, lut.prim_func(lut.LutShape(shape.k, shape.n, shape.group_size, isa=e["isa"]), knobs))}
    functions = {"m1": (words, kernels.prim_func(shape, 1, knobs, e["isa"]))}
    if e.get("block_tiles") is not None:
        block = kernels.Knobs(e["block_tiles"], e["block_unroll"], e["block_order"], e["block_rows"])
        words = f"{block.tiles}x{block.unroll} {block.order}, {block.rows} rows"
        functions["block"] = (words, kernels.prim_func(shape, kernels.BLOCK_M, block, e["isa"]))
    return functions


def bare_timer(func: Any, target: Any, number: int = 20, repeat: int = 5, min_repeat_ms: int = 10) -> Any:
    """A callable that times ``func`` (a static-shape PrimFunc) once more, compiled for ``target``: µs per
    call, the least of ``repeat`` means of at least ``number`` calls (and ``min_repeat_ms``), on zeros
    made from its parameters (the kernels have no data-dependent branches)."""
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    args = [tvm.runtime.tensor(np.zeros([int(d) for d in buf.shape], str(buf.dtype))) for buf in func.params]
    timer = lib.mod.time_evaluator("main", tvm.cpu(), number=number, repeat=repeat, min_repeat_ms=min_repeat_ms)
    return lambda: min(timer(*args).results) * 1e6


def compare(target_name: str, out_dir: Path, other_dir: Path, rounds: int = 3) -> list[dict]:
    """Time the kernels of ``out_dir``'s database for ``target_name`` against the same kernels (format,
    shape, group size) of ``other_dir``'s, bare, hot, on one thread of this CPU, the two alternating for
    ``rounds`` rounds: is a database tuned here as fast as another (the committed one)? One row per
    kernel and function (``m1``, ``block``): both knob sets in words and, where they differ, both times
    (µs, min and max over the rounds) and ``ratio`` (theirs / ours per round, min and max: above 1 ours
    is faster). Functions with the same knobs are the same code and are not timed."""
    from tqdm import tqdm

    def key(e: dict) -> tuple:
        return e["format"], e["k"], e["n"], e["group_size"]

    ours = load_entries(out_dir / target_name / "tuned.json")
    theirs = {key(e): e for e in load_entries(other_dir / target_name / "tuned.json")}
    pairs = [(e, theirs[key(e)]) for e in ours if key(e) in theirs]
    if not pairs:
        raise FileNotFoundError(
            f"no kernel of {out_dir / target_name / 'tuned.json'} is in {other_dir / target_name / 'tuned.json'}: "
            "tune the same shapes and formats for the same target into both"
        )
    os.environ.setdefault("TVM_NUM_THREADS", "1")  # one thread, as the search timed them
    target, _ = target_config(target_name)
    rows = []
    for mine, other in tqdm(pairs, desc=f"compare {target_name}", unit="kernel"):
        a, b = entry_functions(mine), entry_functions(other)
        for name in [n for n in a if n in b]:
            row = {"kernel": Shape(*key(mine)).key, "function": name, "ours": a[name][0], "theirs": b[name][0]}
            if row["ours"] == row["theirs"]:
                rows.append(row)
                continue
            timers = bare_timer(a[name][1], target), bare_timer(b[name][1], target)
            times = [(timers[0](), timers[1]()) for _ in range(rounds)]
            ratios = [t / o for o, t in times]
            rows.append(
                row
                | {
                    "ours_us": (min(o for o, _ in times), max(o for o, _ in times)),
                    "theirs_us": (min(t for _, t in times), max(t for _, t in times)),
                    "ratio": (min(ratios), max(ratios)),
                }
            )
    return rows


def database(target_dir: Path) -> Any:
    """The MetaSchedule JSON database of one target folder (workloads and tuning records, one JSON
    line each), created empty if missing. Its traces name our tensor intrinsics, which loading them
    needs registered."""
    from tvm.s_tir import meta_schedule as ms

    from sherry_export.errors import InputError, one_line
    from tvm_schedules import intrinsics, lut  # noqa: F401  (register the intrinsics on import)

    try:
        return ms.database.JSONDatabase(
            str(target_dir / "database_workload.json"), str(target_dir / "database_tuning_record.json")
        )
    except RuntimeError as error:  # TVM's errors: a line that does not parse, a trace that does not replay
        raise InputError(
            f"the tuning database {target_dir} cannot be loaded ({one_line(error)}): its records are traces "
            "replayed on load, so a record tuned before an edit of a workload or a tensor intrinsic's "
            "description in tvm_schedules/ no longer applies; restore the folder (git checkout "
            f"{target_dir}) or move its two database_*.json files away and re-tune with `sherry tune`"
        ) from error


def workload_module(shape: Shape, isa: str, block: bool = False, formulation: str = "plane") -> Any:
    """The M = 1 workload (``block``: the block function's, M = ``kernels.BLOCK_M``) as MetaSchedule
    tunes it and the database keys it (structural hash). The ``lut`` formulation tunes its M = 1
    function only (its block function runs that loop nest per row, lut.py)."""
    import tvm

    if formulation == "lut":
        if block:
            raise ValueError("the lut formulation has no block function of its own to tune")
        from tvm_schedules import lut

        return tvm.IRModule({"main": lut.workload(lut.LutShape(shape.k, shape.n, shape.group_size, isa=isa))})
    from tvm_schedules.kernels import BLOCK_M, workload

    return tvm.IRModule({"main": workload(shape, BLOCK_M if block else 1, isa)})


def check_formulation(formulation: str, fmt: str, isa: str) -> None:
    """A ValueError unless ``formulation`` exists for ``fmt`` on ``isa`` (the LUT kernel: sherry, on the ISAs
    of ``lut.LUT_ISAS``)."""
    from tvm_schedules.lut import FORMULATIONS, LUT_FORMAT, LUT_ISAS

    if formulation not in FORMULATIONS:
        raise ValueError(f"unknown formulation {formulation!r}; choose {', '.join(FORMULATIONS)}")
    if formulation == "lut" and (fmt != LUT_FORMAT or isa not in LUT_ISAS):
        raise ValueError(
            f"the lut formulation is a {LUT_FORMAT} kernel for {' and '.join(LUT_ISAS)}, not {fmt} on {isa}: "
            "tune other formats and targets with --formulation plane"
        )


def best_record(db: Any, shape: Shape, isa: str, block: bool = False, formulation: str = "plane") -> Any:
    """The database's fastest record for this kernel (``block``: its block function), or None. Looks
    first, so that a miss does not add the workload to the (committed) database file."""
    mod = workload_module(shape, isa, block, formulation)
    if not db.has_workload(mod):
        return None
    records = db.get_top_k(db.commit_workload(mod), 1)
    return records[0] if records else None


def in_process_builder_runner(number: int = 20, repeat: int = 5, min_repeat_ms: int = 10) -> tuple[Any, Any]:
    """A MetaSchedule builder and runner that compile and time the candidates in this process.

    MetaSchedule's LocalBuilder restarts its worker pool for every batch and exports each candidate
    to a shared library: about 4 s per candidate on this 2-core machine, where ``tvm.compile`` of
    one takes about 0.1 s. The runner times as the hand-written kernel is timed: one thread
    (``TVM_NUM_THREADS=1``), hot; ``repeat`` times the mean of ``number`` calls (at least
    ``min_repeat_ms``), on random inputs (the kernels have no data-dependent branches)."""
    import tvm
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    built: dict[str, Any] = {}

    @derived_object
    class InProcessBuilder(ms.builder.PyBuilder):
        def build(self, build_inputs: list) -> list:
            results = []
            for item in build_inputs:
                try:
                    key = f"in-process:{len(built)}"
                    built[key] = tvm.compile(item.mod, target=item.target)
                    results.append(ms.builder.BuilderResult(key, None))
                except Exception as e:  # a candidate that does not compile is a failed trial
                    results.append(ms.builder.BuilderResult(None, str(e)))
            return results

    @derived_object
    class Finished(ms.runner.PyRunnerFuture):
        def __init__(self, result: Any) -> None:
            super().__init__()
            self.res = result

        def done(self) -> bool:
            return True

        def result(self) -> Any:
            return self.res

    @derived_object
    class InProcessRunner(ms.runner.PyRunner):
        def run(self, runner_inputs: list) -> list:
            futures = []
            rng = np.random.default_rng(0)
            for item in runner_inputs:
                try:
                    lib = built.pop(item.artifact_path)
                    args = []
                    for info in item.args_info:
                        _, dtype, shape = info.as_json()
                        data = rng.integers(0, 4, size=[int(d) for d in shape]).astype(str(dtype))
                        args.append(tvm.runtime.tensor(data))
                    timer = lib.mod.time_evaluator(
                        "main", tvm.cpu(), number=number, repeat=repeat, min_repeat_ms=min_repeat_ms
                    )
                    futures.append(Finished(ms.runner.RunnerResult([float(t) for t in timer(*args).results], None)))
                except Exception as e:  # a candidate that fails to run is a failed trial
                    futures.append(Finished(ms.runner.RunnerResult(None, str(e))))
            return futures

    return InProcessBuilder(), InProcessRunner()


def _progress_callback(bar: Any) -> Any:
    """A measure callback that advances ``bar`` by each batch of measured candidates and shows the
    best time so far (MetaSchedule's own progress goes to log files)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def __init__(self) -> None:
            super().__init__()
            self.best = float("inf")

        def apply(self, task_scheduler: Any, task_id: int, candidates: Any, builds: Any, runs: Any) -> None:
            for run in runs:
                if run.error_msg is None and run.run_secs:
                    self.best = min(self.best, statistics.mean(float(t) for t in run.run_secs) * 1e6)
            bar.update(len(runs))
            bar.set_postfix_str(f"best {self.best:.1f} µs")

    return Progress()


def reset_meta_schedule_logger() -> None:
    """Ready MetaSchedule's logger for one more ``tune_tir``: every run configures it afresh and lists
    the handlers it already has by name, so the handlers of an earlier run (whose log file belongs to
    that run) and unnamed ones a host added (pytest's log capture) are closed and dropped first, or a
    second search in one process fails inside MetaSchedule's set-up. Its level stays at WARNING: the
    bars show the progress, and every ``tune_tir`` would otherwise log each trial at DEBUG."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.WARNING)


def _search(mod: Any, space: Any, budget: int, desc: str, target: Any, db: Any, model: Any, work: Path | None) -> int:
    """One MetaSchedule search of ``mod`` over the design space ``space`` (a ``ScheduleFn`` generator),
    ``budget`` trials, into ``db``; returns the candidates measured. ``work``: keep its logs there."""
    from tqdm import tqdm
    from tvm.s_tir import meta_schedule as ms

    builder, runner = in_process_builder_runner()
    reset_meta_schedule_logger()
    with tqdm(total=budget, desc=desc, unit="trial") as bar, tempfile.TemporaryDirectory() as scratch:
        ms.tune_tir(
            mod,
            target,
            str(work) if work else scratch,  # MetaSchedule's logs; the records go to `db`
            max_trials_global=budget,
            num_trials_per_iter=min(budget, TRIALS_PER_ITER),
            space=ms.space_generator.ScheduleFn(
                space, sch_rules=[], postprocs=[], mutator_probs={ms.mutator.MutateTileSize(): 1.0}
            ),
            strategy=ms.search_strategy.EvolutionarySearch(population_size=64, init_min_unmeasured=16),
            builder=builder,
            runner=runner,
            database=db,
            cost_model=model,
            # no RemoveBuildArtifact: the in-process builder writes no files
            measure_callbacks=[
                ms.measure_callback.AddToDatabase(),
                ms.measure_callback.UpdateCostModel(),
                _progress_callback(bar),
            ],
            task_scheduler="round-robin",
            num_tuning_cores=1,
            seed=0,
        )
        return bar.n


FUNCTIONS = ("m1", "mx")
"""What ``sherry tune`` searches per kernel: the M = 1 function and the block function (M >= 16)."""


def tune(
    shapes: list[tuple[int, int, int]],
    target_name: str,
    trials: int,
    out_dir: Path,
    formats: tuple[str, ...] = FORMATS,
    log_dir: Path | None = None,
    functions: tuple[str, ...] = FUNCTIONS,
    formulation: str = "plane",
) -> list[Entry]:
    """Tune every (format, shape) for one target with MetaSchedule, the M = 1 function and the block
    function (``functions``: either alone; the other keeps its database record); appends the measured
    records to ``out_dir/<target>/``'s JSON database, writes the summary ``tuned.json`` and returns its
    entries. ``log_dir``: keep MetaSchedule's logs (the cost model's training included) in
    ``log_dir/<target>/<kernel>[-block]/logs/`` instead of a temporary folder. ``formulation``: the
    M = 1 kernel tuned (``lut``: sherry, avx512 or avx2, which has no block function of its own to
    search); an entry of the other formulation for the same kernel is replaced."""
    os.environ.setdefault("TVM_NUM_THREADS", "1")  # time one thread, like the hand-written kernel
    import tvm

    from tvm_schedules import kernels, lut
    from tvm_schedules.kernels import BLOCK_M, block_design_space, block_knob_space, knobs_of

    config, isa = target_config(target_name)
    for f in formats:
        check_formulation(formulation, f, isa)
    if formulation == "lut" and "m1" not in functions:
        raise ValueError("the lut formulation has only an M = 1 function to search: --functions m1")
    design_space = lut.design_space if formulation == "lut" else kernels.design_space

    def knob_space(shape: Shape) -> list:
        if formulation == "lut":
            return lut.knob_space(lut.LutShape(shape.k, shape.n, shape.group_size, isa=isa))
        return kernels.knob_space(shape)

    target = tvm.target.Target(config)
    tdir = out_dir / target_name
    tdir.mkdir(parents=True, exist_ok=True)
    db = database(tdir)
    summary_path = tdir / "tuned.json"
    known = {f.name for f in fields(Entry)}
    required = {f.name for f in fields(Entry) if f.default is MISSING}
    entries = {  # entries of an older layout (other knobs, no database record) are dropped
        (e["format"], e["k"], e["n"], e["group_size"]): e
        for e in load_entries(summary_path)
        if required <= set(e) <= known
    }
    from sherry_export.formats import get_format

    for k, _, gs in shapes:  # a ValueError naming the numbers, as everywhere else
        for f in formats:
            get_format(f).check_geometry(k, gs)
    todo = [Shape(f, k, n, gs) for k, n, gs in shapes for f in formats]
    model = cost_model()  # one for the run: what it learns on one kernel ranks the next one's candidates
    # MetaSchedule's task set-up imports this (about 500 TVMScript functions, 25 s or more): once, here,
    # so that the first kernel's tune_seconds does not count it
    import tvm.s_tir.tensor_intrin

    for i, shape in enumerate(todo):
        if problem := shape.supported():
            print(f"  skip {shape.key}: {problem}")
            continue
        key = (shape.format, shape.k, shape.n, shape.group_size)
        entry = dict(entries.get(key, {}))
        if entry.get("formulation", "plane") != formulation:  # another kernel: none of its numbers hold
            entry = {}
        desc = f"[{i + 1}/{len(todo)}] {target_name} {shape.format} K={shape.k} N={shape.n} {formulation}"
        if "m1" in functions or best_record(db, shape, isa, formulation=formulation) is None:
            start = time.time()
            budget = min(trials, len(knob_space(shape)))  # no more trials than points: the search has converged
            work = log_dir / target_name / shape.key if log_dir else None
            module = workload_module(shape, isa, formulation=formulation)
            measured = _search(module, design_space, budget, desc, target, db, model, work)
            seconds, hand = time.time() - start, handwritten_us(shape.format, shape.k, shape.n, shape.group_size, isa)
            entry |= {"trials": measured, "tune_seconds": round(seconds, 1)}
            entry["hand_us"] = None if hand is None else round(hand, 2)
        best = best_record(db, shape, isa, formulation=formulation)
        if best is None:
            print(f"  {shape.key}: no candidate built and ran")
            continue
        if formulation == "lut":
            knobs = lut.knobs_of(best.trace, lut.LutShape(shape.k, shape.n, shape.group_size, isa=isa))
        else:
            knobs = knobs_of(best.trace)
        tvm_us = statistics.mean(float(t) for t in best.run_secs) * 1e6
        entry |= {
            "format": shape.format,
            "k": shape.k,
            "n": shape.n,
            "group_size": shape.group_size,
            "target": target_name,
            "isa": isa,
            "mcpu": config["mcpu"],
            "tiles": knobs.tiles,
            "unroll": knobs.unroll,
            "order": knobs.order,
            "tvm_us": round(tvm_us, 2),
            "formulation": formulation,
        }
        entry.setdefault("hand_us", None)
        entry.setdefault("trials", 0)  # not searched in this run nor recorded before
        entry.setdefault("tune_seconds", 0.0)
        if "mx" in functions and formulation == "plane":
            start = time.time()
            budget = min(trials, len(block_knob_space(shape)))
            work = log_dir / target_name / f"{shape.key}-block" if log_dir else None
            measured = _search(
                workload_module(shape, isa, block=True),
                block_design_space,
                budget,
                desc + " block",
                target,
                db,
                model,
                work,
            )
            entry |= {"block_trials": measured, "block_tune_seconds": round(time.time() - start, 1)}
        block = best_record(db, shape, isa, block=True) if formulation == "plane" else None
        if block is not None:
            bk = knobs_of(block.trace)
            block_us = statistics.mean(float(t) for t in block.run_secs) * 1e6
            entry |= {
                "block_tiles": bk.tiles,
                "block_unroll": bk.unroll,
                "block_order": bk.order,
                "block_rows": bk.rows,
                "block_tvm_us": round(block_us, 2),
            }
        entries[key] = asdict(Entry(**entry))
        summary_path.write_text(json.dumps(sorted(entries.values(), key=_order), indent=1) + "\n")
        trained = f"trained on {model.last_train_size}" if model.booster is not None else "not trained on any"
        hand = entry["hand_us"]
        blocks = f"; block function {bk} {block_us:.1f} µs per {BLOCK_M} rows" if block is not None else ""
        print(
            f"  {shape.key}: {formulation} {knobs} tvm {tvm_us:.1f} µs, hand-written {isa} "
            f"{hand if hand is not None else float('nan'):.1f} µs{blocks} "
            f"({COST_MODEL} cost model {trained} of the run's {model.data_size} measured candidates)"
        )
    return [Entry(**e) for e in load_entries(summary_path)]


def _order(e: dict) -> tuple:
    return (e["format"], e["k"], e["n"], e["group_size"])


def load_entries(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def parse_shape(text: str) -> tuple[int, int]:
    k, _, n = text.lower().partition("x")
    if not (k.isdigit() and n.isdigit()):
        raise argparse.ArgumentTypeError(f"shape must be KxN (e.g. 2048x512), got {text!r}")
    return int(k), int(n)


def print_comparison(rows: list[dict], other_dir: Path) -> None:
    print(f"| kernel | function | ours | {other_dir} | ours µs | theirs µs | theirs / ours |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "ratio" not in r:
            print(f"| {r['kernel']} | {r['function']} | {r['ours']} | the same | | | 1 |")
            continue
        (o1, o2), (t1, t2), (q1, q2) = r["ours_us"], r["theirs_us"], r["ratio"]
        times = f"{o1:.1f}-{o2:.1f} | {t1:.1f}-{t2:.1f} | {q1:.3f}-{q2:.3f}"
        print(f"| {r['kernel']} | {r['function']} | {r['ours']} | {r['theirs']} | {times} |")
    timed = [r["ratio"] for r in rows if "ratio" in r]
    spread = f"theirs / ours from {min(q for q, _ in timed):.3f} to {max(q for _, q in timed):.3f}" if timed else ""
    print(f"{len(rows)} functions, {len(timed)} with other knobs (timed); {spread} (above 1: ours faster)")


def cmd_tune(args: argparse.Namespace) -> int:
    if args.compare_with:
        print_comparison(compare(args.target, args.output, args.compare_with), args.compare_with)
        return 0
    if args.verify:
        entries = verify(args.target, args.output)
        faster = [e for e in entries if verified_faster(e)]
        faster_batch = [e for e in entries if verified_faster_batch(e)]
        for e in entries:
            print(
                f"  {e['format']} {e['k']}x{e['n']}: tvm {e['tvm_node_us']} / {e['tvm_cold_us']} / "
                f"{e['tvm_batch_us']} µs, hand-written {e['isa']} {e['hand_node_us']} / {e['hand_cold_us']} / "
                f"{e['hand_batch_us']} µs (onnxruntime nodes, M=1 hot / cold / M={BATCH_ROWS} hot)"
            )
        print(
            f"{len(faster)} of {len(entries)} TVM kernels are {AUTO_MIN_SPEEDUP}x faster or more at M=1 hot and cold, "
            f"{len(faster_batch)} at "
            f"M={BATCH_ROWS}; after `make lib`, auto uses those on this CPU model ({entries[0].get('cpu')}), the "
            f"batch ones for calls of {BATCH_MIN_ROWS} rows or more"
        )
        return 0
    shapes: list[tuple[int, int, int]] = []
    if args.model:
        shapes += model_shapes(args.model)
    shapes += [(k, n, args.group_size) for k, n in args.shapes or []]
    if not shapes:
        shapes = [(k, n, args.group_size) for k, n in LLAMA_1B_SHAPES]
    start = time.time()
    entries = tune(
        sorted(set(shapes)),
        args.target,
        args.trials,
        args.output,
        tuple(args.formats),
        args.log_dir,
        tuple(args.functions),
        args.formulation,
    )
    print(
        f"tuned {len(entries)} kernels for {args.target} in {time.time() - start:.0f} s; "
        f"database: {args.output / args.target / 'tuned.json'}"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: sherry tune --shapes 2048x2048 --target native --trials 8 -o tvm_schedules/databases",
    )
    p.add_argument("--model", type=Path, help="a packed model folder: tune its projections' shapes")
    p.add_argument("--shapes", nargs="+", type=parse_shape, metavar="KxN", help="shapes (default: LLaMA-3.2-1B's)")
    p.add_argument("--group-size", type=int, default=128, help="scale group size of --shapes (default: 128)")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS), help="formats (default: all)")
    p.add_argument("--target", default="native", choices=["native", *TARGETS], help="TVM target (default: native)")
    p.add_argument(
        "--trials",
        type=int,
        default=32,
        help="MetaSchedule trials (candidates built and timed) per kernel, at most the design space's size "
        "(at most 64 points; 24 for sherry and i2s at the LLaMA shapes, 8 for tl2) (default: 32)",
    )
    p.add_argument(
        "--functions",
        nargs="+",
        choices=FUNCTIONS,
        default=list(FUNCTIONS),
        help="what to search: m1 (the M = 1 function) and mx (the block function, M >= 16; up to 72 points); "
        "one left out keeps its database record (default: both)",
    )
    p.add_argument(
        "--formulation",
        choices=["plane", "lut"],
        default="plane",
        help="the M = 1 kernel: plane (decoded weight planes, every format) or lut (activation lookup tables "
        "on the 1.25-bit sherry layout, --formats sherry, targets avx512 and avx2; its block functions run the "
        "M = 1 loop nest per row and are not searched); the kernel's tuned.json entry records it (default: plane)",
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="database directory (one folder per target)")
    p.add_argument(
        "--log-dir",
        type=Path,
        help="keep MetaSchedule's logs here (LOG_DIR/<target>/<kernel>/logs/, with the xgb cost model's training) "
        "instead of a temporary folder",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="after `make lib` from this database: time each tuned kernel against the hand-written one as "
        f"onnxruntime nodes, M=1 hot and cold and M={BATCH_ROWS} hot, and record it; auto mode uses a TVM kernel "
        f"for M=1 only where it is at least {AUTO_MIN_SPEEDUP}x faster in both, and for calls of "
        f"{BATCH_MIN_ROWS} rows or more where it is at least that much faster at M={BATCH_ROWS}",
    )
    p.add_argument(
        "--compare-with",
        type=Path,
        metavar="DIR",
        help="instead of tuning: time this database's kernels (-o) against the same kernels of the database in DIR "
        "(e.g. tvm_schedules/databases, the committed one), bare, hot, one thread, alternating, 3 rounds, and print "
        "the ratios: is what you tuned on this CPU as fast as what ships?",
    )
    p.set_defaults(func=cmd_tune)
