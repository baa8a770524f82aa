"""``sherry tune``: a sweep over the kernels' knobs, per (format, shape, target), into a database.

The kernels (:mod:`tvm_schedules.kernels`) are TensorIR written per knob point (tiles per step x unroll
of the quad loop, at most 12 points), so tuning compiles every point in process (~0.1 s each) and
times them interleaved, two rounds, with TVM's time evaluator on one thread. Each target directory
of the database holds ``tuned.json``: per shape the best knobs and the TVM kernel's time (the function
alone, M = 1, one thread). ``sherry tune --verify`` (after ``make lib``) adds both kernels' times as
onnxruntime nodes, hot and cold, which is what the op library's auto mode compares. Tuning stays out
of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tvm_schedules.layout import Shape

FORMATS = ("sherry", "tl2", "i2s")
LLAMA_1B_SHAPES = [(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048)]
TARGETS: dict[str, dict] = {
    "avx2": {"kind": "llvm", "mcpu": "x86-64-v3"},
    "avx512": {"kind": "llvm", "mcpu": "x86-64-v4", "mattr": ["+avx512vbmi", "+avx512vnni"]},
}
"""Generic targets; ``native`` is the CPU LLVM detects (``llvm_get_system_cpu``). avx512 adds VBMI (vpermb)
and VNNI (vpdpbusd), which the op's AVX-512 path requires anyway."""


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
    unroll: int
    tvm_us: float
    hand_us: float | None
    trials: int
    tune_seconds: float
    tvm_node_us: float | None = None
    """The TVM kernel as one onnxruntime node (M = 1, one thread, hot), from ``sherry tune --verify``."""
    hand_node_us: float | None = None
    """The hand-written kernel of the same ISA, timed interleaved with ``tvm_node_us`` the same way."""
    tvm_cold_us: float | None = None
    """As ``tvm_node_us``, with cold weights (a graph of distinct copies)."""
    hand_cold_us: float | None = None


def knob_space(shape: Shape) -> list[Any]:
    """Every knob point of a shape (tiles x unroll, at most 12)."""
    from tvm_schedules.kernels import Knobs, tile_choices, unroll_choices

    return [Knobs(t, u) for t in tile_choices(shape) for u in unroll_choices(shape)]


def time_kernel(lib: Any, shape: Shape, number: int = 20, repeat: int = 7) -> list[float]:
    """Seconds per call of ``lib['main']`` (M = 1) on random inputs, ``repeat`` medians of ``number``."""
    import tvm

    from tvm_schedules.layout import TILE

    rng = np.random.default_rng(0)
    args = [
        rng.integers(-127, 128, size=(1, shape.row_bytes)).astype(np.int8),
        rng.standard_normal((1, shape.row_bytes // 4)).astype(np.float32),
        rng.integers(0, 32, size=(shape.tiles, shape.quads, 64)).astype(np.uint8),
        rng.standard_normal((shape.tiles, shape.groups, TILE)).astype(np.float32),
        np.zeros((1, shape.n), np.float32),
    ]
    timer = lib.mod.time_evaluator("main", tvm.cpu(), number=number, repeat=repeat, min_repeat_ms=10)
    return [float(t) for t in timer(*(tvm.runtime.tensor(a) for a in args)).results]


def node_us(
    fmt: str, k: int, n: int, gs: int, kernels: tuple[str, ...], cold: bool = False, runs: int = 100
) -> list[float] | None:
    """Median µs of one ``fmt`` node (M = 1, one thread, onnxruntime profiler) on each kernel path of
    ``kernels`` (e.g. ``("tvm", "avx512")``), sessions run interleaved so load hits each alike. Cold:
    a graph of distinct weight copies (``COLD_BYTES`` in all), so every node reads from memory.
    None when a path cannot run (the library is not built, this CPU lacks the ISA, no tuned kernel)."""
    import torch

    from sherry_export.bench import COLD_BYTES, cold_copies, kernel_events, read_profile, replicate
    from sherry_export.formats import pack
    from sherry_export.onnx_ops import matmul_model
    from sherry_export.quant import absmean_ternarize, sherry_ternarize
    from sherry_export.runtime import make_session

    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    ternary = sherry_ternarize(weight, gs) if fmt == "sherry" else absmean_ternarize(weight, gs)
    packed = pack(fmt, ternary, gs)
    copies = cold_copies(COLD_BYTES, packed.data.nbytes + packed.scales.nbytes) if cold else 1
    model = replicate(matmul_model(packed, leading_dims=(1,)), copies)
    calls = max(2, runs // copies)
    a = np.random.default_rng(0).standard_normal((1, k), dtype=np.float32)
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


def verified_faster(entry: dict) -> bool:
    """Auto mode's rule: the TVM kernel beat the hand-written one as an onnxruntime node, hot and cold."""
    pairs = [(entry.get(f"tvm_{m}_us"), entry.get(f"hand_{m}_us")) for m in ("node", "cold")]
    return all(t is not None and h is not None and t < h for t, h in pairs)


def verify(target_name: str, out_dir: Path) -> list[dict]:
    """Time every database entry of ``target_name`` as an onnxruntime node, TVM against the hand-written
    kernel of the same ISA, interleaved, with the op library as built now (``make lib`` from this
    database first). The op's auto mode takes a TVM kernel only where this node-level comparison says
    it is faster: the tuning times alone compare a bare function with a whole node."""
    from tqdm import tqdm

    summary_path = out_dir / target_name / "tuned.json"
    entries = load_entries(summary_path)
    if not entries:
        raise FileNotFoundError(f"{summary_path} has no entries: run `sherry tune --target {target_name}` first")
    os.environ["SHERRY_TVM_TARGET"] = target_name  # the forced tvm path runs this target's objects
    try:
        for e in tqdm(entries, desc=f"verify {target_name}", unit="kernel"):
            for mode in ("node", "cold"):
                times = node_us(e["format"], e["k"], e["n"], e["group_size"], ("tvm", e["isa"]), cold=mode == "cold")
                e[f"tvm_{mode}_us"], e[f"hand_{mode}_us"] = (None, None) if times is None else times
            summary_path.write_text(json.dumps(sorted(entries, key=_order), indent=1) + "\n")
    finally:
        del os.environ["SHERRY_TVM_TARGET"]
    return entries


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
    from tqdm import tqdm

    from tvm_schedules.kernels import scheduled_module

    config, isa = target_config(target_name)
    target = tvm.target.Target(config)
    tdir = out_dir / target_name
    tdir.mkdir(parents=True, exist_ok=True)
    summary_path = tdir / "tuned.json"
    fields = set(Entry.__dataclass_fields__)
    entries = {  # entries of an older layout (other knobs) are dropped
        (e["format"], e["k"], e["n"], e["group_size"]): e for e in load_entries(summary_path) if set(e) <= fields
    }
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
            space = knob_space(shape)
            if trials < len(space):  # a deterministic subset, spread over the space
                space = [space[round(i * (len(space) - 1) / max(trials - 1, 1))] for i in range(trials)]
            libs = [tvm.compile(scheduled_module(shape, 1, kn, isa=isa), target=target) for kn in space]
            # two interleaved rounds, so that load from other jobs hits every candidate alike
            runs: list[list[float]] = [[] for _ in space]
            for _ in range(2):
                for i, lib in enumerate(libs):
                    runs[i] += time_kernel(lib, shape)
            times = [statistics.median(r) * 1e6 for r in runs]
            best = min(range(len(space)), key=times.__getitem__)
            knobs, tvm_us = space[best], times[best]
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
                knobs.tiles,
                knobs.unroll,
                round(tvm_us, 2),
                None if hand is None else round(hand, 2),
                len(space),
                round(seconds, 1),
            )
            entries[(shape.format, shape.k, shape.n, shape.group_size)] = asdict(entry)
            summary_path.write_text(json.dumps(sorted(entries.values(), key=_order), indent=1) + "\n")
            bar.write(
                f"  {shape.key}: tiles={knobs.tiles} unroll={knobs.unroll} tvm {tvm_us:.1f} µs, hand-written {isa} "
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
    if args.verify:
        entries = verify(args.target, args.output)
        faster = [e for e in entries if verified_faster(e)]
        for e in entries:
            print(
                f"  {e['format']} {e['k']}x{e['n']}: tvm {e['tvm_node_us']} / {e['tvm_cold_us']} µs, hand-written "
                f"{e['isa']} {e['hand_node_us']} / {e['hand_cold_us']} µs (onnxruntime nodes, hot / cold)"
            )
        print(f"{len(faster)} of {len(entries)} TVM kernels are faster hot and cold; `make lib` lets auto use those")
        return 0
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
        help="tune the TVM kernels (knob sweep) for a CPU target into a database",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: sherry tune --shapes 2048x2048 --target native --trials 8 -o tvm_schedules/databases",
    )
    p.add_argument("--model", type=Path, help="a packed model folder: tune its projections' shapes")
    p.add_argument("--shapes", nargs="+", type=parse_shape, metavar="KxN", help="shapes (default: LLaMA-3.2-1B's)")
    p.add_argument("--group-size", type=int, default=128, help="scale group size of --shapes (default: 128)")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS), help="formats (default: all)")
    p.add_argument("--target", default="native", choices=["native", *TARGETS], help="TVM target (default: native)")
    p.add_argument("--trials", type=int, default=12, help="knob points timed per kernel (default: 12, all)")
    p.add_argument("-o", "--output", type=Path, required=True, help="database directory (one folder per target)")
    p.add_argument(
        "--verify",
        action="store_true",
        help="after `make lib` from this database: time each tuned kernel against the hand-written one as "
        "onnxruntime nodes, hot and cold, and record it; auto mode uses a TVM kernel only where it is faster in both",
    )
    p.set_defaults(func=cmd_tune)
