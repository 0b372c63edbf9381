"""The one-machine Slurm cluster of .ci/slurm/start.sh really schedules and runs jobs."""

from __future__ import annotations

import textwrap
from pathlib import Path

from tests.slurm_cluster import SlurmCluster


def _script(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body).lstrip())
    path.chmod(0o755)
    return path


def test_two_node_job_runs_one_task_per_node(slurm_cluster: SlurmCluster, tmp_path: Path):
    cpus = slurm_cluster.cpus_per_node("cpu")
    script = _script(
        tmp_path / "hostname.sbatch",
        f"""
        #!/bin/bash
        #SBATCH --job-name=two-nodes
        #SBATCH --partition=cpu
        #SBATCH --nodes=2
        #SBATCH --ntasks-per-node=1
        #SBATCH --cpus-per-task={cpus}
        #SBATCH --time=00:02:00
        srun bash -c 'echo "$SLURMD_NODENAME rank=$SLURM_PROCID"'
        """,
    )
    job = slurm_cluster.submit_and_wait(script, cwd=tmp_path, timeout_s=60)
    out = job.output()
    assert job.ok, f"{job}\n{out}\n{slurm_cluster.logs()}"
    # Default output file: slurm-<jobid>.out in the submit directory.
    assert job.stdout_path == tmp_path / f"slurm-{job.job_id}.out"
    lines = out.splitlines()
    assert len(lines) == 2, out
    assert sorted(line.split()[0] for line in lines) == ["n1", "n2"]
    assert sorted(line.split()[1] for line in lines) == ["rank=0", "rank=1"]


def test_master_addr_comes_from_node_addr(slurm_cluster: SlurmCluster, tmp_path: Path):
    # Emulated node names (n1, n2) do not resolve; the rendezvous address must come from
    # the head node's NodeAddr, as the generated job.sbatch does.
    assert slurm_cluster.node_addrs()["n1"] == "127.0.0.1"
    script = _script(
        tmp_path / "master.sbatch",
        """
        #!/bin/bash
        #SBATCH --partition=cpu
        #SBATCH --nodes=2
        #SBATCH --ntasks-per-node=1
        #SBATCH --time=00:02:00
        #SBATCH --output=%x-%j.out
        set -euo pipefail
        head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
        MASTER_ADDR=$(scontrol show node "$head_node" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')
        export MASTER_ADDR
        srun bash -c 'echo "$SLURMD_NODENAME MASTER_ADDR=$MASTER_ADDR"'
        """,
    )
    job = slurm_cluster.submit_and_wait(script, cwd=tmp_path, timeout_s=60)
    out = job.output()
    assert job.ok, f"{job}\n{out}\n{slurm_cluster.logs()}"
    assert job.stdout_path == tmp_path / f"master.sbatch-{job.job_id}.out"
    lines = sorted(out.splitlines())
    assert lines == ["n1 MASTER_ADDR=127.0.0.1", "n2 MASTER_ADDR=127.0.0.1"], out


GPU_JOB = """
#!/bin/bash
#SBATCH --job-name=gpu-plan
#SBATCH --partition=gpu
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=01:00:00
srun torchrun --nnodes={nodes} --nproc_per_node=8 train.py
"""


def test_test_only_accepts_4x8_gpus(slurm_cluster: SlurmCluster, tmp_path: Path):
    script = _script(tmp_path / "gpu4.sbatch", GPU_JOB.format(nodes=4))
    rc, out = slurm_cluster.test_only(script, cwd=tmp_path)
    assert rc == 0, out
    assert "to start at" in out and "in partition gpu" in out, out
    # A typed request is accepted too (command-line options override the #SBATCH lines).
    rc, out = slurm_cluster.test_only(script, cwd=tmp_path, args=["--gpus-per-node=h100:8"])
    assert rc == 0 and "to start at" in out, out


def test_test_only_rejects_more_nodes_than_exist(slurm_cluster: SlurmCluster, tmp_path: Path):
    script = _script(tmp_path / "gpu64.sbatch", GPU_JOB.format(nodes=64))
    rc, out = slurm_cluster.test_only(script, cwd=tmp_path)
    assert rc != 0, out
    assert "Requested node configuration is not available" in out, out
    # More GPUs per node than a node has is refused the same way.
    script9 = _script(tmp_path / "gpu9.sbatch", GPU_JOB.format(nodes=4).replace("=8\n", "=9\n"))
    rc, out = slurm_cluster.test_only(script9, cwd=tmp_path)
    assert rc != 0 and "Requested node configuration is not available" in out, out
