"""Plan → launch artifacts through the jinja2 templates. Same plan, byte-identical files; every value quoted."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jinja2

from dapc import __version__
from dapc.errors import DapcError
from dapc.lock import files_sha256
from dapc.plan import gib
from dapc.plan_schema import Plan
from dapc.resources import data_dir

# Slurm reads `#SBATCH` values without a shell, so a path there cannot be quoted: allow only these.
_SBATCH_SAFE = re.compile(r"^[A-Za-z0-9._/%+=:,@-]+$")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(data_dir("templates"))),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["q"] = lambda value: shlex.quote(str(value))
    env.filters["yq"] = lambda value: json.dumps(str(value), ensure_ascii=False)  # a JSON string is YAML
    return env


def _k8s_name(name: str) -> str:
    # The training-operator's webhook wants a DNS-1035 label (a letter first, no '-' at either end), and names the
    # job's pods and Services NAME-worker-INDEX, which must stay within 63 characters: 50 leave room for that.
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "dapc"
    return (label if label[0].isalpha() else f"dapc-{label}")[:50].rstrip("-")


def _sbatch_safe(value: str, what: str) -> str:
    if not _SBATCH_SAFE.match(value):
        raise DapcError(f"{what} {value!r} has characters a #SBATCH line cannot carry; use letters, digits and ._/%+=:,@-")
    return value


def template_context(plan: Plan, out_dir: Path) -> dict[str, Any]:
    """Returns the values the templates interpolate, each taken once from the plan."""
    r, batch, mem, c = plan.recipe, plan.batch, plan.memory, plan.cost
    launch, slurm = r.launch, r.launch.slurm
    has_gpu = not plan.device.is_cpu
    output_dir = plan.paths.output_dir
    nodes, gpus = batch.nodes, batch.gpus_per_node
    slurm_output = _sbatch_safe(f"{output_dir}/slurm-%j.out", "output directory")
    python = launch.python
    ready = " && ".join(f"[ -f {shlex.quote(s.prepared_dir + '/manifest.json')} ]" for s in plan.corpus.sources)
    wait = f"until {ready}; do sleep 10; done"
    train = f'{shlex.quote(python)} -m torch.distributed.run -m runtime.train --plan "$DAPC_PLAN"'
    prepare = f'{shlex.quote(python)} -m runtime.prepare --plan "$DAPC_PLAN"'
    roles = [("Master", 1, f"{prepare} && {train}")] + ([("Worker", nodes - 1, f"{wait} && {train}")] if nodes > 1 else [])
    return {
        "version": __version__,
        "name": r.name,
        "k8s_name": _k8s_name(r.name),
        "recipe_sha256": plan.recipe_sha256,
        "plan_sha256": plan.plan_sha256,
        "python": python,
        "rdzv_port": launch.rdzv_port,
        "env": sorted(plan.runtime.env.items()),
        "passthrough_env": list(plan.runtime.passthrough_env),
        "secrets_name": launch.secrets_name,
        "stop_file": plan.runtime.preemption.stop_file,
        "signal_seconds": plan.runtime.preemption.signal_seconds,
        "nodes": nodes,
        "gpus_per_node": gpus,
        "gpus_per_node_directive": has_gpu,
        "gpu_resource": has_gpu,
        "cpus_per_task": slurm.cpus_per_task or 8 * gpus,
        "time": slurm.time,
        "partition": slurm.partition,
        "account": slurm.account,
        "extra_directives": [_sbatch_safe(d, "extra directive") for d in slurm.extra_directives],
        "slurm_output": slurm_output,
        "plan_path": str(out_dir / "plan.json"),
        "has_eval": bool(r.eval.benchmarks),
        "has_ds_config": plan.runtime.deepspeed is not None,
        "namespace": launch.namespace,
        "image": launch.container_image or "nvcr.io/nvidia/pytorch:25.01-py3",
        "roles": roles,
        "output_dir": output_dir,
        "plan_text": plan.text(),
        "model": plan.model.name,
        "total_params": f"{plan.model.params.total:,}",
        "trainable_params": f"{plan.method.trainable_params:,}",
        "method": plan.method.name,
        "device": plan.device.name,
        "strategy": plan.strategy.name,
        "reason": plan.strategy.reason,
        "micro_batch": batch.micro_batch,
        "grad_accum": batch.grad_accum,
        "world_size": batch.world_size,
        "global_batch_sequences": batch.global_batch_sequences,
        "seq_len": batch.seq_len,
        "activation_checkpointing": plan.activation_checkpointing,
        "total_gib": gib(mem.per_gpu_bytes.total),
        "capacity_gib": gib(mem.device_capacity_bytes),
        "counter": mem.counter,
        "steps": f"{c.steps:,}",
        "tokens": f"{c.tokens:,}",
        "wall_hours": f"{c.wall_seconds / 3600:.2f}",
        "gpu_hours": f"{c.gpu_hours:.1f}",
        "usd": f"{c.usd:,.0f}",
        "kwh": f"{c.kwh:,.0f}",
    }


def render_artifacts(plan: Plan, out_dir: Path) -> dict[str, str]:
    """Returns the artifacts' file names and texts for `plan`, to be written into `out_dir`; plan.json's lock
    holds the sha256 of every corpus file (read here, once)."""
    plan = with_corpus_lock(plan)
    env = _environment()
    ctx = template_context(plan, out_dir)
    files = {
        "plan.json": plan.text(),
        "launch.sh": env.get_template("launch.sh.j2").render(ctx),
        "job.sbatch": env.get_template("job.sbatch.j2").render(ctx),
        "README.md": env.get_template("README.md.j2").render(ctx),
    }
    files["pytorchjob.yaml"] = env.get_template("pytorchjob.yaml.j2").render(ctx)
    if plan.runtime.deepspeed is not None:
        files["ds_config.json"] = json.dumps(plan.runtime.deepspeed, sort_keys=True, indent=2, allow_nan=False) + "\n"
    return files


def with_corpus_lock(plan: Plan) -> Plan:
    """Returns `plan` with `provenance.lock.corpus_sha256` filled from the corpus files as they are now."""
    lock = plan.provenance.lock
    if lock.corpus_sha256 is not None:
        return plan
    try:
        hashes = files_sha256([f.path for f in plan.corpus.files])
    except OSError as e:
        raise RenderError(f"cannot read a corpus file to lock it: {e.strerror or e}", e.filename or "") from e
    locked = lock.model_copy(update={"corpus_sha256": hashes})
    return plan.model_copy(update={"provenance": plan.provenance.model_copy(update={"lock": locked})})


MANIFEST_NAME = ".dapc-render.json"  # what the last render wrote here, with each file's sha256


class RenderError(DapcError):
    """A render that would destroy files dapc did not write, or cannot write where it was told."""


def write_artifacts(files: dict[str, str], out_dir: Path, force: bool = False) -> list[Path]:
    """Writes the artifacts into `out_dir` and returns their paths; never destroys what dapc did not write.

    A file of the same name that the last render did not write (or that was edited since) is refused unless
    `force`. Every file is staged in a folder beside the targets first and then renamed into place, so a
    failure leaves the earlier render whole; artifacts of the last render that this one no longer writes
    (a `ds_config.json` after switching to FSDP2) are removed when unedited. Files get the umask's mode.
    """
    _check_target(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        return _write_staged(files, out_dir, force)
    except OSError as e:
        raise RenderError(f"cannot write here: {e.strerror or e}", str(out_dir)) from e


def _write_staged(files: dict[str, str], out_dir: Path, force: bool) -> list[Path]:
    previous = _previous_manifest(out_dir)
    clashes = sorted(name for name in files if (out_dir / name).exists() and not _ours(out_dir / name, previous))
    if clashes and not force:
        raise RenderError(f"holds {', '.join(clashes)} that dapc did not write (or that changed since it rendered "
                          "them); render elsewhere with -o, or pass --force to replace them", str(out_dir))
    umask = _umask()
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".dapc-render-"))
    try:
        for name in sorted(files):
            _write_file(staging / name, files[name], (0o777 if name.endswith((".sh", ".sbatch")) else 0o666) & ~umask)
        manifest = {"files": {name: _sha256(files[name].encode("utf-8")) for name in sorted(files)}}
        _write_file(staging / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True) + "\n", 0o666 & ~umask)
        for name in sorted(files):
            os.replace(staging / name, out_dir / name)
        for name in sorted(set(previous) - set(files)):
            stale = out_dir / name
            if stale.is_file() and _ours(stale, previous):
                stale.unlink()
        os.replace(staging / MANIFEST_NAME, out_dir / MANIFEST_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out_dir / name for name in sorted(files)]


def _check_target(out_dir: Path) -> None:
    if str(out_dir) in ("", "."):
        raise RenderError("the output directory is empty; name one with -o DIR")
    for folder in (out_dir, *out_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise RenderError(f"{folder} is a file, not a directory", str(out_dir))


def _previous_manifest(out_dir: Path) -> dict[str, str]:
    try:
        files = json.loads((out_dir / MANIFEST_NAME).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {k: v for k, v in files.items() if isinstance(k, str) and isinstance(v, str) and "/" not in k}


def _ours(path: Path, previous: dict[str, str]) -> bool:
    if path.name not in previous or not path.is_file() or path.is_symlink():
        return False
    try:
        return _sha256(path.read_bytes()) == previous[path.name]
    except OSError:
        return False


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def _write_file(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(path, mode)  # O_CREAT applied the umask already; chmod states it exactly
