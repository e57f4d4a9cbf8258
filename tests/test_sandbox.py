"""The code-execution sandbox: verdicts, limits, isolation and cleanup, with real programs."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from evaluation.code import sandbox
from evaluation.code.sandbox import (
    NETWORK_WARNING,
    TOKEN_VAR,
    Isolation,
    Job,
    isolation,
    missing_toolchain,
    run_jobs,
)

ROOT = os.geteuid() == 0
LANGUAGES = ["python", "js", "cpp"]
PASSING = {
    "python": "assert sum([1, 2]) == 3 and len('ü') == 1\n",  # UTF-8 source
    "js": "const assert = require('node:assert');\nassert.deepEqual([1, 2].length, 2);\n",
    "cpp": "#include <cassert>\nint main() { assert(1 + 2 == 3); }\n",
}
FAILING = {
    "python": "assert sum([1, 2]) == 4\n",
    "js": "const assert = require('node:assert');\nassert.deepEqual(1 + 2, 4);\n",
    "cpp": "#include <cassert>\nint main() { assert(1 + 2 == 4); }\n",
}
LOOPING = {
    "python": "while True:\n    pass\n",
    "js": "while (true) {}\n",
    "cpp": "int main() { volatile long i = 0; while (true) { i++; } }\n",
}
TEN_GB = {
    "python": "data = bytearray(10 << 30)\n",
    "js": "const data = new Float64Array(10 * 2 ** 30 / 8);\ndata.fill(1);\n",
    "cpp": "#include <vector>\nint main() { std::vector<char> v(10ull << 30); v[1] = 1; }\n",
}
# A child leaves the process group (setsid) and forks a grandchild that would sleep on.
ESCAPING_CHILD = """import os, time
pid = os.fork()
if pid == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(60)
    os._exit(0)
os.waitpid(pid, 0)
"""
FORK_BOMB = """import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""
# isolation() forced to what a container without CAP_SYS_ADMIN (root) or a user without user
# namespaces gets: leftovers must then be found by uid (root) or by environment token.
FALLBACKS = {"no-namespaces-uid": Isolation(False, False, False, True),
             "no-namespaces-token": Isolation(False, False, False, False)}


def one(job: Job) -> sandbox.Verdict:
    return run_jobs([job])[0]


def leftovers() -> list[psutil.Process]:
    """Live processes started by this test process's sandbox runs (their environment token)."""
    mine = f"{os.getpid()}-"
    found = []
    for process in psutil.process_iter(["status"]):
        try:
            if (process.info["status"] != psutil.STATUS_ZOMBIE
                    and process.environ().get(TOKEN_VAR, "").startswith(mine)):
                found.append(process)
        except psutil.Error:
            continue
    return found


@pytest.fixture(params=["probed", *FALLBACKS])
def mode(request, monkeypatch) -> str:
    """Each cleanup test runs with the isolation this machine has, and with the fallbacks."""
    if request.param == "no-namespaces-uid" and not ROOT:
        pytest.skip("only root can run programs as other uids")
    if request.param in FALLBACKS:
        monkeypatch.setattr(sandbox, "isolation", lambda: FALLBACKS[request.param])
    return request.param


@pytest.mark.parametrize("language", LANGUAGES)
def test_passing_and_failing_programs(language):
    passed, failed = run_jobs([Job(language, PASSING[language]), Job(language, FAILING[language])])
    assert (passed.status, passed.passed) == ("passed", True), passed.detail
    assert (failed.status, failed.passed) == ("failed", False)
    assert "ssert" in failed.detail  # the assertion's own message reaches the verdict


@pytest.mark.parametrize("language", LANGUAGES)
def test_infinite_loop_times_out_and_nothing_survives(language):
    start = time.monotonic()
    verdict = one(Job(language, LOOPING[language], timeout=1.0))
    assert verdict.status == "timeout" and not verdict.passed
    assert verdict.detail.startswith("timed out after 1 s")
    compile_seconds = 15.0 if language == "cpp" else 0.0
    assert verdict.seconds < 1.0 + 1.0 + compile_seconds
    assert time.monotonic() - start < 1.0 + 1.5 + compile_seconds
    assert not psutil.Process().children(recursive=True)
    assert not leftovers()


@pytest.mark.parametrize("ending", ["exits", "loops"])
def test_children_that_setsid_do_not_survive(mode, ending):
    program = ESCAPING_CHILD + ("while True:\n    pass\n" if ending == "loops" else "")
    verdict = one(Job("python", program, timeout=1.0))
    assert verdict.status == ("passed" if ending == "exits" else "timeout"), verdict.detail
    assert not psutil.Process().children(recursive=True)
    assert not leftovers()


def test_fork_bomb_is_contained(mode):
    if mode == "no-namespaces-token" and ROOT:
        pytest.skip("RLIMIT_NPROC does not hold for root: the real fallback drops to a uid")
    neighbour = ("import subprocess, time\ntime.sleep(0.5)\n"
                 "for _ in range(5):\n    subprocess.run(['true'], check=True)\n")
    bomb, other = run_jobs([Job("python", FORK_BOMB, timeout=2.0), Job("python", neighbour)],
                           workers=2)
    assert not bomb.passed and bomb.status in ("timeout", "failed")
    assert other.passed, other.detail  # another program could still start processes meanwhile
    assert not leftovers()
    assert one(Job("python", PASSING["python"])).passed


@pytest.mark.parametrize("language", LANGUAGES)
def test_ten_gigabyte_allocation_is_a_memory_error(language):
    rss = psutil.Process().memory_info().rss
    verdict = one(Job(language, TEN_GB[language]))
    assert verdict.status == "failed" and "memory error" in verdict.detail, verdict.detail
    assert psutil.Process().memory_info().rss < rss + (200 << 20)


def test_file_size_limit_and_short_detail():
    verdict = one(Job("python", "import sys\nsys.stderr.write('x' * 10000)\n"
                                "open('big', 'wb').write(bytes(100 << 20))\n"))
    assert verdict.status == "failed", verdict.detail[:200]
    assert verdict.detail.startswith("file size limit (64 MiB)")
    assert len(verdict.detail) < 2100  # the end of a long stderr, not all of it


def test_signal_is_named_in_the_verdict():
    verdict = one(Job("python", "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n"))
    assert verdict.status == "failed" and verdict.detail.startswith("killed by SIGSEGV")


def test_fresh_folder_clean_environment_removed_afterwards(monkeypatch):
    monkeypatch.setenv("FLOWERTUNE_TEST_SECRET", "leak")
    program = f"""import os, sys
assert "FLOWERTUNE_TEST_SECRET" not in os.environ
assert os.listdir(".") == ["program.py"] and os.environ["HOME"] == os.getcwd()
assert {not isolation().separate_uid} or os.getuid() != 0
print("FOLDER=" + os.getcwd(), file=sys.stderr)
raise SystemExit(7)
"""
    verdict = one(Job("python", program))
    assert verdict.status == "failed" and verdict.detail.startswith("exit code 7"), verdict.detail
    folder = Path(verdict.detail.split("FOLDER=")[1].split()[0])
    assert folder.name.startswith("job-") and not folder.exists()


@pytest.mark.skipif(not ROOT, reason="as non-root a program can write what the user can")
def test_write_outside_the_folder_fails():
    outside = Path(tempfile.mkdtemp(prefix="sandbox-test-"))
    try:
        outside.chmod(0o755)  # others may enter and read, not write: the evaluator's folders
        target = outside / "written.txt"
        inside = "open('x.txt', 'w').write('x')\nassert open('x.txt').read() == 'x'\n"
        verdicts = run_jobs([
            Job("python", f"open({str(target)!r}, 'w').write('x')\n"),
            Job("js", f"require('fs').writeFileSync({str(target)!r}, 'x');\n"),
            Job("python", inside)])
        assert [v.status for v in verdicts] == ["failed", "failed", "passed"]
        assert "Permission denied" in verdicts[0].detail
        assert not target.exists()
    finally:
        shutil.rmtree(outside)


def test_no_network_connection_reaches_a_local_server():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        verdicts = run_jobs([
            Job("python", f"import socket\nsocket.create_connection(('127.0.0.1', {port}), 2)\n"),
            Job("js", f"require('net').connect({port}, '127.0.0.1')"
                      ".on('connect', () => process.exit(0))"
                      ".on('error', (e) => { console.error(e.message); process.exit(1); });\n")])
        if not isolation().network_namespace:
            assert all(NETWORK_WARNING in v.detail for v in verdicts)
            pytest.skip("no network namespace here: the verdicts say so")
        assert [v.status for v in verdicts] == ["failed", "failed"]
        assert "unreachable" in verdicts[0].detail
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever connected


def test_without_network_namespace_every_verdict_says_so(monkeypatch):
    forced = Isolation(False, False, False, ROOT)
    assert any(NETWORK_WARNING in w for w in forced.warnings())
    monkeypatch.setattr(sandbox, "isolation", lambda: forced)
    verdict = one(Job("python", PASSING["python"]))
    assert verdict.passed and NETWORK_WARNING in verdict.detail


def test_cpp_compile_error():
    verdict = one(Job("cpp", "int main() { return 0 }\n"))
    assert verdict.status == "compile_error" and not verdict.passed
    assert "error" in verdict.detail


def test_missing_toolchain_is_not_run_with_the_hint(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda *args, **kwargs: None)
    assert missing_toolchain("js").startswith("node not found on PATH: apt-get install")
    assert missing_toolchain("cpp").startswith("g++ not found on PATH: apt-get install")
    calls = []
    verdict = run_jobs([Job("js", PASSING["js"])], progress=calls.append)[0]
    assert (verdict.status, verdict.passed) == ("not_run", False)
    assert verdict.detail == missing_toolchain("js") and calls == [1]


def test_run_jobs_keeps_order_and_runs_in_parallel():
    jobs = [Job("python", f"import time\ntime.sleep(1)\nraise SystemExit({i % 2})\n")
            for i in range(4)]
    calls = []
    start = time.monotonic()
    verdicts = run_jobs(jobs, workers=4, progress=calls.append)
    elapsed = time.monotonic() - start
    assert [v.status for v in verdicts] == ["passed", "failed", "passed", "failed"]
    assert elapsed < 2.5  # one after another would take 4 s
    assert sum(calls) == 4
