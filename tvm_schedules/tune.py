"""``sherry tune``: MetaSchedule over the kernels' knobs, per (format, shape, target), into a database.

The design space is the schedule of :mod:`tvm_schedules.kernels` with its knobs sampled
(``sample_categorical``: vector lanes, unroll), so a few trials cover it. Each target directory of the
database holds MetaSchedule's own JSON database (``ms/``) and ``tuned.json``: per shape the best
knobs, the TVM kernel's time (MetaSchedule's runner, M = 1, one thread) and the hand-written kernel's
time on the same ISA (onnxruntime profiler, one node, M = 1, one thread), which the op library's auto
mode compares. Tuning stays out of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tvm_schedules.layout import Shape

FORMATS = ("sherry", "tl2", "i2s")
LLAMA_1B_SHAPES = [(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048)]
TARGETS: dict[str, dict] = {
    "avx2": {"kind": "llvm", "mcpu": "x86-64-v3"},
    "avx512": {"kind": "llvm", "mcpu": "x86-64-v4"},
}
"""Generic targets; ``native`` is the CPU LLVM detects (``llvm_get_system_cpu``)."""


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
    lanes: int
    unroll: int
    tvm_us: float
    hand_us: float | None
    trials: int
    tune_seconds: float


def _space(shape: Shape) -> Callable[[Any], None]:
    from tvm_schedules.kernels import lane_choices, schedule, unroll_choices

    lanes, unrolls = lane_choices(shape), unroll_choices(shape)

    def sch_fn(sch: Any) -> None:
        lane_rv = sch.sample_categorical(lanes, [1 / len(lanes)] * len(lanes))
        unroll_rv = sch.sample_categorical(unrolls, [1 / len(unrolls)] * len(unrolls))
        schedule(sch, shape, lane_rv, unroll_rv)

    return sch_fn


def _knobs_from_trace(trace: Any) -> list[int]:
    values = []
    for inst in trace.insts:
        if inst.kind.name == "SampleCategorical":
            values.append(int(inst.attrs[0][int(trace.decisions[inst])]))
    return values


def in_process_builder_runner(number: int = 20, repeat: int = 5, min_repeat_ms: int = 20) -> tuple[Any, Any]:
    """A MetaSchedule builder and runner that compile and time in this process (one thread).

    MetaSchedule's LocalBuilder/LocalRunner export every candidate to a shared library in worker
    processes, seconds each on a busy 2-core machine; the kernels here compile in ~0.05 s.
    """
    import tvm
    import tvm.s_tir.meta_schedule as ms
    from tvm.ir.utils import derived_object

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
                except Exception as e:
                    futures.append(Finished(ms.runner.RunnerResult(None, str(e))))
            return futures

    return InProcessBuilder(), InProcessRunner()


def handwritten_us(fmt: str, k: int, n: int, gs: int, isa: str, runs: int = 200) -> float | None:
    """Median µs of the hand-written kernel on ``isa`` (one node, M = 1, one thread, onnxruntime profiler)."""
    import torch

    from sherry_export.formats import pack
    from sherry_export.onnx_ops import matmul_model
    from sherry_export.quant import absmean_ternarize, sherry_ternarize
    from sherry_export.runtime import make_session

    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    ternary = sherry_ternarize(weight, gs) if fmt == "sherry" else absmean_ternarize(weight, gs)
    model = matmul_model(pack(fmt, ternary, gs), leading_dims=(1,))
    a = np.random.default_rng(0).standard_normal((1, k), dtype=np.float32)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            session = make_session(
                model.SerializeToString(),
                threads=1,
                kernel=isa,
                profile_prefix=os.path.join(tmp, "p"),
            )
            for _ in range(runs + 10):
                session.run(None, {"A": a})
            events = json.loads(Path(session.end_profiling()).read_text())
    except Exception as e:  # the library is not built, or this CPU lacks the ISA
        print(f"  (hand-written {isa} not timed: {e})")
        return None
    times = [float(e["dur"]) for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    return statistics.median(times[10:])


def tune(
    shapes: list[tuple[int, int, int]],
    target_name: str,
    trials: int,
    out_dir: Path,
    formats: tuple[str, ...] = FORMATS,
) -> list[Entry]:
    """Tune every (format, shape) for one target; writes ``out_dir/<target>/`` and returns the entries."""
    os.environ.setdefault("TVM_NUM_THREADS", "1")  # time one thread, like the hand-written kernel
    import tvm
    import tvm.s_tir.meta_schedule as ms
    from tqdm import tqdm

    from tvm_schedules.kernels import prim_func

    config, isa = target_config(target_name)
    target = tvm.target.Target(config)
    tdir = out_dir / target_name
    (tdir / "ms").mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(
        str(tdir / "ms" / "database_workload.json"), str(tdir / "ms" / "database_tuning_record.json")
    )
    builder, runner = in_process_builder_runner()
    summary_path = tdir / "tuned.json"
    entries = {(e["format"], e["k"], e["n"], e["group_size"]): e for e in load_entries(summary_path)}
    from sherry_export.formats import get_format

    for k, _, gs in shapes:  # a ValueError naming the numbers, as everywhere else
        for f in formats:
            get_format(f).check_geometry(k, gs)
    todo = [Shape(f, k, n, gs) for k, n, gs in shapes for f in formats]
    with tqdm(todo, desc=f"tune {target_name}", unit="kernel") as bar:
        for shape in bar:
            bar.set_postfix_str(f"{shape.format} K={shape.k} N={shape.n}")
            if problem := shape.supported():
                print(f"  skip {shape.key}: {problem}")
                continue
            start = time.time()
            mod = tvm.IRModule({"main": prim_func(shape, 1)})
            with tempfile.TemporaryDirectory() as work:
                ms.tune_tir(
                    mod,
                    target,
                    work,
                    max_trials_global=trials,
                    num_trials_per_iter=trials,
                    space=ms.space_generator.ScheduleFn(_space(shape), sch_rules=[], postprocs=[], mutator_probs={}),
                    strategy="replay-trace",
                    builder=builder,
                    runner=runner,
                    database=database,
                    cost_model="random",
                    # no RemoveBuildArtifact: the in-process builder keeps no files
                    measure_callbacks=[ms.measure_callback.AddToDatabase(), ms.measure_callback.UpdateCostModel()],
                    task_scheduler="round-robin",
                    num_tuning_cores=1,
                )
            best = database.query_tuning_record(mod, target, "main")
            if best is None:
                print(f"  {shape.key}: no valid candidate")
                continue
            lanes, unroll = _knobs_from_trace(best.trace)
            tvm_us = float(np.median([float(s) for s in best.run_secs])) * 1e6
            seconds = time.time() - start
            hand = handwritten_us(shape.format, shape.k, shape.n, shape.group_size, isa)
            entry = Entry(
                shape.format,
                shape.k,
                shape.n,
                shape.group_size,
                target_name,
                isa,
                config["mcpu"],
                lanes,
                unroll,
                round(tvm_us, 2),
                None if hand is None else round(hand, 2),
                trials,
                round(seconds, 1),
            )
            entries[(shape.format, shape.k, shape.n, shape.group_size)] = asdict(entry)
            summary_path.write_text(json.dumps(sorted(entries.values(), key=_order), indent=1) + "\n")
            bar.write(
                f"  {shape.key}: lanes={lanes} unroll={unroll} tvm {tvm_us:.1f} µs, hand-written {isa} "
                f"{hand if hand is not None else float('nan'):.1f} µs, tuned in {seconds:.0f} s"
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


def cmd_tune(args: argparse.Namespace) -> int:
    shapes: list[tuple[int, int, int]] = []
    if args.model:
        shapes += model_shapes(args.model)
    shapes += [(k, n, args.group_size) for k, n in args.shapes or []]
    if not shapes:
        shapes = [(k, n, args.group_size) for k, n in LLAMA_1B_SHAPES]
    start = time.time()
    entries = tune(sorted(set(shapes)), args.target, args.trials, args.output, tuple(args.formats))
    print(
        f"tuned {len(entries)} kernels for {args.target} in {time.time() - start:.0f} s; "
        f"database: {args.output / args.target / 'tuned.json'}"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tune",
        help="tune the TVM kernels (MetaSchedule) for a CPU target into a database",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: sherry tune --shapes 2048x2048 --target native --trials 8 -o tvm_schedules/databases",
    )
    p.add_argument("--model", type=Path, help="a packed model folder: tune its projections' shapes")
    p.add_argument("--shapes", nargs="+", type=parse_shape, metavar="KxN", help="shapes (default: LLaMA-3.2-1B's)")
    p.add_argument("--group-size", type=int, default=128, help="scale group size of --shapes (default: 128)")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS), help="formats (default: all)")
    p.add_argument("--target", default="native", choices=["native", *TARGETS], help="TVM target (default: native)")
    p.add_argument("--trials", type=int, default=8, help="MetaSchedule trials per kernel (default: 8)")
    p.add_argument("-o", "--output", type=Path, required=True, help="database directory (one folder per target)")
    p.set_defaults(func=cmd_tune)
