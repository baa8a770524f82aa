"""Time onnxruntime's MatMulNBits (2-bit, block 128, accuracy_level 4) on LLaMA-3.2-1B shapes.

The comparison point for the AVX-512 Sherry/TL2/I2S kernels (kernel_check_avx512.cc prints the same
table for them). Hot: one node, the same weights every call. Cold: a model of many nodes with
distinct weights (> 1.5 GB in all), each node reading A; time per node = run time / nodes.
Run: .venv/bin/python custom_ops/tests/bench_matmulnbits_avx512.py [--cold-bytes 1.6e9] [--m 1 128] [--no-cold]
"""

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = [(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048)]
BLOCK = 128


def model(k: int, n: int, m: int, nodes: int, rng: np.random.Generator) -> bytes:
    inits, outs, graph_nodes = [], [], []
    for i in range(nodes):
        b = rng.integers(0, 256, size=(n, k // BLOCK, BLOCK * 2 // 8), dtype=np.uint8)
        s = (rng.random(n * k // BLOCK, dtype=np.float32) * 0.01 + 0.001).astype(np.float32)
        inits += [numpy_helper.from_array(b, f"B{i}"), numpy_helper.from_array(s, f"S{i}")]
        graph_nodes.append(helper.make_node("MatMulNBits", ["A", f"B{i}", f"S{i}"], [f"Y{i}"], domain="com.microsoft",
                                            K=k, N=n, bits=2, block_size=BLOCK, accuracy_level=4))
        outs.append(helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, [m, n]))
    g = helper.make_graph(graph_nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])], outs, inits)
    mp = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    mp.ir_version = 10
    return mp.SerializeToString()


def time_model(blob: bytes, k: int, m: int, reps: int) -> tuple[float, float]:
    """(median, min) seconds per run."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(1).standard_normal((m, k), dtype=np.float32)
    io = sess.io_binding()
    io.bind_cpu_input("A", a)
    for o in sess.get_outputs():
        io.bind_output(o.name, "cpu")
    for _ in range(3):
        sess.run_with_iobinding(io)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run_with_iobinding(io)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cold-bytes", type=float, default=1.6e9)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--m", type=int, nargs="*", default=[1, 128])
    ap.add_argument("--no-cold", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'K':>5} {'N':>5} {'M':>4} {'hot us':>9} {'hot min':>9} {'cold us':>9} {'cold GB/s':>9}")
    for m in args.m:
        for k, n in SHAPES:
            wbytes = n * k // 4 + n * k // BLOCK * 4
            hot, hot_min = (t * 1e6 for t in time_model(model(k, n, m, 1, rng), k, m, args.reps))
            if args.no_cold:
                print(f"{k:5d} {n:5d} {m:4d} {hot:9.1f} {hot_min:9.1f}", flush=True)
                continue
            nodes = max(2, int(args.cold_bytes // wbytes)) if m == 1 else max(2, int(2e8 // wbytes))
            cold = time_model(model(k, n, m, nodes, rng), k, m, max(5, args.reps // 20))[0] * 1e6 / nodes
            print(f"{k:5d} {n:5d} {m:4d} {hot:9.1f} {hot_min:9.1f} {cold:9.1f} {wbytes / cold / 1e3:9.2f}", flush=True)


if __name__ == "__main__":
    main()
