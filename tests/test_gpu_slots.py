"""GPU slot pool (pipeline.gpu): CPU only, fake devices through KDIGA_GPU_SLOTS, tmp lock dir."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline import gpu
from pipeline.gpu import cuda, gpu_slot, parse_slots, slots
from pipeline.gpu import env as gpu_env

REPO = Path(__file__).resolve().parents[1]
ENV_NAMES = ("KDIGA_GPU_SLOTS", "KDIGA_GPU_LOCK_DIR", "CUDA_VISIBLE_DEVICES", "KDIGA_GPU_HELD")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    """No slot or device variables leak in from the caller; locks live in this test's tmp dir."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KDIGA_GPU_LOCK_DIR", str(tmp_path / "locks"))


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES or k == "KDIGA_GPU_LOCK_DIR"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _python(code: str, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, env=_child_env(**env)
    )


def _wait_for(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# --- pool parsing -----------------------------------------------------------------------------


def test_parse_slots_count_list_and_errors():
    assert parse_slots("3") == ["0", "1", "2"]
    assert parse_slots("0") == []
    assert parse_slots("4,") == ["4"]
    assert parse_slots(" 4, 5 ") == ["4", "5"]
    assert parse_slots("GPU-ab12") == ["GPU-ab12"]
    for bad in ("0,0", "1,-1", "a b,1", "a,b", "1.5", "99999999999"):
        with pytest.raises(ValueError, match="KDIGA_GPU_SLOTS"):
            parse_slots(bad)


FORMS = "expected a device count from 0 to 1024"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("a,b", "'a' is not a device id"),
        ("1.5", "'1.5' is not a device id"),
        ("0x1,", "'0x1' is not a device id"),
        ("gpu-ab12,", "'gpu-ab12' is not a device id"),
        ("99999999999", "a count of more than 1024 devices"),
        ("1025", "a count of more than 1024 devices"),
        ("3,99999999999", "device '99999999999' is not a CUDA ordinal below 1024"),
        ("7,07", "device '7' is listed twice"),
        (",", "no device id in it"),
    ],
)
def test_parse_slots_refuses_with_the_variable_the_value_and_the_forms(value, problem):
    with pytest.raises(gpu.GpuSlotsError) as info:
        parse_slots(value)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"KDIGA_GPU_SLOTS={value!r}: {problem}; {FORMS}")
    assert "CUDA ordinal below 1024 or a GPU/MIG UUID" in str(info.value)


def test_huge_count_is_refused_at_once_without_building_a_list(monkeypatch):
    def no_range(*args):
        raise AssertionError(f"range{args} built before validating")

    monkeypatch.setattr(gpu_env, "range", no_range, raising=False)
    for value in ("99999999999", "9" * 100_000):
        start = time.monotonic()
        with pytest.raises(gpu.GpuSlotsError, match="more than 1024 devices") as info:
            parse_slots(value)
        assert time.monotonic() - start < 0.5
        assert len(str(info.value)) < 600  # a huge value is shown shortened
    with pytest.raises(gpu.GpuSlotsError, match="n_slots must be an int from 0 to 1024"):
        slots.resolve_pool(10**11)


def test_parse_slots_accepts_uuids_and_normalises_ordinals():
    assert parse_slots("GPU-8a1f2b3c-aaaa-bbbb-cccc-0123456789ab,MIG-GPU-8a1f/1/0") == [
        "GPU-8a1f2b3c-aaaa-bbbb-cccc-0123456789ab",
        "MIG-GPU-8a1f/1/0",
    ]
    assert parse_slots("07,1023,") == ["7", "1023"]  # one lock file per device
    assert parse_slots("1024") == [str(i) for i in range(1024)]


def test_cli_refuses_a_bad_slots_value_with_one_line():
    res = _cli("--", sys.executable, "-c", "pass", KDIGA_GPU_SLOTS="a,b")
    assert res.returncode == 75
    assert res.stderr.startswith("pipeline.gpu: KDIGA_GPU_SLOTS='a,b': 'a' is not a device id; ")
    assert "Traceback" not in res.stderr


@given(st.lists(st.integers(0, 64), min_size=2, max_size=8, unique=True))
def test_parse_slots_keeps_listed_ids_in_order(ids):
    assert parse_slots(",".join(map(str, ids))) == [str(i) for i in ids]


def test_bad_arguments_raise_value_error():
    for kwargs in ({"n_slots": -1}, {"timeout": -1.0}, {"poll": 0.0}):
        with pytest.raises(ValueError), gpu_slot(**kwargs):
            pass


# --- one process ------------------------------------------------------------------------------


def test_two_holders_get_different_listed_slots_and_a_third_times_out(monkeypatch):
    monkeypatch.setenv("KDIGA_GPU_SLOTS", "4,5")
    with gpu_slot() as a, gpu_slot() as b:
        assert {a, b} == {"4", "5"}
        assert os.environ["CUDA_VISIBLE_DEVICES"] == b
        start = time.monotonic()
        with (
            pytest.raises(TimeoutError, match=r"no free GPU slot.*'4', '5'") as info,
            gpu_slot(timeout=0.3, poll=0.05),
        ):
            pytest.fail("a third holder got a slot out of two")
        assert 0.2 <= time.monotonic() - start < 2.0
        assert f"pid {os.getpid()}" in str(info.value)  # names who holds the slots
    with gpu_slot(timeout=0) as again:  # both released
        assert again == "4"


def test_n_slots_argument_hands_out_zero_based_ids(monkeypatch):
    monkeypatch.setenv("KDIGA_GPU_SLOTS", "7,8,9")  # the argument wins
    with gpu_slot(n_slots=2) as a, gpu_slot(n_slots=2) as b:
        assert (a, b) == ("0", "1")


def test_env_restored_after_the_block_and_after_an_error(monkeypatch):
    monkeypatch.setenv("KDIGA_GPU_SLOTS", "2")
    with gpu_slot() as dev:
        assert os.environ["CUDA_VISIBLE_DEVICES"] == dev == "0"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert "KDIGA_GPU_HELD" not in os.environ

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7,8")
    with pytest.raises(RuntimeError, match="boom"), gpu_slot() as dev:
        assert os.environ["CUDA_VISIBLE_DEVICES"] == dev
        raise RuntimeError("boom")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "7,8"
    with gpu_slot(timeout=0) as a, gpu_slot(timeout=0) as b:  # the error released the lock
        assert {a, b} == {"0", "1"}


def test_no_slots_and_no_cuda_yields_none_and_leaves_env_alone(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda, "device_count", lambda: 0)
    with gpu_slot(timeout=0) as dev:
        assert dev is None
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a scheduler hiding every GPU
    with gpu_slot(timeout=0) as dev:
        assert dev is None
        assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert not (tmp_path / "locks").exists()


def test_default_pool_counts_cuda_devices(monkeypatch):
    monkeypatch.setattr(cuda, "device_count", lambda: 2)
    with gpu_slot() as a:
        with gpu_slot() as b:
            assert (a, b) == ("0", "1")
        assert os.environ["CUDA_VISIBLE_DEVICES"] == a


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only default")
def test_real_default_on_a_cpu_machine_is_none():
    with gpu_slot(timeout=0) as dev:
        assert dev is None


def test_scheduler_single_device_is_yielded_without_locking(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with gpu_slot(timeout=0) as a, gpu_slot(timeout=0) as b:
        assert a == b == "3"
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert not (tmp_path / "locks").exists()


def test_scheduler_several_devices_form_the_pool(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with gpu_slot(timeout=0) as a, gpu_slot(timeout=0) as b:
        assert (a, b) == ("2", "3")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"


# --- many processes ---------------------------------------------------------------------------

_HOLDER = """
import json, os, sys, time
from pathlib import Path
from pipeline.gpu import gpu_slot

out, idx = Path(sys.argv[1]), sys.argv[2]
(out / f"ready-{idx}").touch()
while not (out / "go").exists():
    time.sleep(0.002)
with gpu_slot(timeout=20, poll=0.01) as slot:
    start = time.monotonic()
    visible = os.environ["CUDA_VISIBLE_DEVICES"]
    try:  # a second, clock-free witness: only one holder of a slot can create its marker
        fd = os.open(out / f"inuse-{slot}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        fd = None
    time.sleep(0.2)
    if fd is not None:
        os.close(fd)
        os.unlink(out / f"inuse-{slot}")
    end = time.monotonic()
rec = {"slot": slot, "visible": visible, "start": start, "end": end, "clash": fd is None}
(out / f"result-{idx}.json").write_text(json.dumps(rec))
"""


def _run_together(script: str, out: Path, n_procs: int, slots: str, timeout: float) -> list[dict]:
    """Start ``n_procs`` holder scripts, release them all at once once every one is ready,
    and return their result records (each must exit 0)."""
    out.mkdir()
    procs = [_python(script, str(out), str(i), KDIGA_GPU_SLOTS=slots) for i in range(n_procs)]
    try:
        _wait_for(lambda: len(list(out.glob("ready-*"))) == n_procs, what="all holders ready")
        (out / "go").touch()
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            _kill(p)
    assert codes == [0] * n_procs
    recs = [json.loads(f.read_text()) for f in sorted(out.glob("result-*.json"))]
    assert len(recs) == n_procs
    return recs


def test_many_processes_starting_together_never_share_a_slot(tmp_path):
    slots = ["0", "1", "2", "3"]
    recs = _run_together(_HOLDER, tmp_path / "out", 12, ",".join(slots), timeout=30)
    assert all(r["visible"] == r["slot"] for r in recs)
    for slot in {r["slot"] for r in recs}:
        spans = sorted((r["start"], r["end"]) for r in recs if r["slot"] == slot)
        for (_, end), (next_start, _) in itertools.pairwise(spans):
            assert end <= next_start, f"slot {slot} held by two processes at once: {spans}"
    assert not any(r["clash"] for r in recs)
    assert {r["slot"] for r in recs} == set(slots)  # they really ran concurrently


def test_a_holder_killed_with_sigkill_frees_its_slot(monkeypatch, tmp_path):
    monkeypatch.setenv("KDIGA_GPU_SLOTS", "1")
    flag = tmp_path / "held"
    code = """
    import sys, time
    from pathlib import Path
    from pipeline.gpu import gpu_slot
    with gpu_slot(timeout=10) as slot:
        Path(sys.argv[1]).write_text(slot)
        time.sleep(60)
    """
    proc = _python(code, str(flag), KDIGA_GPU_SLOTS="1")
    try:
        _wait_for(flag.exists, what="the child to hold the slot")
        with pytest.raises(TimeoutError), gpu_slot(timeout=0):
            pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        _kill(proc)
    start = time.monotonic()
    with gpu_slot(timeout=2, poll=0.02) as slot:
        assert slot == "0"
    assert time.monotonic() - start < 0.5


# --- CLI --------------------------------------------------------------------------------------


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline.gpu", *args]
    return subprocess.run(
        cmd, cwd=REPO, env=_child_env(**env), capture_output=True, text=True, timeout=30
    )


def test_cli_sets_the_device_and_passes_the_exit_code_through():
    code = "import os, sys; print(os.environ['CUDA_VISIBLE_DEVICES']); sys.exit(3)"
    res = _cli("--", sys.executable, "-c", code, KDIGA_GPU_SLOTS="4,5")
    assert res.returncode == 3, res.stderr
    assert res.stdout.strip() == "4"
    assert _cli("--", sys.executable, "-c", "pass", KDIGA_GPU_SLOTS="4,5").returncode == 0


def test_cli_child_reuses_the_held_slot_instead_of_taking_another():
    code = "from pipeline.gpu import gpu_slot\nwith gpu_slot(timeout=0) as s: print(s)"
    res = _cli("--", sys.executable, "-c", code, KDIGA_GPU_SLOTS="0,1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "0"  # not "1": the parent's slot is the child's


def test_cli_reports_timeout_and_missing_command(monkeypatch):
    monkeypatch.setenv("KDIGA_GPU_SLOTS", "1")
    with gpu_slot():
        res = _cli("--timeout", "0.1", "--", sys.executable, "-c", "pass", KDIGA_GPU_SLOTS="1")
    assert res.returncode == 75
    assert "no free GPU slot" in res.stderr
    res = _cli("--", "kdiga-no-such-command-xyz", KDIGA_GPU_SLOTS="1")
    assert res.returncode == 127
    assert "command not found" in res.stderr


def test_cli_child_keeps_the_slot_if_the_wrapper_is_killed(monkeypatch, tmp_path):
    monkeypatch.setenv("KDIGA_GPU_SLOTS", "1")
    pid_file = tmp_path / "child.pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    wrapper = subprocess.Popen(
        [sys.executable, "-m", "pipeline.gpu", "--", sys.executable, "-c", code],
        cwd=REPO,
        env=_child_env(KDIGA_GPU_SLOTS="1"),
    )
    child_pid = None
    try:
        _wait_for(lambda: pid_file.exists() and pid_file.read_text(), what="the child to start")
        child_pid = int(pid_file.read_text())
        wrapper.send_signal(signal.SIGKILL)
        wrapper.wait(timeout=10)
        with pytest.raises(TimeoutError), gpu_slot(timeout=0):  # the child still holds it
            pass
    finally:
        _kill(wrapper)
        if child_pid is not None:
            os.kill(child_pid, signal.SIGKILL)
    with gpu_slot(timeout=2, poll=0.02) as slot:  # freed once the child is gone too
        assert slot == "0"


# --- several devices per job (gpu_slots, --gpus N) --------------------------------------------


def test_two_holders_of_two_get_disjoint_sets_and_a_third_waits_then_fails(monkeypatch):
    monkeypatch.setenv("KDIGA_GPU_SLOTS", "0,1,2,3")
    with gpu.gpu_slots(2) as a, gpu.gpu_slots(2) as b:
        assert len(a) == len(b) == 2
        assert not set(a) & set(b) and set(a) | set(b) == {"0", "1", "2", "3"}
        assert os.environ["CUDA_VISIBLE_DEVICES"] == ",".join(b)
        for want in (2, 1):
            start = time.monotonic()
            with (
                pytest.raises(TimeoutError, match=r"GPU slot.*'0', '1', '2', '3'") as info,
                gpu.gpu_slots(want, timeout=0.3, poll=0.02),
            ):
                pytest.fail(f"a third holder got {want} of 4 devices while 4 were held")
            assert 0.25 <= time.monotonic() - start < 2.0
            assert f"pid {os.getpid()}" in str(info.value)
    with gpu.gpu_slots(4, timeout=0) as every:  # both sets released
        assert every == ["0", "1", "2", "3"]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_a_set_is_all_or_none_and_a_failed_try_keeps_nothing(monkeypatch):
    monkeypatch.setenv("KDIGA_GPU_SLOTS", "3,2,1,0")
    with gpu_slot() as one:  # the pool's first device: 3 of 4 left
        assert one == "3"
        with (
            pytest.raises(TimeoutError, match="no 4 free GPU slots at once"),
            gpu.gpu_slots(4, timeout=0.1, poll=0.02),
        ):
            pass
        with gpu.gpu_slots(3, timeout=0) as rest:  # the failed try released what it took
            assert rest == ["0", "1", "2"]  # taken in sorted order
            assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2"


def test_more_gpus_than_the_pool_is_refused_naming_both_numbers(monkeypatch):
    monkeypatch.setenv("KDIGA_GPU_SLOTS", "0,1,2,3")
    with pytest.raises(gpu.GpuSlotsError) as info, gpu.gpu_slots(5, timeout=0):
        pass
    assert isinstance(info.value, ValueError)
    assert "a job of 5 GPUs needs 5 devices at once, but the pool has only 4" in str(info.value)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # a scheduler gave one device
    monkeypatch.delenv("KDIGA_GPU_SLOTS")
    with (
        pytest.raises(gpu.GpuSlotsError, match=r"needs 2 devices at once.*only 1"),
        gpu.gpu_slots(2, timeout=0),
    ):
        pass
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="gpus must be an int >= 1"), gpu.gpu_slots(bad):
            pass


def test_a_scheduler_set_of_exactly_n_devices_is_used_without_locking(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with gpu.gpu_slots(2, timeout=0) as a, gpu.gpu_slots(2, timeout=0) as b:
        assert a == b == ["4", "5"]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5"
    assert not (tmp_path / "locks").exists()
    monkeypatch.setattr(cuda, "device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with gpu.gpu_slots(4, timeout=0) as none:  # no GPU: the CPU, whatever N
        assert none is None


def test_a_holder_of_several_killed_with_sigkill_frees_them_all(monkeypatch, tmp_path):
    flag = tmp_path / "held"
    code = """
    import sys, time
    from pathlib import Path
    from pipeline.gpu import gpu_slots
    with gpu_slots(3, timeout=10) as held:
        Path(sys.argv[1]).write_text(",".join(held))
        time.sleep(60)
    """
    monkeypatch.setenv("KDIGA_GPU_SLOTS", "0,1,2,3")
    proc = _python(code, str(flag), KDIGA_GPU_SLOTS="0,1,2,3")
    try:
        _wait_for(lambda: flag.exists() and flag.read_text(), what="the child to hold 3 devices")
        assert flag.read_text() == "0,1,2"
        with pytest.raises(TimeoutError), gpu.gpu_slots(2, timeout=0):
            pass  # one device is free, two are not
        with gpu.gpu_slots(1, timeout=0) as free:
            assert free == ["3"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        start = time.monotonic()
        with gpu.gpu_slots(4, timeout=2, poll=0.02) as every:
            assert every == ["0", "1", "2", "3"]
        assert time.monotonic() - start < 0.5
    finally:
        _kill(proc)


_SET_HOLDER = """
import json, os, sys, time
from pathlib import Path
from pipeline.gpu import gpu_slots

out, idx = Path(sys.argv[1]), sys.argv[2]
(out / f"ready-{idx}").touch()
while not (out / "go").exists():
    time.sleep(0.002)
with gpu_slots(2, timeout=30, poll=0.01) as held:
    start = time.monotonic()
    visible = os.environ["CUDA_VISIBLE_DEVICES"]
    fds = []
    for slot in held:  # only one holder of a device can create its marker
        try:
            fds.append(os.open(out / f"inuse-{slot}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
    clash = len(fds) < len(held)
    time.sleep(0.15)
    for slot, fd in zip(held, fds):
        os.close(fd)
        os.unlink(out / f"inuse-{slot}")
    end = time.monotonic()
rec = {"held": held, "visible": visible, "start": start, "end": end, "clash": clash}
(out / f"result-{idx}.json").write_text(json.dumps(rec))
"""


def test_processes_taking_two_of_four_together_never_share_nor_deadlock(tmp_path):
    recs = _run_together(_SET_HOLDER, tmp_path / "out", 6, "4", timeout=60)
    assert all(r["visible"] == ",".join(r["held"]) and len(set(r["held"])) == 2 for r in recs)
    assert not any(r["clash"] for r in recs)
    assert {d for r in recs for d in r["held"]} == {"0", "1", "2", "3"}  # two sets at once
    for a, b in itertools.combinations(recs, 2):
        overlap = a["start"] < b["end"] and b["start"] < a["end"]
        assert not (overlap and set(a["held"]) & set(b["held"])), (a, b)


def test_cli_gpus_sets_the_comma_joined_ids_and_children_share_them():
    code = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"
    res = _cli("--gpus", "2", "--", sys.executable, "-c", code, KDIGA_GPU_SLOTS="6,4,5")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "4,5"
    code = "from pipeline.gpu import gpu_slots\nwith gpu_slots(2, timeout=0) as s: print(s)"
    res = _cli("--gpus", "2", "--", sys.executable, "-c", code, KDIGA_GPU_SLOTS="0,1,2")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "['0', '1']"  # the parent's set, not another
    res = _cli("--gpus", "3", "--", sys.executable, "-c", "pass", KDIGA_GPU_SLOTS="0,1")
    assert res.returncode == 75
    assert "needs 3 devices at once, but the pool has only 2" in res.stderr
