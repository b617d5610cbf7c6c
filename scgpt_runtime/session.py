"""onnxruntime sessions for bundle graphs: the execution provider, honestly reported, and speed.

onnxruntime falls back to the CPU without a word when the CUDA provider cannot start (missing
CUDA or cuDNN libraries, no GPU). Here every session is checked after creation
(`session.get_providers()`): `--device cuda` without a working CUDA provider is an error, and
`--device auto` says which provider runs.

CPU sessions run single-threaded; the engine runs one session call per worker thread, several
at a time (onnxruntime releases the GIL). On two to sixteen cores that is as fast as one call
with an intra-op thread pool or faster, and each cell is computed by the same single-threaded
kernels whatever the thread count, so results do not depend on it. CUDA sessions get one input
shape per length (the engine pads every batch to `batch_size` cells) and keep their input and
output buffers on the GPU between calls through IO binding.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import BundleError, DeviceError
from .tokens import InputSpec

log = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "cpu")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
CUDA_OPTIONS = {
    "device_id": 0,
    "use_tf32": 0,  # fp32 graphs give fp32 results, not TF32 ones
    "cudnn_conv_use_max_workspace": 1,
}
_ORT_QUIET, _ORT_WARNING = 4, 2  # onnxruntime's logger: fatal only, and its default
_probe_lock = threading.Lock()


def session_options(threads: int = 1) -> ort.SessionOptions:
    """Every graph optimisation, `threads` intra-op threads, deterministic kernels."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.use_deterministic_compute = True  # CUDA: no atomics-based reductions
    options.log_severity_level = _ORT_WARNING
    return options


def open_session(path: str | Path, device: str, *, threads: int = 1) -> ort.InferenceSession:
    """A session for the graph at `path` on `device` ("cuda" or "cpu").

    Raises DeviceError where "cuda" is asked and onnxruntime ends up on another provider, and
    BundleError where onnxruntime cannot load the graph.
    """
    if device not in PROVIDERS:
        raise ValueError(f"device must be 'cuda' or 'cpu', not {device!r}")
    providers: list = [PROVIDERS["cpu"]]
    if device == "cuda":
        if PROVIDERS["cuda"] not in ort.get_available_providers():
            raise DeviceError(
                "--device cuda: this onnxruntime build has no CUDA provider "
                f"(it has {', '.join(ort.get_available_providers())}); install onnxruntime-gpu "
                "or use --device cpu"
            )
        providers = [(PROVIDERS["cuda"], CUDA_OPTIONS), PROVIDERS["cpu"]]
    try:
        session = ort.InferenceSession(str(path), session_options(threads), providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types, not a common base
        raise BundleError(f"{path}: onnxruntime cannot load this graph ({_first_line(e)})") from e
    running = session.get_providers()[0]
    if running != PROVIDERS[device]:
        raise DeviceError(
            f"--device {device}: onnxruntime could not start the {PROVIDERS[device]} and would "
            f"run on {running} (it needs a GPU and the CUDA and cuDNN libraries its build was "
            "made for; run with -v to see its message); use --device auto or --device cpu"
        )
    return session


def resolve_device(device: str, probe_graph: str | Path, verbose: bool = False) -> str:
    """The device that runs, "cuda" or "cpu", for `device` ("auto", "cuda" or "cpu"), checked
    on `probe_graph`.

    "auto" tries the CUDA provider on the graph and takes the CPU where it does not start;
    "cuda" raises DeviceError there. onnxruntime's own messages for the attempt are silenced
    unless `verbose`.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, not {device!r}")
    if device == "cpu" or (
        device == "auto" and PROVIDERS["cuda"] not in ort.get_available_providers()
    ):
        return "cpu"
    with _probe_lock, _native_log(verbose):
        try:
            open_session(probe_graph, "cuda")
            return "cuda"
        except DeviceError:
            if device == "cuda":
                raise
            log.info(
                "--device auto: the CUDA provider does not start here (no GPU, or not the CUDA "
                "libraries this onnxruntime needs; -v shows its message): running on the CPU"
            )
            return "cpu"


@contextlib.contextmanager
def _native_log(verbose: bool) -> Iterator[None]:
    """onnxruntime's own log lines (coloured, on stderr) only with -v while CUDA is tried."""
    if not verbose:
        ort.set_default_logger_severity(_ORT_QUIET)
    try:
        yield
    finally:
        ort.set_default_logger_severity(_ORT_WARNING)


class Runner:
    """One graph in one session: `run(feed, names)` -> those outputs, as numpy arrays.

    Thread-safe on the CPU (onnxruntime sessions are); on CUDA the engine calls it from one
    thread at a time.
    """

    def __init__(self, path: Path, device: str, inputs: Sequence[InputSpec]):
        self.path = path
        self.device = device
        self.inputs = {spec.name: spec.dtype for spec in inputs}
        self.session = open_session(path, device)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.bind_device = "cuda"  # where IO-bound buffers live (the tests bind on "cpu")
        self.provider = self.session.get_providers()[0]
        self._buffers: dict[tuple[int, int], tuple[ort.IOBinding, dict]] = {}

    def run(self, feed: Mapping[str, np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
        """The outputs `names` for `feed` (the graph inputs by name, each (B, L))."""
        if self.device == "cuda":
            got = dict(zip(self.outputs, self._run_bound(feed), strict=True))
            return [got[name] for name in names]
        return self.session.run(list(names), dict(feed))

    def _run_bound(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """IO binding: inputs copied into GPU buffers kept per input shape, outputs left on the
        GPU until the end of the call; no allocation per call."""
        shape = next(iter(feed.values())).shape
        if shape not in self._buffers:
            binding = self.session.io_binding()
            inputs = {}
            for name, dtype in self.inputs.items():
                inputs[name] = ort.OrtValue.ortvalue_from_shape_and_type(
                    shape, np.dtype(dtype), self.bind_device, 0
                )
                binding.bind_ortvalue_input(name, inputs[name])
            for name in self.outputs:
                binding.bind_output(name, self.bind_device, 0)
            self._buffers[shape] = (binding, inputs)
        binding, inputs = self._buffers[shape]
        for name, dtype in self.inputs.items():
            inputs[name].update_inplace(np.ascontiguousarray(feed[name], dtype=dtype))
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
