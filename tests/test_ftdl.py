"""ftdl with real child processes and real Flower over gRPC on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from fedmq import ftdl
from fedmq.broker.net import free_port
from fedmq.ftdl import TaskEvent
from fedmq.ftdl.channel import MAX_FRAME_BYTES, FrameReader, parse_frame
from fedmq.ftdl.manifest import ManifestError, load_manifest, parse_manifest

TASKS = Path(__file__).parent / "tasks"


class Events:
    def __init__(self) -> None:
        self.items: list[TaskEvent] = []
        self.lock = threading.Lock()

    def __call__(self, event: TaskEvent) -> None:
        with self.lock:
            self.items.append(event)

    def of(self, kind: str, role: str | None = None) -> list[TaskEvent]:
        with self.lock:
            return [e for e in self.items if e.kind == kind and (role is None or e.role == role)]

    def wait_for(self, kind: str, count: int = 1, timeout: float = 30.0) -> list[TaskEvent]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = self.of(kind)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no {count} {kind!r} events in {timeout} s: {[e.kind for e in self.items]}")


def group_alive(pgid: int) -> list[int]:
    alive = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return alive


def zombies_of_ours() -> list[int]:
    me = psutil.Process()
    return [c.pid for c in me.children(recursive=True) if c.status() == psutil.STATUS_ZOMBIE]


@pytest.fixture
def task_copy(tmp_path: Path) -> Path:
    dest = tmp_path / "task"
    shutil.copytree(TASKS / "numpy_fl", dest)
    return dest


def write_task(folder: Path, client_code: str, triggers: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fedmq.toml").write_text(f'[task]\nname = "t"\n[client]\nentry = "client.py"\n{triggers}')
    (folder / "client.py").write_text(textwrap.dedent(client_code))
    return folder


def run_client(folder: Path, tmp_path: Path, time_limit: float | None = None) -> tuple[ftdl.TaskProcess, Events]:
    events = Events()
    proc = ftdl.start_task(folder, "client", task_id="t1", log_dir=tmp_path / "logs", on_event=events,
                           time_limit_s=time_limit)
    return proc, events


def test_flower_server_and_two_clients_for_three_rounds(task_copy: Path, tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    events = Events()
    out = tmp_path / "out"
    server = ftdl.start_task(task_copy, "server", task_id="lin", log_dir=tmp_path / "logs", on_event=events,
                             args={"fire_triggers": True},
                             env={"FEDMQ_FLOWER_ADDRESS": address, "FEDMQ_OUTPUT_DIR": str(out)},
                             time_limit_s=120)
    clients = [ftdl.start_task(task_copy, "client", task_id="lin", log_dir=tmp_path / f"logs{i}",
                               on_event=events, args={"seed": i}, data_dir=tmp_path / f"data{i}",
                               env={"FEDMQ_FLOWER_ADDRESS": address}, time_limit_s=120)
               for i in range(2)]
    outcome = server.wait(150)
    for client in clients:
        assert client.wait(30) is not None and client.outcome.ok, client.outcome
    assert outcome is not None and outcome.ok, outcome
    progress = [(e.data["round"], e.data["total"]) for e in events.of("progress", "server")]
    assert progress == [(0, 3), (1, 3), (2, 3), (3, 3)]
    server_stats = [e.data["metrics"] for e in events.of("stats", "server")]
    rounds_with_loss = [s for s in server_stats if "loss" in s]
    assert len(rounds_with_loss) == 3
    assert rounds_with_loss[-1]["loss"] < rounds_with_loss[0]["loss"]  # it learns
    assert rounds_with_loss[-1]["r2"] > 0.9 and rounds_with_loss[-1]["eval_clients"] == 2
    assert len(events.of("stats", "client")) == 12  # 3 fits + 3 evaluates on each of 2 clients
    finished = events.of("finished", "server")[0].data
    assert finished["rounds"] == 3 and Path(finished["model"]).is_file()
    assert [e.data["cause"] for e in events.of("exit")] == ["finished"] * 3
    # The declared trigger ran with its arguments and reported back; the undeclared was refused.
    result = events.wait_for("trigger_result")[0].data
    assert result["ok"] and result["args"] == ["round-zero", "42"], result
    assert (task_copy / "trigger-note.txt").read_text() == "round-zero 42"
    assert any(e.data.get("trigger_saw") == ["round-zero", "42"] for e in events.of("info"))
    refused = events.of("trigger_refused")[0].data
    assert refused["name"] == "not-declared" and refused["declared"] == ["note"]
    assert (tmp_path / "logs0" / "lin.client.log").read_text().startswith("client data at")


def test_import_error_is_reported_with_its_cause(tmp_path: Path) -> None:
    folder = write_task(tmp_path / "t", "import fedmq_no_such_module_xyz\n")
    proc, events = run_client(folder, tmp_path)
    outcome = proc.wait(20)
    assert outcome is not None and not outcome.ok
    assert "ModuleNotFoundError" in outcome.cause and "fedmq_no_such_module_xyz" in outcome.cause
    assert events.of("error")[0].data["type"] == "ModuleNotFoundError"
    assert any("Traceback" in line for line in outcome.log_tail)
    assert events.of("exit")[0].data["ok"] is False


def test_sys_exit_3_is_an_error(tmp_path: Path) -> None:
    folder = write_task(tmp_path / "t", "import sys\nprint('bye')\nsys.exit(3)\n")
    proc, _ = run_client(folder, tmp_path)
    outcome = proc.wait(20)
    assert outcome is not None and outcome.cause == "exit code 3" and outcome.exit_code == 3
    assert outcome.log_tail == ["bye"]


def test_sigkill_is_an_error_and_leaves_nothing_behind(tmp_path: Path) -> None:
    code = """
        import subprocess, time
        subprocess.Popen(["sleep", "300"])   # a grandchild in the same process group
        print("ready", flush=True)
        time.sleep(300)
    """
    folder = write_task(tmp_path / "t", code)
    proc, _ = run_client(folder, tmp_path)
    deadline = time.time() + 20
    while time.time() < deadline and "ready" not in proc._tail:
        time.sleep(0.05)
    pgid = proc.process.pid  # type: ignore[union-attr]
    assert len(group_alive(pgid)) == 2
    os.kill(pgid, signal.SIGKILL)  # as the OOM killer would
    started = time.time()
    outcome = proc.wait(10)
    assert outcome is not None and outcome.cause == "killed by signal SIGKILL"
    assert time.time() - started < 5
    assert group_alive(pgid) == [] and zombies_of_ours() == []


def test_a_task_never_outlives_its_supervisor(tmp_path: Path) -> None:
    """The supervisor (a cloud replica, an edge) SIGKILLed: the task and its grandchildren end
    by themselves -- a Flower server nobody can stop or hear from must not run on."""
    code = """
        import subprocess, time
        subprocess.Popen(["sleep", "300"])
        print("ready", flush=True)
        time.sleep(300)
    """
    folder = write_task(tmp_path / "t", code)
    supervisor = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from fedmq import ftdl
        proc = ftdl.start_task(Path({str(folder)!r}), "client", task_id="t1", log_dir=Path({str(tmp_path / "logs")!r}),
                               on_event=lambda event: None)
        while "ready" not in proc._tail:
            time.sleep(0.05)
        print(proc.process.pid, flush=True)
        time.sleep(300)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        pgid = int(supervisor.stdout.readline())  # type: ignore[union-attr]
        assert len(group_alive(pgid)) == 2
        supervisor.kill()
        supervisor.wait(10)
        deadline = time.time() + 5
        while group_alive(pgid) and time.time() < deadline:
            time.sleep(0.1)
        assert group_alive(pgid) == []
    finally:
        supervisor.kill()


def test_a_hang_past_the_time_limit_is_ended(tmp_path: Path) -> None:
    code = """
        import signal, subprocess, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # even a child that ignores SIGTERM
        subprocess.Popen(["sleep", "300"])
        time.sleep(300)
    """
    folder = write_task(tmp_path / "t", code)
    started = time.time()
    proc, _events = run_client(folder, tmp_path, time_limit=2.0)
    outcome = proc.wait(20)
    assert outcome is not None and outcome.timed_out and "time limit of 2 s" in outcome.cause
    assert time.time() - started < 10
    assert group_alive(proc.process.pid) == [] and zombies_of_ours() == []  # type: ignore[union-attr]


def test_exit_zero_without_finishing_is_an_error(tmp_path: Path) -> None:
    code = "import os\nos._exit(0)\n"  # skips the bootstrap's own finish report
    folder = write_task(tmp_path / "t", code)
    proc, _ = run_client(folder, tmp_path)
    outcome = proc.wait(20)
    assert outcome is not None and not outcome.ok and "without reporting" in outcome.cause


def test_stop_terminates_the_group(tmp_path: Path) -> None:
    folder = write_task(tmp_path / "t", "import subprocess, time\nsubprocess.Popen(['sleep','300'])\ntime.sleep(300)\n")
    proc, _ = run_client(folder, tmp_path)
    time.sleep(1.0)
    outcome = proc.stop(grace_s=3)
    assert outcome is not None and outcome.stopped and outcome.cause == "stopped"
    assert group_alive(proc.process.pid) == []  # type: ignore[union-attr]


def test_garbage_on_the_channel_and_10_mb_of_stdout_do_not_stall_the_parent(tmp_path: Path) -> None:
    code = """
        import os, sys
        from fedmq.ftdl import TaskReporter
        fd = int(os.environ["FEDMQ_REPORTER_FD"])
        os.write(fd, b"\\x00\\xff not json at all\\n{\\"kind\\": \\"nope\\"}\\n[1,2]\\n")
        os.write(fd, b"{" + b"x" * 200000 + b"\\n")             # an oversized frame
        os.write(fd, b'{"kind": "stats", "data": {"round": "one"}}\\n')  # wrong types
        line = "y" * 99 + "\\n"
        for _ in range(100_000):                                  # 10 MB on stdout
            sys.stdout.write(line)
        sys.stdout.write("z" * 100_000 + "\\n")                   # one very long line
        sys.stdout.flush()
        TaskReporter.get().send_stats(1, {"ok": 1})
    """
    folder = write_task(tmp_path / "t", code)
    lines = []
    events = Events()
    proc = ftdl.start_task(folder, "client", task_id="g", log_dir=tmp_path / "logs", on_event=events,
                           on_output=lambda stream, line: lines.append(line))
    outcome = proc.wait(60)
    assert outcome is not None and outcome.ok, outcome
    assert [e.data for e in events.of("stats")] == [{"round": 1, "metrics": {"ok": 1}}]
    assert len(lines) >= 100_000
    logs = list((tmp_path / "logs").glob("g.client.log*"))
    assert sum(p.stat().st_size for p in logs) >= 10_000_000 and len(logs) >= 2  # rotated


def test_frame_reader_resynchronises_after_garbage() -> None:
    read_fd, write_fd = os.pipe()
    got: list[Any] = []
    reader = FrameReader(read_fd, got.append, on_drop=lambda reason: None)
    thread = threading.Thread(target=reader.run)
    thread.start()
    os.write(write_fd, b'garbage\n{"kind":"info","data":{"a":1}}\n' + b"z" * (MAX_FRAME_BYTES * 3)
             + b'\n{"kind":"log","data":{"message":"m"}}\n')
    os.close(write_fd)
    thread.join(5)
    assert [m.kind for m in got] == ["info", "log"] and reader.dropped == 2


def test_frame_shapes_are_checked() -> None:
    assert parse_frame(b'{"kind":"progress","data":{"round":1,"total":3}}').data["total"] == 3
    for bad in (b'{"kind":"progress","data":{"round":true,"total":3}}', b'{"kind":"error","data":{}}',
                b'{"kind":"trigger","data":{"name":"x","args":"y"}}', b'{"kind":"x"}', b'"str"'):
        with pytest.raises(ValueError):
            parse_frame(bad)


def test_reporter_outside_ftdl_writes_to_stderr(tmp_path: Path) -> None:
    import subprocess

    code = "from fedmq.ftdl import TaskReporter\nTaskReporter.get().send_stats(2, {'acc': 0.5})\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                          env={k: v for k, v in os.environ.items() if k != "FEDMQ_REPORTER_FD"})
    assert '"kind":"stats"' in done.stderr and '"acc":0.5' in done.stderr


def test_manifest_validation(tmp_path: Path) -> None:
    manifest = load_manifest(TASKS / "numpy_fl")
    assert manifest.server.args == {"rounds": 3, "min_clients": 2}
    assert manifest.triggers["note"].timeout_s == 10
    assert parse_manifest(manifest_dict := {"task": {"name": "x"}, "client": {"entry": "c.py"}}).client.entry == "c.py"
    assert manifest_dict
    with pytest.raises(ManifestError) as err:
        parse_manifest({"task": {"name": "bad name!"}, "server": {"entry": "../evil.py"},
                        "client": {"entry": "/abs.py"}, "triggers": {"t": {"command": "rm -rf /"}},
                        "requirements": {"memory_mb": -1, "packages": ["torch>=2; rm"]}, "extra": {}})
    problems = " | ".join(err.value.problems)
    for fragment in ("task.name", "server.entry '../evil.py'", "client.entry '/abs.py'",
                     "triggers.t.command", "memory_mb", "not a package specifier", "unknown sections"):
        assert fragment in problems, fragment
    (tmp_path / "fedmq.toml").write_text("[task\nname=")
    with pytest.raises(ManifestError, match="not valid TOML"):
        load_manifest(tmp_path)
    (tmp_path / "fedmq.toml").write_text('[task]\nname="x"\n[client]\nentry="missing.py"\n')
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path)
    assert ftdl.TaskManifest.from_dict(manifest.to_dict()) == manifest
