"""``TaskReporter``: how task code talks to the process that runs it.

Keeps AGATA's verbs (``send_info``, ``send_stats``, ``send_error``, ``trigger``) and adds
``send_progress`` and ``finish``.  Under ftdl it writes frames to the reporter pipe whose fd is
in ``FEDMQ_REPORTER_FD``; run by hand (``python client.py``) it writes the same frames to stderr,
so a task can be debugged without fedmq around it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from typing import TYPE_CHECKING, Any, BinaryIO

from fedmq.broker import codec
from fedmq.ftdl.channel import ENV_FD, MAX_FRAME_BYTES, ReporterKind, ReporterMessage

if TYPE_CHECKING:
    import numpy as np

ENV_TASK_ID = "FEDMQ_TASK_ID"
ENV_ROLE = "FEDMQ_ROLE"
ENV_DATA_DIR = "FEDMQ_DATA_DIR"
ENV_ARGS = "FEDMQ_TASK_ARGS"
ENV_BROKER = "FEDMQ_BROKER"
ENV_PREFIX = "FEDMQ_PREFIX"
ENV_CALLER = "FEDMQ_CALLER"
ENV_CLIENT_ID = "FEDMQ_CLIENT_ID"  # the one client id these credentials may connect with
ENV_FLOWER_ADDRESS = "FEDMQ_FLOWER_ADDRESS"  # host:port of the task's Flower server
ENV_RUN = "FEDMQ_RUN"  # the task's run number (a serverless participant's records carry it)
ENV_OUTPUT_DIR = "FEDMQ_OUTPUT_DIR"  # where a server saves its final model (an absolute path)
MODEL_FILE = "model.npz"             # the final global model, in that folder
ENV_MODEL_PATH = "FEDMQ_MODEL_PATH"  # a deploy entry point's model file (an absolute path)
ENV_MODEL_NAME = "FEDMQ_MODEL_NAME"  # ... its registered name
ENV_MODEL_VERSION = "FEDMQ_MODEL_VERSION"  # ... and version


def rpc_env(rpc: dict[str, str] | None) -> dict[str, str]:
    """The cloud's RPC coordinates as environment variables, for task code and triggers."""
    names = {"broker": ENV_BROKER, "prefix": ENV_PREFIX, "caller": ENV_CALLER, "client_id": ENV_CLIENT_ID}
    return {names[k]: v for k, v in (rpc or {}).items() if k in names and v}


def task_args() -> dict[str, Any]:
    """The task's named arguments (manifest defaults merged with the operator's), typed as JSON."""
    raw = os.environ.get(ENV_ARGS, "{}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def data_fingerprint(*arrays: np.ndarray) -> tuple[str, int]:
    """``(digest, examples)`` of the arrays a client trains on: sha256 over each array's dtype,
    shape and bytes (C order), in the order given; examples = the first array's length.  Equal
    data gives an equal digest on any device and any run; the data itself never leaves the device."""
    if not arrays:
        raise ValueError("data_fingerprint needs at least one array")
    import numpy as np  # task code has numpy; the reporter's other verbs do without it

    sha = hashlib.sha256()
    for given in arrays:
        array = np.ascontiguousarray(given)
        sha.update(f"{array.dtype.str}|{array.shape}|".encode())
        sha.update(array.tobytes())
    first = np.asarray(arrays[0])
    return sha.hexdigest(), int(first.shape[0]) if first.ndim else 1


def deployed_model(path: str | os.PathLike[str] | None = None) -> list[np.ndarray]:
    """The arrays of the model a ``[deploy]`` entry point was started with (``FEDMQ_MODEL_PATH``,
    a ``model.npz`` as the server saved it: ``arr_0``, ``arr_1``, ... in order).  Nothing is
    unpickled: a model file is data, never code."""
    import numpy as np

    where = path if path is not None else os.environ.get(ENV_MODEL_PATH)
    if not where:
        raise RuntimeError(f"no model: {ENV_MODEL_PATH} is not set (run by the edge for a deployment)")
    with np.load(where, allow_pickle=False) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


class TaskReporter:
    _shared: TaskReporter | None = None

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._lock = threading.Lock()
        if stream is not None:
            self._stream: BinaryIO = stream
            self.attached = True
        elif os.environ.get(ENV_FD, "").isdigit():
            self._stream = os.fdopen(int(os.environ[ENV_FD]), "wb", buffering=0)
            self.attached = True
        else:
            self._stream = sys.stderr.buffer
            self.attached = False
        self.finished = False
        self.task_id = os.environ.get(ENV_TASK_ID, "local")
        self.role = os.environ.get(ENV_ROLE, "client")

    @classmethod
    def get(cls) -> TaskReporter:
        """The process-wide reporter (one pipe, one writer)."""
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def _send(self, kind: str, data: dict[str, Any]) -> None:
        line = ReporterMessage(kind, codec.finite(data)).to_line()  # a NaN metric is reported as null
        if len(line) > MAX_FRAME_BYTES:
            raise ValueError(f"report of {len(line)} bytes exceeds the channel's {MAX_FRAME_BYTES}")
        with self._lock:
            try:
                self._stream.write(line)
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                pass  # the parent is gone; the task's own exit handling decides what happens

    # AGATA's verbs ------------------------------------------------------------------------
    def send_info(self, **info: Any) -> None:
        """Facts about this run (data quantity, model size, ...)."""
        self._send("info", info)

    def send_stats(self, round: int, metrics: dict[str, Any]) -> None:
        self._send("stats", {"round": round, "metrics": metrics})

    def send_error(self, type: str, message: str) -> None:
        self._send("error", {"type": type, "message": message})

    def trigger(self, name: str, *args: str) -> None:
        """Ask the parent to run the trigger ``name`` declared in the task manifest."""
        self._send("trigger", {"name": name, "args": [str(a) for a in args]})

    # fedmq's additions --------------------------------------------------------------------
    def send_progress(self, round: int, total: int) -> None:
        self._send("progress", {"round": round, "total": total})

    def send_health(self, metrics: dict[str, Any]) -> None:
        """A deploy entry point's measure of the model it loaded (accuracy, loss, examples...):
        the edge reports the last one to the cloud, which judges it against the deployment's
        health expression.  Not a round: no ``round``, unlike ``send_stats``."""
        self._send("health", {"metrics": metrics})

    def log(self, message: str, level: str = "info") -> None:
        self._send("log", {"message": message, "level": level})

    def send_data(self, digest: str, examples: int) -> None:
        """The fingerprint of this client's training data (``data_fingerprint``): the cloud keeps
        it in the run's record, so two runs can be told to have trained on the same data or not."""
        self._send(ReporterKind.DATA, {"digest": digest, "examples": int(examples)})

    def finish(self, **summary: Any) -> None:
        """The task is done; an exit code 0 after this is a success."""
        if not self.finished:
            self.finished = True
            self._send("finished", summary)
