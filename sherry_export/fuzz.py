"""Fuzz the ``ai.sherry`` ops as a hostile user would: seeded mutations of single-node models.

Each case starts from a valid one-node model of an ``ai.sherry`` op (random format of the registry,
geometry, weights, bias and input) and applies a few mutations: attributes (values, types, missing
ones), shapes and dtypes of the initializers, packed bytes, scales, the input fed at run time, the
graph's structure (weights fed as inputs, inputs missing or extra) and the session config (kernel
path, threads). The case then runs in a child process (forked, so onnxruntime is imported once)
with a wall-time limit and a memory limit, and is classified:

* ``equal``: the op accepted it and agrees with the numpy reference
  (:func:`sherry_export.formats.reference_matmul` with ``activations="int8"``, the kernels' numerics);
* ``clean-error``: session creation or the run raised an error with a message;
* ``wrong``: the op accepted it but the answer differs from the reference, or the reference rejects
  what the op accepted;
* ``crash``: the child died (a signal, a sanitizer report, no result);
* ``hang``: it ran past the time limit;
* ``oom``: it ran past the memory limit, or reported running out of memory.

Anything but ``equal`` and ``clean-error`` is written to the corpus directory as a reproducer (an
``.npz`` holding the model bytes, the inputs and the session settings); ``--replay`` runs such files
again (``tests/fuzz_corpus/`` holds the ones found so far, and a test replays them).

    python -m sherry_export.fuzz --cases 10000 --seed 1 --library build/custom_ops/libsherry_ops.so

For a sanitizer build, preload the sanitizer runtimes (``make fuzz-asan`` does): the harness then
skips ``RLIMIT_AS`` (AddressSanitizer reserves terabytes of address space) and limits the child's
resident memory by polling it instead. Both limits count what the case adds: the forked child starts
with its parent's address space and resident pages (a test process that has loaded torch and TVM
already holds about 2 GiB), so the limits sit that far above the parent's size at the fork.
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import json
import os
import resource
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from sherry_export.formats import (
    FORMATS,
    MAX_GROUP_SIZE,
    SHERRY_DECODE,
    PackedWeight,
    WeightFormat,
    pack,
    reference_matmul,
)
from sherry_export.onnx_ops import matmul_model
from sherry_export.quant import Ternary
from sherry_export.runtime import KERNEL_CONFIG_KEY, get_library_path
from sherry_export.ternary import SHERRY_BLOCK

OUTCOMES = ("equal", "clean-error", "wrong", "crash", "hang", "oom")
GOOD_OUTCOMES = ("equal", "clean-error")
NODE = "sherry_matmul"  # the node name matmul_model gives
TOLERANCE = 1e-5  # of the output's scale, as tests/test_custom_ops.py
DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "tests" / "fuzz_corpus"
OP_FORMATS = {fmt.op_type: name for name, fmt in FORMATS.items()}


@dataclass
class Case:
    """One fuzz case: a model, what is fed to it, and the session settings."""

    model: bytes
    feeds: dict[str, np.ndarray]
    config: dict[str, str] = field(default_factory=dict)
    threads: int = 1
    mutations: list[str] = field(default_factory=list)

    def save(self, path: Path) -> None:
        """Write the case as an ``.npz`` reproducer (no pickles: bytes as uint8 arrays)."""
        settings = {"config": self.config, "threads": self.threads, "mutations": self.mutations}
        arrays = {
            "model": np.frombuffer(self.model, np.uint8),
            "settings": np.frombuffer(json.dumps(settings).encode(), np.uint8),
        }
        arrays.update({f"feed:{name}": value for name, value in self.feeds.items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: Path) -> Case:
        with np.load(path, allow_pickle=False) as data:
            settings = json.loads(data["settings"].tobytes())
            feeds = {key[len("feed:") :]: data[key] for key in data.files if key.startswith("feed:")}
            return cls(data["model"].tobytes(), feeds, settings["config"], settings["threads"], settings["mutations"])


@dataclass(frozen=True)
class Outcome:
    kind: str
    detail: str


# --- valid starting points -------------------------------------------------------------------


def _random_values(rng: np.random.Generator, spec: WeightFormat, n: int, k: int) -> np.ndarray:
    """Uniformly random ternary values the format holds: a format of 3:4 blocks (Sherry's projection) takes
    random 5-bit codes, each a valid block; the others any ternary value."""
    if spec.projection == "sherry":
        return SHERRY_DECODE[rng.integers(0, len(SHERRY_DECODE), (n, k // SHERRY_BLOCK))].reshape(n, k)
    return rng.integers(-1, 2, (n, k)).astype(np.int8)


def _round_down(value: int, multiple: int) -> int:
    """``value`` rounded down to a positive multiple of ``multiple``."""
    return max(multiple, value - value % multiple)


def base_case(rng: np.random.Generator) -> tuple[Case, PackedWeight]:
    """A valid single-node model with random format, geometry, weights, bias and input."""
    fmt = str(rng.choice(list(FORMATS)))
    spec = FORMATS[fmt]
    k = _round_down(int(rng.choice([rng.integers(1, 80), rng.integers(1, 700), 2048])), spec.k_multiple)
    choices = [1, 2, 3, 5, 7, 8, 12, 16, 32, 64, 128, k, int(rng.integers(1, k + 1))]
    group_size = _round_down(min(int(rng.choice(choices)), k), spec.group_multiple)
    n = int(rng.choice([1, 2, 17, 33, int(rng.integers(1, 160))]))
    values = _random_values(rng, spec, n, k)
    groups = -(-k // group_size)
    scales = (rng.random((n, groups)) * 2).astype(np.float32)
    packed = pack(fmt, Ternary(values, scales), group_size)  # type: ignore[arg-type]
    bias = rng.standard_normal(n).astype(np.float32) if rng.random() < 0.5 else None
    shapes = [[1], [int(rng.integers(1, 9))], [2, 3], [int(rng.integers(1, 70))], []]
    leading = shapes[int(rng.integers(0, len(shapes)))]
    dims = [f"d{i}" for i in range(len(leading))]
    model = matmul_model(packed, bias, dims)
    x = (rng.standard_normal((*leading, k)) * float(rng.choice([1e-3, 1, 30]))).astype(np.float32)
    config = {KERNEL_CONFIG_KEY: str(rng.choice(["auto", "scalar", "avx2", "avx512"]))}
    case = Case(model.SerializeToString(), {"A": x}, config, int(rng.choice([1, 1, 2, 3])))
    return case, packed


# --- mutations --------------------------------------------------------------------------------

INTERESTING_INTS = [0, -1, 1, 2, 3, 4, 5, 7, 8, 127, 128, 255, 256, 2**15, 2**16, 2**31 - 1, 2**31, 2**32,
                    2**40, 2**62, 2**63 - 1, -(2**63), MAX_GROUP_SIZE, MAX_GROUP_SIZE + 1, MAX_GROUP_SIZE + 4]


def _initializer(model: onnx.ModelProto, suffix: str) -> onnx.TensorProto | None:
    return next((i for i in model.graph.initializer if i.name == f"{NODE}.{suffix}"), None)


def _replace(model: onnx.ModelProto, suffix: str, array: np.ndarray) -> None:
    init = _initializer(model, suffix)
    if init is not None:
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), init.name))


def _array(model: onnx.ModelProto, suffix: str) -> np.ndarray | None:
    init = _initializer(model, suffix)
    return None if init is None else numpy_helper.to_array(init)


def _node(model: onnx.ModelProto) -> onnx.NodeProto:
    return model.graph.node[0]


def mutate_attribute(rng: np.random.Generator, model: onnx.ModelProto, case: Case) -> str:
    attrs = _node(model).attribute
    name = str(rng.choice(["K", "N", "group_size"]))
    current = next((a for a in attrs if a.name == name), None)
    old = current.i if current is not None else 1
    how = int(rng.integers(0, 6))
    if current is not None:
        attrs.remove(current)
    if how == 0:
        return f"drop attribute {name}"
    if how == 1:
        value: object = float(old) if rng.random() < 0.5 else str(old)
    elif how == 2:
        value = [old, old]
    elif how == 3:
        value = int(rng.choice(INTERESTING_INTS))
    else:
        value = max(old + int(rng.choice([-4, -3, -1, 1, 3, 4])), -5)
    attrs.append(helper.make_attribute(name, value))
    return f"attribute {name}={value!r}"


def mutate_shape(rng: np.random.Generator, model: onnx.ModelProto, case: Case) -> str:
    which = str(rng.choice(["B", "scales", "bias"]))
    array = _array(model, which)
    if array is None:
        return f"no {which} to reshape"
    how = int(rng.integers(0, 5))
    if how == 0:
        array = array.reshape(-1)
    elif how == 1:
        array = array[: max(array.shape[0] - 1, 0)] if rng.random() < 0.5 else np.concatenate([array, array[:1]])
    elif how == 2 and array.ndim == 2:
        array = array[:, :-1] if rng.random() < 0.5 else np.concatenate([array, array[:, :1]], axis=1)
    elif how == 3:
        array = array.reshape(1, *array.shape)
    else:
        array = array[:0]
    _replace(model, which, array)
    return f"{which} shape {array.shape}"


def mutate_dtype(rng: np.random.Generator, model: onnx.ModelProto, case: Case) -> str:
    which = str(rng.choice(["B", "scales", "bias", "A"]))
    dtype = rng.choice([np.int8, np.uint16, np.float16, np.float32, np.float64, np.int64, np.bool_])
    if which == "A":
        case.feeds["A"] = case.feeds["A"].astype(dtype)
        model.graph.input[0].type.tensor_type.elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        return f"A dtype {np.dtype(dtype)}"
    array = _array(model, which)
    if array is None:
        return f"no {which} to retype"
    _replace(model, which, array.astype(dtype))
    return f"{which} dtype {np.dtype(dtype)}"


def mutate_bytes(rng: np.random.Generator, model: onnx.ModelProto, case: Case) -> str:
    data = _array(model, "B")
    if data is None or data.size == 0 or data.dtype != np.uint8:
        return "no B bytes"
    data = data.copy()
    flat = data.reshape(-1)
    how = int(rng.integers(0, 4))
    if how == 0:
        picks = rng.integers(0, flat.size, int(rng.integers(1, 8)))
        flat[picks] ^= rng.integers(1, 256, picks.size).astype(np.uint8)
    elif how == 1:
        flat[:] = rng.integers(0, 256, flat.size).astype(np.uint8)
    elif how == 2:
        flat[:] = int(rng.choice([0x00, 0xFF, 0xAA, 0x55, 0xEE]))
    else:
        flat[-1] = int(rng.integers(0, 256))  # padding nibbles, sign bits and lanes live at the end
    _replace(model, "B", data)
    return f"B bytes ({['flips', 'random', 'constant', 'last byte'][how]})"


def mutate_scales(rng: np.random.Generator, model: onnx.ModelProto, case: Case) -> str:
    scales = _array(model, "scales")
    if scales is None or scales.size == 0 or scales.dtype != np.float16:
        return "no scales"
    scales = scales.copy()
    special = np.array(rng.choice([np.nan, np.inf, -np.inf, -1.0, 0.0, 6e-8, 65504.0], scales.size), np.float16)
    mask = rng.random(scales.size) < float(rng.choice([0.05, 0.5, 1.0]))
    scales.reshape(-1)[mask] = special[mask]
    _replace(model, "scales", scales)
    return "scales specials"


def mutate_input(rng: np.random.Generator, model: onnx.ModelProto, case: Case) -> str:
    x = case.feeds["A"]
    if x.ndim == 0:  # an earlier mutation fed a scalar
        x = x.reshape(1)
    how = int(rng.integers(0, 6))
    if how == 0 and x.size:
        x = x.copy()
        special = rng.choice([np.nan, np.inf, -np.inf, 3e38, -3e38, 1e-45, 0.0], x.size).astype(np.float32)
        mask = rng.random(x.size) < float(rng.choice([0.01, 0.3, 1.0]))
        x.reshape(-1)[mask] = special[mask].astype(x.dtype)
    elif how == 1:
        x = np.zeros((*x.shape[:-1], max(x.shape[-1] + int(rng.choice([-1, 1, 4])), 0)), x.dtype)
    elif how == 2:
        x = np.zeros((0, x.shape[-1]), x.dtype)
    elif how == 3:
        x = x.reshape(1, 1, *x.shape)
    elif how == 4:
        x = np.zeros((), x.dtype)
    else:
        x = np.repeat(x.reshape(-1, x.shape[-1]) if x.size else x.reshape(1, -1)[:, :0], int(rng.integers(2, 5)), 0)
    case.feeds["A"] = x
    for value in model.graph.input:  # let every shape through to the op
        if value.name == "A":
            value.type.tensor_type.ClearField("shape")
    return f"A shape {x.shape}"


def mutate_structure(rng: np.random.Generator, model: onnx.ModelProto, case: Case) -> str:
    node = _node(model)
    how = int(rng.integers(0, 6))
    if how <= 1:  # an initializer becomes a graph input, fed at run time
        which = str(rng.choice(["B", "scales", "bias"]))
        init = _initializer(model, which)
        if init is None:
            return f"no {which} to feed"
        model.graph.initializer.remove(init)
        model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, None))
        case.feeds[init.name] = numpy_helper.to_array(init)
        return f"{which} fed at run time"
    if how == 2:  # the optional bias given as an empty name, or dropped
        inputs = list(node.input[:3])
        if rng.random() < 0.5:
            inputs.append("")
        del node.input[:]
        node.input.extend(inputs)
        return "bias omitted"
    if how == 3:  # a missing required input
        inputs = list(node.input)
        del inputs[int(rng.integers(0, min(len(inputs), 3)))]
        del node.input[:]
        node.input.extend(inputs)
        return "a required input missing"
    if how == 4:  # one input too many
        node.input.append(node.input[1])
        return "a fifth input"
    node.output.append("Y2")  # a second output
    model.graph.output.append(helper.make_tensor_value_info("Y2", TensorProto.FLOAT, None))
    return "a second output"


def mutate_config(rng: np.random.Generator, model: onnx.ModelProto, case: Case) -> str:
    how = int(rng.integers(0, 3))
    if how == 0:
        case.config[KERNEL_CONFIG_KEY] = str(rng.choice(["tvm", "bogus", "", "AVX2", "scalar ", "avx512"]))
        return f"kernel {case.config[KERNEL_CONFIG_KEY]!r}"
    if how == 1:
        case.threads = int(rng.choice([1, 2, 4, 8]))
        return f"threads {case.threads}"
    case.config["sherry.kernel_report"] = str(rng.choice(["1", "0", "yes"]))
    return "kernel report"


MUTATIONS: tuple[Callable[[np.random.Generator, onnx.ModelProto, Case], str], ...] = (
    mutate_attribute,
    mutate_shape,
    mutate_dtype,
    mutate_bytes,
    mutate_scales,
    mutate_input,
    mutate_structure,
    mutate_config,
)


def make_case(seed: int, index: int) -> Case:
    """Case ``index`` of campaign ``seed``: a valid model with 0-3 random mutations (the same every time)."""
    rng = np.random.default_rng([seed, index])
    case, _ = base_case(rng)
    model = onnx.load_from_string(case.model)
    for _ in range(int(rng.choice([0, 1, 1, 2, 3]))):
        mutation = MUTATIONS[int(rng.integers(0, len(MUTATIONS)))]
        with np.errstate(invalid="ignore", over="ignore"):  # NaN and huge values cast to other dtypes
            case.mutations.append(mutation(rng, model, case))
    case.model = model.SerializeToString()
    return case


# --- the reference ------------------------------------------------------------------------------


def reference_output(case: Case) -> np.ndarray:
    """What the op should give for an accepted case; ValueError when the model is not a valid op."""
    model = onnx.load_from_string(case.model)
    if len(model.graph.node) != 1:
        raise ValueError(f"expected one node, got {len(model.graph.node)}")
    node = model.graph.node[0]
    fmt = OP_FORMATS.get(node.op_type)
    if fmt is None:
        raise ValueError(f"unknown op {node.op_type}")
    attrs = {a.name: a for a in node.attribute}
    ints = {}
    for name in ("K", "N", "group_size"):
        if name not in attrs or attrs[name].type != onnx.AttributeProto.INT:
            raise ValueError(f"attribute {name} is missing or not an int")
        ints[name] = attrs[name].i
    if len(node.input) not in (3, 4) or any(not name for name in node.input[:3]) or len(node.output) != 1:
        raise ValueError("the node must have inputs A, B, scales (and an optional bias) and one output")
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    if node.input[1] not in initializers or node.input[2] not in initializers:
        raise ValueError("B and scales must be initializers")
    values = {**initializers, **case.feeds}
    packed = PackedWeight(fmt, initializers[node.input[1]], initializers[node.input[2]], ints["K"], ints["group_size"])
    if packed.n != ints["N"]:
        raise ValueError(f"N={ints['N']} but B has {packed.n} rows")
    bias = values.get(node.input[3]) if len(node.input) == 4 and node.input[3] else None
    if bias is not None and (bias.dtype != np.float32 or bias.shape != (packed.n,)):
        raise ValueError(f"bias must be float32 [{packed.n}], got {bias.dtype} {bias.shape}")
    x = values[node.input[0]]
    if x.dtype != np.float32 or x.ndim == 0 or x.shape[-1] != packed.k:
        raise ValueError(f"A must be float32 [..., {packed.k}], got {x.dtype} {x.shape}")
    return reference_matmul(x, packed, bias, activations="int8")


def compare(got: np.ndarray, want: np.ndarray) -> str:
    """Empty when ``got`` matches the reference (NaN where it is NaN, else within float rounding)."""
    if got.shape != want.shape or got.dtype != np.float32:
        return f"output {got.dtype} {got.shape}, reference {want.dtype} {want.shape}"
    if not np.array_equal(np.isnan(got), np.isnan(want)):
        return f"NaN at {int((np.isnan(got) != np.isnan(want)).sum())} position(s) where the reference differs"
    finite = np.isfinite(want)
    if not np.array_equal(got[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)]):
        return "infinities differ from the reference"
    if not finite.any():
        return ""
    scale = max(float(np.abs(want[finite]).max()), 1e-6)
    err = float(np.abs(got[finite].astype(np.float64) - want[finite]).max())
    return "" if err <= TOLERANCE * scale else f"max error {err:.3g} over {TOLERANCE:g} x output scale {scale:.3g}"


def evaluate(case: Case, library: str) -> Outcome:
    """Run one case in this process: session, run, compare (the child's work)."""
    options = ort.SessionOptions()
    options.register_custom_ops_library(library)
    options.intra_op_num_threads = case.threads
    options.log_severity_level = 4  # errors come back as exceptions; keep the log quiet
    for key, value in case.config.items():
        options.add_session_config_entry(key, value)
    try:
        session = ort.InferenceSession(case.model, sess_options=options, providers=["CPUExecutionProvider"])
        outputs = session.run(None, case.feeds)
    except MemoryError:
        return Outcome("oom", "MemoryError in Python")
    except Exception as e:  # onnxruntime raises its own exception classes
        message = str(e)
        if "out of memory" in message or "bad_alloc" in message:
            return Outcome("oom", message)
        return Outcome("clean-error" if message.strip() else "wrong", message or "an error without a message")
    try:
        want = reference_output(case)
    except ValueError as e:
        return Outcome("wrong", f"the op accepted a model the reference rejects: {e}")
    problem = compare(np.asarray(outputs[0]), want)
    return Outcome("wrong" if problem else "equal", problem)


# --- the child process --------------------------------------------------------------------------


def _sanitized() -> bool:
    return "libasan" in os.environ.get("LD_PRELOAD", "")


def _vm_kib(pid: int, field_name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def run_case(case: Case, library: str, timeout: float = 30.0, memory_mb: int = 2048) -> Outcome:
    """Run ``case`` in a forked child with a time and a memory limit, and classify what happened."""
    read_fd, write_fd = os.pipe()
    inherited_kib = _vm_kib(os.getpid(), "VmRSS")
    with tempfile.TemporaryFile() as stderr:
        pid = os.fork()
        if pid == 0:  # the child: limits, then evaluate; never returns
            os.close(read_fd)
            os.dup2(stderr.fileno(), 2)
            faulthandler.disable()  # the parent's handler writes to the parent's stderr
            try:
                if not _sanitized():
                    limit = _vm_kib(os.getpid(), "VmSize") * 1024 + memory_mb * 2**20
                    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
                cpu = int(timeout * 2) + 1
                resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
                outcome = evaluate(case, library)
                os.write(write_fd, json.dumps([outcome.kind, outcome.detail[:2000]]).encode())
            finally:
                os._exit(0)
        os.close(write_fd)
        outcome = _wait(pid, read_fd, timeout, memory_mb, inherited_kib)
        if outcome.kind == "crash":
            stderr.seek(0)
            report = stderr.read().decode(errors="replace")
            if "rss limit exhausted" in report or "out of memory" in report.lower():
                return Outcome("oom", report[-2000:])
            return Outcome("crash", f"{outcome.detail}: {report[-2000:]}")
        return outcome


def _wait(pid: int, read_fd: int, timeout: float, memory_mb: int, inherited_kib: int) -> Outcome:
    """Collect the child's report; kill it past ``timeout`` or once its resident memory exceeds what it
    inherited at the fork (``inherited_kib``) by more than ``memory_mb``."""
    start = time.monotonic()
    chunks = []
    os.set_blocking(read_fd, False)
    status = None
    killed = ""
    while status is None:
        try:
            chunk = os.read(read_fd, 65536)
            if chunk:
                chunks.append(chunk)
        except BlockingIOError:
            pass
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = raw
            break
        if time.monotonic() - start > timeout:
            killed = "hang"
        elif _vm_kib(pid, "VmRSS") - inherited_kib > memory_mb * 1024:
            killed = "oom"
        if killed:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        time.sleep(0.002)
    while True:
        try:
            chunk = os.read(read_fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_fd)
    if killed == "hang":
        return Outcome("hang", f"still running after {timeout:g} s")
    if killed == "oom":
        return Outcome("oom", f"resident memory over {memory_mb} MiB")
    assert status is not None
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU:
            return Outcome("hang", "CPU time limit")
        return Outcome("crash", f"killed by {signal.Signals(sig).name}")
    if chunks:
        kind, detail = json.loads(b"".join(chunks))
        return Outcome(kind, detail)
    return Outcome("crash", f"exit status {os.WEXITSTATUS(status)} without a result")


# --- campaigns ----------------------------------------------------------------------------------


def preload(library: str) -> None:
    """Load the library once in the parent, so that every forked child finds it loaded."""
    ctypes.CDLL(library)


def run_campaign(
    cases: int,
    seed: int,
    library: str,
    corpus: Path | None = None,
    timeout: float = 30.0,
    memory_mb: int = 2048,
    progress: Callable[[int, Counter[str]], None] | None = None,
) -> Counter[str]:
    """Run cases ``0..cases-1`` of campaign ``seed``; write every bad one to ``corpus``; return the counts."""
    preload(library)
    counts: Counter[str] = Counter()
    for index in range(cases):
        case = make_case(seed, index)
        outcome = run_case(case, library, timeout, memory_mb)
        counts[outcome.kind] += 1
        if outcome.kind not in GOOD_OUTCOMES:
            mutations = "; ".join(case.mutations)
            print(f"case {index}: {outcome.kind}: {outcome.detail[:300]} [{mutations}]", file=sys.stderr)
            if corpus is not None:
                case.save(corpus / f"{outcome.kind}-s{seed}-c{index}.npz")
        if progress is not None:
            progress(index + 1, counts)
    return counts


def replay(paths: list[Path], library: str, timeout: float = 30.0, memory_mb: int = 2048) -> dict[Path, Outcome]:
    """Run saved reproducers again."""
    preload(library)
    return {path: run_case(Case.load(path), library, timeout, memory_mb) for path in paths}


def format_counts(counts: Counter[str]) -> str:
    total = sum(counts.values())
    lines = [f"{'outcome':<12} {'cases':>8}"]
    lines += [f"{kind:<12} {counts.get(kind, 0):>8}" for kind in OUTCOMES]
    lines.append(f"{'total':<12} {total:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sherry_export.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000, help="number of cases (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="campaign seed: case i of seed s is always the same")
    parser.add_argument("--library", type=Path, help="the op library (default: $SHERRY_OPS_LIBRARY or the built one)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="where reproducers go")
    parser.add_argument("--timeout", type=float, default=30.0, help="wall seconds per case (default 30)")
    parser.add_argument("--memory-mb", type=int, default=2048, help="memory per case, MiB (default 2048)")
    parser.add_argument("--replay", type=Path, nargs="*", help="run these reproducers (files or folders) instead")
    args = parser.parse_args(argv)
    if args.cases < 0 or args.timeout <= 0 or args.memory_mb <= 0:
        parser.error("--cases must be >= 0, --timeout and --memory-mb positive")
    library = str(Path(args.library or get_library_path()).resolve())
    if not Path(library).is_file():
        parser.error(f"--library {library} does not name a file")
    if args.replay is not None:
        paths = [p for entry in args.replay for p in (sorted(entry.glob("*.npz")) if entry.is_dir() else [entry])]
        results = replay(paths, library, args.timeout, args.memory_mb)
        for path, outcome in results.items():
            print(f"{path.name}: {outcome.kind} {outcome.detail[:200]}")
        counts = Counter(outcome.kind for outcome in results.values())
    else:
        started = time.monotonic()

        def progress(done: int, counts: Counter[str]) -> None:
            if done % 500 == 0:
                print(f"{done} cases, {time.monotonic() - started:.0f} s: {dict(counts)}", file=sys.stderr)

        counts = run_campaign(args.cases, args.seed, library, args.corpus, args.timeout, args.memory_mb, progress)
    print(format_counts(counts))
    return 0 if set(counts) <= set(GOOD_OUTCOMES) else 1


if __name__ == "__main__":
    sys.exit(main())
