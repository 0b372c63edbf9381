"""A real, one-machine Slurm cluster for the test suite (started by .ci/slurm/start.sh).

Use the session-scoped fixture ``slurm_cluster``: import it into a conftest
(``from tests.slurm_cluster import slurm_cluster``) or into a test module.

Cluster shape (see .ci/slurm/start.sh):
  * partition ``cpu`` (default): nodes n1, n2, 2 CPUs each (DAPC_SLURM_CPUS), NodeAddr 127.0.0.1;
    jobs really run there.
  * partition ``gpu``: nodes g1..g16, 64 CPUs, 512000 MB, Gres=gpu:h100:8 each; for
    ``sbatch --test-only`` (jobs could start there, but the "GPUs" are plain files).

The fixture never skips: when Slurm cannot start, it fails with the daemons' logs.
While the session runs, ``os.environ["SLURM_CONF"]`` points at the cluster, so code under test
that shells out to sbatch/srun/scontrol talks to it. The daemons are left running after the
session (the next start.sh call reuses them in ~0.1 s); set DAPC_SLURM_STOP_AT_EXIT=1 to stop
them at the end, or run .ci/slurm/stop.sh.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
START_SH = REPO_ROOT / ".ci" / "slurm" / "start.sh"
STOP_SH = REPO_ROOT / ".ci" / "slurm" / "stop.sh"
DEFAULT_STATE_DIR = "/tmp/dapc-slurm"

# States after which a job does not change any more.
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
    }
)


@dataclass(frozen=True)
class JobResult:
    job_id: str
    state: str  # Slurm JobState: COMPLETED, FAILED, CANCELLED, TIMEOUT, ...
    exit_code: int  # exit status of the batch script (first half of Slurm's "ExitCode=N:S")
    stdout_path: Path | None  # Slurm's StdOut, with %j etc. expanded
    signal: int = 0  # second half of "ExitCode=N:S"
    info: dict[str, str] = field(default_factory=dict, repr=False)  # last `scontrol show job`

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED" and self.exit_code == 0

    def output(self) -> str:
        if self.stdout_path is None or not self.stdout_path.exists():
            return ""
        return self.stdout_path.read_text(errors="replace")


def _parse_kv(text: str) -> dict[str, str]:
    """Parse `scontrol show ... -o` output (space-separated Key=Value) of one record."""
    out: dict[str, str] = {}
    for tok in text.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            out.setdefault(k, v)
    return out


class SlurmCluster:
    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.conf = state_dir / "etc" / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.cpu_partition = "cpu"
        self.gpu_partition = "gpu"

    # ------------------------------------------------------------------ low level
    def run(self, *args: str, cwd: str | os.PathLike | None = None, timeout: float = 60,
            check: bool = False) -> subprocess.CompletedProcess:
        """Run a Slurm client command (sbatch, scontrol, ...) against this cluster."""
        proc = subprocess.run(
            [str(a) for a in args], cwd=cwd, env=self.env, capture_output=True, text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def logs(self, lines: int = 60) -> str:
        """The last lines of each daemon log, for failure messages."""
        parts = []
        for f in sorted((self.state_dir / "log").glob("*.log")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"===== {f} =====\n" + "\n".join(text))
        return "\n".join(parts)

    # ------------------------------------------------------------------ helpers
    def test_only(self, script_path, cwd=None, *, args: Sequence[str] = ()) -> tuple[int, str]:
        """`sbatch --test-only [args] script`: (returncode, stdout+stderr).

        Accepted: rc 0 and "Job N to start at ... on nodes ... in partition ...".
        Refused: rc 1 and e.g. "allocation failure: Requested node configuration is not available".
        """
        proc = self.run("sbatch", "--test-only", *args, str(script_path), cwd=cwd)
        return proc.returncode, proc.stdout + proc.stderr

    def submit(self, script_path, cwd=None, *, args: Sequence[str] = ()) -> str:
        """`sbatch --parsable [args] script` from cwd (the default output file
        slurm-<id>.out lands there); returns the job id."""
        proc = self.run("sbatch", "--parsable", *args, str(script_path), cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {script_path} failed ({proc.returncode}):\n"
                               f"{proc.stdout}{proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str] | None:
        """`scontrol show job -o` as a dict, or None once Slurm has forgotten the job."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id))
        if proc.returncode != 0 or not proc.stdout.strip():
            return None
        return _parse_kv(proc.stdout.splitlines()[0])

    def wait(self, job_id: str, timeout_s: float = 120) -> JobResult:
        """Poll `scontrol show job` until the job ends (finished jobs stay visible for
        MinJobAge=300 s). On timeout the job is cancelled and TimeoutError raised."""
        deadline = time.monotonic() + timeout_s
        info: dict[str, str] | None = None
        delay = 0.1
        while True:
            new = self.job_info(job_id)
            if new is None:  # forgotten: keep what we last saw
                state = (info or {}).get("JobState", "UNKNOWN")
                if state not in TERMINAL_STATES:
                    state = "UNKNOWN"
                break
            info = new
            state = info.get("JobState", "UNKNOWN")
            if state in TERMINAL_STATES:
                break
            if time.monotonic() > deadline:
                self.run("scancel", str(job_id))
                raise TimeoutError(
                    f"Slurm job {job_id} still {state} after {timeout_s}s "
                    f"(reason {info.get('Reason')}); cancelled.\n{self.logs()}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        info = info or {}
        code, _, sig = info.get("ExitCode", "0:0").partition(":")
        out = info.get("StdOut")
        return JobResult(
            job_id=str(job_id),
            state=state,
            exit_code=int(code or 0),
            signal=int(sig or 0),
            stdout_path=Path(out) if out and out != "(null)" else None,
            info=info,
        )

    def submit_and_wait(self, script_path, cwd=None, timeout_s: float = 120, *,
                        args: Sequence[str] = ()) -> JobResult:
        return self.wait(self.submit(script_path, cwd, args=args), timeout_s)

    def node_addrs(self) -> dict[str, str]:
        """{node name: NodeAddr}; emulated names (n1, g1, ...) do not resolve, their
        NodeAddr (127.0.0.1) does."""
        proc = self.run("scontrol", "show", "node", "-o", check=True)
        addrs = {}
        for line in proc.stdout.splitlines():
            kv = _parse_kv(line)
            if "NodeName" in kv:
                addrs[kv["NodeName"]] = kv.get("NodeAddr", "")
        return addrs

    def cpus_per_node(self, partition: str = "cpu") -> int:
        proc = self.run("sinfo", "-h", "-p", partition, "-o", "%c", check=True)
        return int(proc.stdout.split()[0])


_CLUSTER: SlurmCluster | None = None


def start_cluster() -> SlurmCluster:
    """Run start.sh (idempotent) and return the cluster; pytest.fail with the logs if it
    cannot start. Cached for the process."""
    global _CLUSTER
    if _CLUSTER is not None:
        return _CLUSTER
    state_dir = Path(os.environ.get("DAPC_SLURM_DIR", DEFAULT_STATE_DIR))
    try:
        proc = subprocess.run(
            ["bash", str(START_SH)], env=dict(os.environ, DAPC_SLURM_DIR=str(state_dir)),
            capture_output=True, text=True, timeout=600,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{START_SH} timed out after {e.timeout}s:\n{e.stdout}\n{e.stderr}",
                    pytrace=False)
    if proc.returncode != 0:
        pytest.fail(
            f"Slurm test cluster did not start ({START_SH} exited {proc.returncode}):\n"
            f"{proc.stdout}\n{proc.stderr}",
            pytrace=False,
        )
    _CLUSTER = SlurmCluster(state_dir.resolve())
    return _CLUSTER


@pytest.fixture(scope="session")
def slurm_cluster():
    cluster = start_cluster()
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        if os.environ.get("DAPC_SLURM_STOP_AT_EXIT") == "1":
            subprocess.run(["bash", str(STOP_SH)], env=cluster.env, timeout=60)
