"""Running models with the ``ai.sherry`` ops in onnxruntime: where the op library is, and sessions.

The ops live in ``libsherry_ops.so`` (``custom_ops/``), compiled by the package build (``pip install .``,
or ``make lib`` in a checkout) into ``sherry_export/_lib/``; it is never committed. One build serves every
x86-64 CPU: the kernel path is picked at run time.

Which kernel a node runs (``scalar``, ``avx2``, ``avx512``, ``tvm`` or ``auto``, the best the CPU and the
weights allow) is chosen when the session is created. The library reads it from the session config
entry ``sherry.kernel``, else from the environment variable ``SHERRY_KERNEL``, else ``auto``.
:func:`make_session` sets the session config entry when given ``kernel=``, so sessions with different
paths coexist in one process; without it, ``SHERRY_KERNEL`` still applies (handy for benchmarks). A
forced path the CPU lacks, or that does not support a node's weights, fails session creation
rather than silently running another kernel. ``sherry.kernel_report=1`` (or ``SHERRY_KERNEL_REPORT=1``)
prints the path each node got to stderr.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from sherry_export.errors import InputError, check_threads, one_line
from sherry_export.resources import built_library

if TYPE_CHECKING:  # onnx and onnxruntime load in the functions that use them: `import sherry_export` stays fast
    import onnx
    import onnxruntime as ort

LIBRARY_ENV = "SHERRY_OPS_LIBRARY"
"""Environment variable naming another build of the library (``make asan`` points it at the sanitizer build)."""
KERNEL_CONFIG_KEY = "sherry.kernel"
KERNEL_ENV = "SHERRY_KERNEL"
KERNEL_REPORT_CONFIG_KEY = "sherry.kernel_report"
KernelPath = Literal["auto", "scalar", "avx2", "avx512", "tvm"]
KERNEL_PATHS: tuple[str, ...] = ("auto", "scalar", "avx2", "avx512", "tvm")


@functools.cache
def ort_errors() -> tuple[type[Exception], ...]:
    """onnxruntime's own exception types (Fail, InvalidArgument, InvalidProtobuf, NoSuchFile, RuntimeException…):
    plain Exception subclasses, so they are listed to be caught without catching everything."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    return tuple(
        error
        for error in vars(ort_state).values()
        if isinstance(error, type) and issubclass(error, Exception) and error.__module__ == ort_state.__name__
    )


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : (Exception during initialization: )?")


def ort_message(error: Exception) -> str:
    """onnxruntime's message on one line, without its ``[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION :`` prefix."""
    return one_line(_ORT_PREFIX.sub("", str(error)))


def get_library_path() -> str:
    """Path of ``libsherry_ops.so`` as a ``str``, ready for ``SessionOptions.register_custom_ops_library``.

    ``$SHERRY_OPS_LIBRARY`` if set, else the copy the package build installed. Raises FileNotFoundError
    with the fix, because a missing library otherwise surfaces later as an obscure onnxruntime error
    about an unknown ``ai.sherry`` op.
    """
    override = os.environ.get(LIBRARY_ENV)
    if override:
        if not Path(override).is_file():
            raise FileNotFoundError(
                f"{LIBRARY_ENV}={override} does not name a file; point it at a libsherry_ops.so built by "
                "`make lib`, or unset it"
            )
        return override
    path = built_library()
    if path is None:
        raise FileNotFoundError(
            "the ai.sherry op library is not built: run `make lib` in a checkout, or reinstall with `pip install .`"
        )
    return os.fspath(path)


def check_session_settings(threads: int, kernel: KernelPath | None) -> None:
    """Refuse a thread count or kernel path before a session (ours or onnxruntime-genai's) is built on it."""
    if kernel is not None and kernel not in KERNEL_PATHS:
        raise ValueError(f"kernel must be one of {', '.join(KERNEL_PATHS)}, got {kernel!r}")
    try:
        check_threads(threads)
    except ValueError as error:
        raise ValueError(f"threads {error}") from None


def session_options(
    threads: int = 1, kernel: KernelPath | None = None, report_kernel: bool = False
) -> ort.SessionOptions:
    """SessionOptions with the op library registered, ``threads`` intra-op threads and the kernel path.

    Separate from :func:`make_session` so callers can adjust other options before creating a session.
    ``kernel=None`` leaves the choice to ``SHERRY_KERNEL`` (default ``auto``).
    """
    import onnxruntime as ort

    check_session_settings(threads, kernel)
    options = ort.SessionOptions()
    library = get_library_path()
    try:
        options.register_custom_ops_library(library)
    except ort_errors() as error:
        origin = f"{LIBRARY_ENV}={library}" if os.environ.get(LIBRARY_ENV) else f"the op library {library}"
        raise InputError(
            f"{origin} does not load as an onnxruntime op library ({ort_message(error)}); "
            f"point {LIBRARY_ENV} at a libsherry_ops.so built by `make lib`, or unset it"
        ) from error
    options.intra_op_num_threads = threads
    if kernel is not None:
        options.add_session_config_entry(KERNEL_CONFIG_KEY, kernel)
    if report_kernel:
        options.add_session_config_entry(KERNEL_REPORT_CONFIG_KEY, "1")
    return options


def make_session(
    model: onnx.ModelProto | bytes | str | os.PathLike[str],
    threads: int = 1,
    kernel: KernelPath | None = None,
    report_kernel: bool = False,
    profile_prefix: str | os.PathLike[str] | None = None,
) -> ort.InferenceSession:
    """A CPU session for ``model`` (a ModelProto, serialized bytes or a path) with the ai.sherry ops.

    ``threads`` is the intra-op pool the ops split their work over; ``kernel`` forces a kernel path
    (see the module docstring); ``report_kernel`` prints each node's path to stderr.
    ``profile_prefix`` turns on onnxruntime's profiler, which writes per-node times to a JSON file
    starting with that prefix when ``session.end_profiling()`` is called (benchmarks read them).
    A model or op library that onnxruntime refuses is an :class:`~sherry_export.errors.InputError` that
    names the model and says what to do (:func:`session_error`).
    """
    import onnx
    import onnxruntime as ort

    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, os.PathLike):
        model = os.fspath(model)
    options = session_options(threads, kernel, report_kernel)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = os.fspath(profile_prefix)
    try:
        return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    except ort_errors() as error:
        raise InputError(session_error(model if isinstance(model, str) else "the model", error, kernel)) from error


def session_error(model: str, error: Exception, kernel: KernelPath | None) -> str:
    """One line for a session onnxruntime refused: which model, onnxruntime's reason, and what to do.

    Three causes reach here: a model file that is damaged or incomplete (protobuf, graph or external
    data), a kernel path the op library refuses for a node (the CPU lacks it, a shape has no tuned TVM
    kernel, an unknown ``SHERRY_KERNEL``; the library's message says which node and what to do), and
    anything else onnxruntime rejects.
    """
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    message = ort_message(error)
    if isinstance(error, (ort_state.InvalidProtobuf, ort_state.NoSuchFile)) or re.search(
        r"protobuf|No graph was found|[Ee]xternal (data|initializer)|Deserialize tensor", message
    ):
        return (
            f"onnxruntime cannot load {model}: {message}; the file (or its external data) is damaged or "
            "incomplete: export it again with `sherry export`"
        )
    if re.search(r"kernel was requested|unknown kernel path", message):
        forced = f"kernel path {kernel!r}" if kernel else f"{KERNEL_ENV}={os.environ.get(KERNEL_ENV, '')}"
        advice = "" if re.search(r"; (use|choose|tune)", message) else "; choose another path (auto: the best one)"
        return f"the ai.sherry ops refuse {model} with {forced}: {message}{advice}"
    return f"onnxruntime cannot create a session for {model}: {message}"
