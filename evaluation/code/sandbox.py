"""Run untrusted, model-generated programs (HumanEval/MBPP in Python, MultiPL-E in JavaScript and
C++) outside the evaluating process, many at a time, and say for each why it passed or not.

Every program (and, for C++, its compilation) is one fresh process tree in its own temporary
folder, removed afterwards, started with a minimal environment under `prlimit` (CPU time,
address space, file size, number of processes; no core files) and with `/bin/sh` as its first
process, so that a program killed by a signal is reported as in a shell (and, in a PID
namespace, the program is not PID 1, whose signal rules differ). What more holds depends on the
privileges of the evaluating process; `isolation()` probes it once per process.

As root (CI):
- the program runs as an unprivileged uid of its own (UID_BASE + n, one per worker, locked
  across processes, never a uid with an account), so RLIMIT_NPROC holds (Linux ignores it for
  root), a fork bomb cannot starve other workers, and the program can write neither the
  evaluator's files nor other workers' folders;
- where `unshare` works (CAP_SYS_ADMIN; many containers lack it): new PID, network and IPC
  namespaces, so every descendant dies with the program, even after fork + setsid, and there is
  no network (only a loopback that is down). Without a PID namespace, leftovers are found and
  killed by their uid after each program; without a network namespace the network is NOT
  isolated: logged once, and every verdict's detail says so.

As another user, the program runs as the evaluating user and can write whatever that user can
(only its folder is meant for it). With unprivileged user namespaces (`unshare -r`): PID,
network and IPC namespaces as above, and RLIMIT_NPROC counts only the processes inside the
namespace (Linux >= 5.14). Without them: the process group is killed and leftovers are found by
a token in their environment (a child that leaves the group and clears its environment
survives); RLIMIT_NPROC counts all of the user's processes, so it is set to their number now
plus PROCESS_LIMIT; no network isolation (logged, noted in each verdict).

In every mode world-writable folders (/tmp, /dev/shm) stay writable and world-readable files
readable. Needs util-linux (`prlimit`, `setpriv`, `unshare`) and Linux >= 5.3 (pidfd).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import math
import os
import pwd
import queue
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil

log = logging.getLogger(__name__)

Language = Literal["python", "js", "cpp"]
TIMEOUTS: dict[str, float] = {"python": 3.0, "js": 5.0, "cpp": 15.0}  # cpp: compile, run each
MEMORY_LIMIT = 4 << 30  # address space; node 20 needs about 0.75 GiB of it just to start
FILE_SIZE_LIMIT = 64 << 20
PROCESS_LIMIT = 64  # processes and threads of one program (node starts about 11 threads)
UID_BASE, UID_COUNT = 64000, 1000
CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"
TOKEN_VAR = "FLOWERTUNE_SANDBOX_JOB"  # in every program's environment: "<evaluator pid>-<hex>"
DETAIL_BYTES = 2000
NETWORK_WARNING = "network NOT isolated"
_UNSHARE_NOISE = "unshare: sigprocmask unblock failed: Invalid argument\n"  # its child was killed
_SOURCE = {"python": "program.py", "js": "program.js", "cpp": "program.cpp"}
_MEMORY_SIGNS = ("MemoryError", "bad_alloc", "out of memory", "allocation failed",
                 "Cannot allocate memory")
_INSTALL = {"node": "apt-get install nodejs", "g++": "apt-get install g++",
            "prlimit": "apt-get install util-linux", "setpriv": "apt-get install util-linux"}


@dataclass(frozen=True)
class Job:
    language: Language
    program: str  # the complete program (prompt + completion + tests)
    timeout: float | None = None  # None: TIMEOUTS[language]


@dataclass
class Verdict:
    status: str  # "passed" | "failed" | "timeout" | "compile_error" | "error" | "not_run"
    passed: bool
    detail: str  # why: exit code / signal / limit, then the end of stderr (about 2 kB)
    seconds: float


@dataclass(frozen=True)
class Isolation:
    """What the sandbox can set up on this machine, for this user."""

    pid_namespace: bool
    network_namespace: bool
    user_namespace: bool  # not root: the namespaces come with a user namespace
    separate_uid: bool  # root: programs run as unprivileged uids of their own

    def warnings(self) -> list[str]:
        found = []
        if not self.network_namespace:
            found.append(f"sandbox: {NETWORK_WARNING}: no network namespace (needs root with "
                         "CAP_SYS_ADMIN, or unprivileged user namespaces); programs can connect")
        if not self.pid_namespace:
            found.append("sandbox: no PID namespace; leftover processes are found by "
                         + ("uid" if self.separate_uid else "an environment token, which a "
                            "program can remove"))
        if not self.separate_uid:
            found.append("sandbox: not root, so programs run as this user and can write "
                         "whatever this user can")
        return found


@functools.cache
def isolation() -> Isolation:
    """Probe once which namespaces `unshare` can create here; log what is not isolated."""
    root = os.geteuid() == 0
    unshare = shutil.which("unshare")
    prefix = [unshare] if root else [unshare, "--map-root-user"]
    pid = unshare is not None and _succeeds([*prefix, "--pid", "--fork", "--kill-child",
                                             "--ipc", "true"])
    net = unshare is not None and _succeeds([*prefix, "--net", "true"])
    found = Isolation(pid, net, not root and (pid or net), root)
    for warning in found.warnings():
        log.warning(warning)
    return found


def _succeeds(command: list[str]) -> bool:
    try:
        return subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def missing_toolchain(language: Language) -> str | None:
    """None when `language` can run here, else what is missing and how to install it."""
    if language not in TIMEOUTS:
        raise ValueError(f"unknown language {language!r}: use one of {sorted(TIMEOUTS)}")
    tools = {"js": ["node"], "cpp": ["g++"], "python": []}[language] + ["prlimit"]
    if os.geteuid() == 0:
        tools.append("setpriv")
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} not found on PATH: {_INSTALL[tool]}"
    if not os.access("/bin/sh", os.X_OK):
        return "/bin/sh not found: the sandbox starts every program under it"
    return _python_choice(isolation())[1] if language == "python" else None


def python_interpreter() -> str | None:
    """The interpreter that runs Python programs in the sandbox here (None: none can)."""
    return _python_choice(isolation())[0]


@functools.cache
def _python_choice(iso: Isolation) -> tuple[str | None, str | None]:
    """The interpreter for Python programs: this one when the sandbox user can run it (root
    drops to another uid, which cannot enter e.g. /root), else a python3 on CLEAN_PATH (with
    a warning: the evaluator's packages are then missing); (None, hint) when neither runs."""
    same = f"import sys\nsys.exit(0 if sys.version == {sys.version!r} else 3)\n"
    with _uid_slots(1 if iso.separate_uid else 0) as uids:
        uid = uids[0] if uids else None
        own = _run_job(Job("python", same, 10.0), iso, uid, sys.executable)
        if own.passed:
            return sys.executable, None
        system = shutil.which("python3", path=CLEAN_PATH)
        if system and _run_job(Job("python", "", 10.0), iso, uid, system).passed:
            log.warning("sandbox: Python programs run with %s, not %s, which the sandbox user "
                        "cannot run as it is (%s)", system, sys.executable, own.detail[:200])
            return system, None
    return None, (f"the sandbox user cannot run {sys.executable} ({own.detail[:200]}) nor a "
                  f"python3 on {CLEAN_PATH}: make the interpreter's folders world-readable "
                  "(chmod o+rx) or apt-get install python3")


def run_jobs(jobs: Sequence[Job], workers: int | None = None,
             progress: Callable[[int], None] | None = None) -> list[Verdict]:
    """Run every job in the sandbox, `workers` at a time (default: one per core); verdicts in
    job order. `progress` gets the number of jobs just finished (tqdm's `update` fits): jobs
    whose toolchain is missing (status "not_run", the hint as detail) at once, then 1 each."""
    jobs = list(jobs)
    hints = {language: missing_toolchain(language) for language in {j.language for j in jobs}}
    verdicts: list[Verdict | None] = [
        Verdict("not_run", False, hint, 0.0) if (hint := hints[job.language]) else None
        for job in jobs]
    todo = [i for i, verdict in enumerate(verdicts) if verdict is None]
    if progress and len(todo) < len(jobs):
        progress(len(jobs) - len(todo))
    if todo:
        iso = isolation()
        python = _python_choice(iso)[0] if "python" in hints else None
        count = max(1, min(workers or os.cpu_count() or 1, len(todo)))
        with _uid_slots(count if iso.separate_uid else 0) as uids, \
                ThreadPoolExecutor(count, thread_name_prefix="sandbox") as pool:
            free: queue.SimpleQueue[int | None] = queue.SimpleQueue()
            for uid in uids or [None] * count:
                free.put(uid)

            def one(job: Job) -> Verdict:
                uid = free.get()
                try:
                    return _run_job(job, iso, uid, python)
                finally:
                    free.put(uid)

            futures = {pool.submit(one, jobs[i]): i for i in todo}
            for future in as_completed(futures):
                verdicts[futures[future]] = future.result()
                if progress:
                    progress(1)
    return verdicts  # type: ignore[return-value]  # every slot is filled


# ----------------------------------------------------------------------------- one job


@dataclass
class _Exit:
    code: int | None  # None: killed at the wall-clock timeout
    cpu_seconds: float
    stderr: str


def _run_job(job: Job, iso: Isolation, uid: int | None, python: str | None) -> Verdict:
    """Compile (C++) and run one program in a fresh folder; never raises."""
    start = time.monotonic()
    timeout = TIMEOUTS[job.language] if job.timeout is None else job.timeout
    cpu_limit = math.ceil(timeout) + 1
    note = "" if iso.network_namespace else f" [{NETWORK_WARNING}]"
    try:
        folder = Path(tempfile.mkdtemp(prefix="job-", dir=_work_root()))
    except (OSError, RuntimeError) as exc:
        return Verdict("error", False, f"sandbox error: {exc}{note}", time.monotonic() - start)
    try:
        (folder / _SOURCE[job.language]).write_text(job.program, encoding="utf-8")
        if uid is not None:
            os.chown(folder, uid, uid)

        def stage(argv: list[str]) -> _Exit:
            return _run_stage(argv, folder, uid, iso, timeout, cpu_limit)

        if job.language == "cpp":  # the harness's command line
            built = stage([shutil.which("g++") or "g++", "program.cpp", "-o", "program",
                           "-std=c++17"])
            if built.code != 0:
                why = (f"compile timed out after {timeout:g} s" if built.code is None
                       else f"compile error, exit code {built.code}")
                return Verdict("compile_error", False, _detail(why, built.stderr) + note,
                               time.monotonic() - start)
            argv = ["./program"]
        elif job.language == "js":
            argv = [shutil.which("node") or "node", "program.js"]
        else:
            argv = [python or sys.executable, "program.py"]
        status, why = _judge(stage(argv), timeout, cpu_limit)
        return Verdict(status, status == "passed", (why + note).strip(),
                       time.monotonic() - start)
    except (OSError, RuntimeError, psutil.Error) as exc:
        return Verdict("error", False, f"sandbox error: {exc!r}{note}", time.monotonic() - start)
    finally:
        _remove(folder)


def _judge(result: _Exit, timeout: float, cpu_limit: int) -> tuple[str, str]:
    if result.code is None:
        return "timeout", _detail(f"timed out after {timeout:g} s", result.stderr)
    if result.code == 0:
        return "passed", ""
    if result.cpu_seconds >= cpu_limit - 0.05:
        return "timeout", _detail(f"CPU time limit ({cpu_limit} s) reached", result.stderr)
    why = _exit_reason(result.code)
    if any(sign in result.stderr for sign in _MEMORY_SIGNS):
        why = f"memory error (limit {MEMORY_LIMIT >> 30} GiB address space), {why}"
    elif "File too large" in result.stderr or "SIGXFSZ" in why:  # Python ignores SIGXFSZ
        why = f"file size limit ({FILE_SIZE_LIMIT >> 20} MiB), {why}"
    return "failed", _detail(why, result.stderr)


def _exit_reason(code: int) -> str:
    """`sh` reports a child killed by signal N as exit code 128 + N."""
    number = -code if code < 0 else code - 128 if 128 < code < 128 + signal.NSIG else 0
    if not number:
        return f"exit code {code}"
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    return f"killed by {name}"


def _detail(why: str, stderr: str) -> str:
    stderr = stderr.strip()
    return f"{why}: {stderr}" if stderr else why


def _environment(folder: Path) -> dict[str, str]:
    return {"PATH": CLEAN_PATH, "HOME": str(folder), "TMPDIR": str(folder),
            "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
            TOKEN_VAR: f"{os.getpid()}-{uuid.uuid4().hex}"}


def _command(argv: list[str], iso: Isolation, uid: int | None, cpu_limit: int) -> list[str]:
    """unshare (namespaces) -> prlimit (limits) -> setpriv (root: drop to uid) -> sh -> argv."""
    command: list[str] = []
    if iso.pid_namespace or iso.network_namespace:
        command += [shutil.which("unshare") or "unshare"]
        command += ["--map-root-user"] if iso.user_namespace else []
        command += ["--pid", "--fork", "--kill-child", "--ipc"] if iso.pid_namespace else []
        command += ["--net"] if iso.network_namespace else []
        command.append("--")
    nproc = PROCESS_LIMIT if uid is not None or iso.user_namespace else (
        _own_thread_count() + PROCESS_LIMIT)
    command += [shutil.which("prlimit") or "prlimit", f"--cpu={cpu_limit}",
                f"--as={MEMORY_LIMIT}", f"--fsize={FILE_SIZE_LIMIT}", f"--nproc={nproc}",
                "--core=0", "--"]
    if uid is not None:
        command += [shutil.which("setpriv") or "setpriv", f"--reuid={uid}", f"--regid={uid}",
                    "--clear-groups", "--no-new-privs", "--"]
    return [*command, "/bin/sh", "-c", '"$@"; exit $?', "sandbox", *argv]


def _run_stage(argv: list[str], folder: Path, uid: int | None, iso: Isolation,
               timeout: float, cpu_limit: int) -> _Exit:
    """One sandboxed process tree: start it, wait up to `timeout`, kill all of it, reap it."""
    env = _environment(folder)
    with tempfile.TemporaryFile() as stderr:  # outside the folder; RLIMIT_FSIZE caps it
        proc = subprocess.Popen(_command(argv, iso, uid, cpu_limit), cwd=folder, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=stderr, start_new_session=True)
        timed_out = False
        try:
            timed_out = not _wait(proc.pid, timeout)
            if timed_out:
                _kill_tree(proc.pid, iso)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            if proc.returncode is None:  # interrupted: leave nothing behind
                _kill_tree(proc.pid, iso)
                proc.wait()
            if not iso.pid_namespace:
                _sweep(_owned_by({uid}) if uid is not None else _carrying(env[TOKEN_VAR]))
        stderr.seek(0, os.SEEK_END)
        stderr.seek(max(0, stderr.tell() - DETAIL_BYTES))
        tail = stderr.read().decode("utf-8", "replace").replace(_UNSHARE_NOISE, "")
    return _Exit(None if timed_out else proc.returncode, usage.ru_utime + usage.ru_stime, tail)


def _wait(pid: int, timeout: float) -> bool:
    """Whether process `pid` ended within `timeout` seconds (without reaping it)."""
    fd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))
    finally:
        os.close(fd)


def _kill_tree(pid: int, iso: Isolation) -> None:
    """SIGKILL the namespace's first process (the kernel then kills every process in it and
    `unshare` returns only after that), then the whole process group."""
    if iso.pid_namespace:
        first: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            first = psutil.Process(pid).children()
            for child in first:
                child.kill()
        if first and _wait(pid, 5.0):
            return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _owned_by(uids: set[int]) -> Callable[[psutil.Process], bool]:
    return lambda p: p.info["uids"] is not None and p.info["uids"].real in uids


def _carrying(token: str) -> Callable[[psutil.Process], bool]:
    def match(process: psutil.Process) -> bool:
        if process.info["uids"] is None or process.info["uids"].real != os.getuid():
            return False
        with contextlib.suppress(psutil.Error):
            return process.environ().get(TOKEN_VAR) == token
        return False

    return match


def _sweep(match: Callable[[psutil.Process], bool]) -> None:
    """Kill every process `match` picks, until none is left, zombies included: they still count
    against RLIMIT_NPROC until the system's init reaps them (a fork bomb also refills)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [p for p in psutil.process_iter(["uids", "status"]) if match(p)]
        if not found:
            return
        for process in found:
            if process.info["status"] != psutil.STATUS_ZOMBIE:
                with contextlib.suppress(psutil.Error):
                    process.kill()
        time.sleep(0.01)
    log.warning("sandbox: processes of a finished program are still there after 10 s")


def _own_thread_count() -> int:
    total = 0
    for process in psutil.process_iter(["uids", "num_threads"]):
        if process.info["uids"] is not None and process.info["uids"].real == os.getuid():
            total += process.info["num_threads"] or 1
    return total


def _remove(folder: Path) -> None:
    """Delete a job folder, also when the program made parts of it unreadable to us."""
    shutil.rmtree(folder, ignore_errors=True)
    if not folder.exists():
        return
    with contextlib.suppress(OSError):
        folder.chmod(0o700)
        for parent, names, _ in os.walk(folder):
            for name in names:
                if not os.path.islink(path := os.path.join(parent, name)):
                    os.chmod(path, 0o700)
    shutil.rmtree(folder, ignore_errors=True)
    if folder.exists():
        log.warning("sandbox: could not remove %s", folder)


# ----------------------------------------------------------------------------- places and uids


@functools.cache
def _work_root() -> Path:
    """The folder for job folders: ours, not writable by others, and reachable (o+x) from /
    so that the sandbox uids can enter their own job folder."""
    euid = os.geteuid()
    for base in (Path(tempfile.gettempdir()).resolve(), Path("/tmp")):
        if not all(os.stat(p).st_mode & stat.S_IXOTH for p in (base, *base.parents)):
            continue
        root = base / f"flowertune-sandbox-{euid}"
        with contextlib.suppress(FileExistsError):
            root.mkdir(mode=0o711)
        info = root.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != euid or info.st_mode & 0o022:
            raise RuntimeError(f"{root} is not a folder that only uid {euid} can write: "
                               "remove it and run again")
        root.chmod(0o711)
        return root
    raise RuntimeError(f"neither {tempfile.gettempdir()} nor /tmp can be entered by other "
                       "users: set TMPDIR to a folder whose parents are all o+x")


@contextlib.contextmanager
def _uid_slots(count: int) -> Iterator[list[int]]:
    """Lock `count` uids without an account for this process's workers (flock, so parallel
    evaluators on one machine never share one), after killing leftovers that run as them."""
    held: list[tuple[int, int]] = []
    try:
        if count:
            locks = _work_root() / "uid-locks"
            with contextlib.suppress(FileExistsError):
                locks.mkdir(mode=0o700)
            for uid in range(UID_BASE, UID_BASE + UID_COUNT):
                if len(held) == count:
                    break
                if _has_account(uid):
                    continue
                fd = os.open(locks / f"{uid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                held.append((uid, fd))
            if len(held) < count:
                raise RuntimeError(f"only {len(held)} of {count} sandbox uids are free in "
                                   f"{UID_BASE}..{UID_BASE + UID_COUNT - 1}: use fewer workers")
            _sweep(_owned_by({uid for uid, _ in held}))
        yield [uid for uid, _ in held]
    finally:
        for _, fd in held:
            os.close(fd)


def _has_account(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True
