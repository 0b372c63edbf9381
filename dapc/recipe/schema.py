"""The recipe: what the user said. Typed records (`dapc.typed`), unknown keys refused, every field typed,
defaulted, described.

Validators here only check; derived values (tokens, steps, micro-batch, strategy) are the planner's job.
"""


import re
from typing import Annotated, Literal

from dapc.dtypes import Precision
from dapc.models.params import LINEAR_MODULES
from dapc.typed import Field, Model, field_validator, model_validator

SAFE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SafeName = Annotated[str, Field(pattern=SAFE_NAME_PATTERN)]
# Kubernetes names of namespaces and labels: an RFC 1123 label (lower case, digits, '-', alphanumeric ends).
K8S_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
K8sLabel = Annotated[str, Field(pattern=K8S_LABEL_PATTERN)]
# Variables the rendered scripts set or torchrun reads: an env entry of the same name would override them.
RESERVED_ENV_NAMES = frozenset({"plan", "plan_dir", "master_addr", "master_port", "head_node", "stop_file",
                                "missing", "child", "status", "DAPC_PLAN", "MASTER_ADDR", "MASTER_PORT", "RANK",
                                "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "PYTHONUNBUFFERED"})

StrategyName = Literal[
    "ddp",
    "fsdp2-full",
    "fsdp2-hybrid",
    "fsdp2-offload-cpu",
    "zero1",
    "zero2",
    "zero2-offload-cpu",
    "zero3",
    "zero3-offload-cpu",
    "zero3-offload-cpu-full",
    "zero3-offload-nvme",
]
STRATEGY_NAMES: tuple[str, ...] = StrategyName.__args__  # type: ignore[attr-defined]


class Section(Model):
    """A recipe section: unknown keys refused, lax input (YAML's `3e-4` is a float). A sub-section left out
    defaults to `{}` (default_factory=dict), checked like a written one."""


class ModelSection(Section):
    source: str = Field(
        description="A catalog name (e.g. meta-llama/Llama-3.1-8B), an HF id in the local HF cache, "
        "or a path to a config.json or to a directory holding one (relative to the recipe file)."
    )
    dtype: Precision = Field("bf16", description="Dtype the base weights are loaded in.")
    init: Literal["pretrained", "random"] = Field(
        "pretrained",
        description="`pretrained` loads the weights at `source`; `random` builds the model from its config "
        "with random weights (tests, tiny examples).",
    )


class LoraSection(Section):
    r: int = Field(16, ge=1, le=4096, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[Literal[LINEAR_MODULES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(LINEAR_MODULES),
        min_length=1,
        description="Decoder Linear modules that get adapters.",
    )


class MethodSection(Section):
    name: Literal["full", "lora", "qlora"] = Field(
        "full", description="full continued pretraining, LoRA (frozen base), or QLoRA (frozen 4-bit base)."
    )
    lora: LoraSection = Field(default_factory=dict, description="Adapter settings (lora, qlora).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="QLoRA 4-bit data type.")
    double_quant: bool = Field(True, description="QLoRA: quantize the quantization constants too.")


DataFormat = Literal["text", "jsonl", "parquet", "chat", "prompt-completion", "preference"]
# Formats of supervised fine-tuning records (JSONL, one record a line): the trainer learns their assistant part.
RECORD_FORMATS = ("chat", "prompt-completion", "preference")
PREFERENCE_OBJECTIVES = ("dpo", "orpo")  # trained on preference pairs, two sequences per example


class SourceSection(Section):
    """One named part of the corpus and how much of the training stream it gets: `weight` (a share of what the
    sources with a weight divide among them), `tokens` (that many tokens) or `epochs` (that many passes)."""

    name: SafeName = Field(description="Names the source in the plan, the prepared data and the metrics.")
    paths: list[str] = Field(min_length=1, description="Files, directories (read recursively) or globs, relative "
                             "to the recipe file.")
    format: DataFormat | None = Field(None, description="How its files are read; defaults to `data.format`.")
    text_field: str | None = Field(None, min_length=1, description="The field holding the text (jsonl, parquet); "
                                   "defaults to `data.text_field`.")
    weight: float | None = Field(None, gt=0, description="Relative share of the tokens the weighted sources get "
                                 "(the default, 1, when neither `tokens` nor `epochs` is set).")
    tokens: int | None = Field(None, ge=1, description="Training tokens drawn from this source.")
    epochs: float | None = Field(None, gt=0, le=1000, description="Passes over this source's estimated tokens.")

    @model_validator(mode="after")
    def _one_amount(self) -> "SourceSection":
        given = [k for k in ("weight", "tokens", "epochs") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"set one of weight, tokens or epochs, not {' and '.join(given)}")
        return self


class ReplaySection(Section):
    """General text mixed into the domain stream at a fixed share of all training tokens (Ibrahim et al. 2024,
    arXiv 2403.08763: replay bounds forgetting in continued pretraining)."""

    name: SafeName = Field("replay", description="Names the replay source.")
    paths: list[str] = Field(min_length=1, description="General-text files, directories or globs.")
    format: DataFormat | None = Field(None, description="How its files are read; defaults to `data.format`.")
    text_field: str | None = Field(None, min_length=1, description="Defaults to `data.text_field`.")
    share: float = Field(gt=0, lt=1, description="Share of all training tokens drawn from the replay text.")


class DedupSection(Section):
    exact: bool = Field(False, description="Drop a document whose normalized text (NFKC, lower case, whitespace "
                        "collapsed) equals an earlier one's.")
    near: bool = Field(False, description="Drop near-duplicates: MinHash LSH over word shingles (datasketch).")
    near_threshold: float = Field(0.8, gt=0, lt=1, description="Estimated Jaccard similarity at which a document "
                                  "is a near-duplicate of an earlier one.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations.")
    shingle_words: int = Field(5, ge=1, le=64, description="Words per shingle.")


class DecontaminationSection(Section):
    enabled: Literal["auto"] | bool = Field(
        "auto", description="Drop documents that share word n-grams with the recipe's eval benchmarks (question "
        "and options), listed in the manifest. `auto`: on when `eval.benchmarks` names any.")
    ngram: int = Field(13, ge=3, le=64, description="Words per n-gram (13 as in GPT-3 and lm-evaluation-harness).")
    min_matches: int = Field(1, ge=1, description="Distinct n-grams of one benchmark item a document must hold "
                             "to count as contaminated.")


class DataSection(Section):
    paths: list[str] = Field(
        default_factory=list,
        description="Corpus files, directories (read recursively) or globs, relative to the recipe file: one "
        "source. Give `paths` or `sources`, not both.",
    )
    sources: list[SourceSection] = Field(
        default_factory=list, description="Named corpus sources with their share of the training stream.")
    replay: ReplaySection | None = Field(None, description="General text replayed at a fixed share of all tokens.")
    format: DataFormat = Field(
        "text", description="How each corpus file is read: `text`, `jsonl` or `parquet` documents (continued "
        "pretraining), or JSONL records for `training.objective: sft`: `chat` ({\"messages\": [{\"role\": "
        "\"system\"|\"user\"|\"assistant\", \"content\": str}, ...]}) or `prompt-completion` ({\"prompt\": str, "
        "\"completion\": str}), or `preference` pairs for `dpo`/`orpo` ({\"prompt\": str or messages, \"chosen\": "
        "str or [assistant message], \"rejected\": likewise}).")
    chat_template: Literal["auto", "chatml"] = Field(
        "auto", description="How `chat` records become text: `auto` uses the tokenizer's own chat_template, else "
        "the built-in `chatml` (`<|im_start|>role\\ncontent<|im_end|>\\n`, written as plain text).")
    text_field: str = Field("text", min_length=1, description="The field holding the text (jsonl, parquet).")
    dedup: DedupSection = Field(default_factory=dict, description="Deduplication in `prepare` (off).")
    decontamination: DecontaminationSection = Field(
        default_factory=dict, description="Dropping documents that hold eval benchmark items.")
    tokenizer: str | None = Field(
        None, description="Tokenizer directory or HF id; defaults to the model source."
    )
    document_boundaries: Literal["concatenate", "separate"] = Field(
        "concatenate", description="Packed documents as one stream (`concatenate`), or `separate`: positions restart "
        "after every EOS and attention stays inside each document (transformers' packed-sequence mask: an s×s mask "
        "per sequence under SDPA, which also leaves the flash kernel).")
    seq_len: int = Field(2048, ge=8, le=1_048_576, description="Tokens per packed training sequence.")
    validation_fraction: float = Field(
        0.01, ge=0, lt=0.5, description="Share of documents held out for validation perplexity."
    )
    tokens_per_byte: float = Field(
        0.25,
        gt=0,
        le=2,
        description="Assumed tokens per corpus byte, used to estimate the token count before `prepare` "
        "counts it exactly (Llama-3's tokenizer gives about 0.24 on English prose).",
    )
    prepared_dir: str | None = Field(
        None, description="Where `prepare` writes the packed shards; defaults to <output>/data."
    )

    @model_validator(mode="after")
    def _paths_or_sources(self) -> "DataSection":
        if bool(self.paths) == bool(self.sources):
            raise ValueError("give the corpus as `paths` or as `sources`, exactly one of them")
        names = [s.name for s in self.sources] + ([self.replay.name] if self.replay else [])
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"source name {twice[0]!r} is used twice")
        return self


class PreferenceSection(Section):
    beta: float = Field(0.1, gt=0, le=100, description="dpo: the KL weight β of the sigmoid loss (Rafailov et al. "
                        "2023); orpo: the odds-ratio term's weight λ (Hong et al. 2024).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo: the share of preference labels assumed "
                                   "flipped (conservative DPO, cDPO); 0 is plain DPO.")
    reference: Literal["auto", "precomputed"] = Field(
        "auto", description="dpo: where the reference log-probabilities come from. `auto`: scored every step, by "
        "the base with the adapters disabled (LoRA/QLoRA) or a frozen copy of the starting model (full). "
        "`precomputed`: the starting model scores every training pair once before step 1 (kept beside the run, "
        "reused on resume); no reference model is held or run during training.")


class TrainingSection(Section):
    objective: Literal["cpt", "sft", "dpo", "orpo"] = Field(
        "cpt", description="`cpt`: continued pretraining, every next token is a target. `sft`: supervised "
        "fine-tuning on `chat` or `prompt-completion` records, only assistant (completion) tokens are targets. "
        "`dpo`: direct preference optimization on `preference` pairs against a reference model (the base with "
        "adapters off under LoRA/QLoRA, a frozen copy under full training). `orpo`: odds-ratio preference "
        "optimization, reference-free (SFT on the chosen response plus an odds-ratio penalty).")
    preference: PreferenceSection = Field(default_factory=dict,
                                          description="dpo/orpo loss settings (ignored by cpt and sft).")
    tokens: int | None = Field(None, ge=1, description="Token budget; overrides `epochs`.")
    epochs: float = Field(1.0, gt=0, le=1000, description="Passes over the corpus when `tokens` is unset.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    global_batch_tokens: int | None = Field(
        None, ge=1, description="Tokens per optimizer step (must be a multiple of seq_len)."
    )
    global_batch_sequences: int | None = Field(
        None, ge=1, description="Sequences per optimizer step (dpo/orpo: preference pairs, two sequences each); "
        "default 4 Mi tokens / seq_len (dpo/orpo: / 2·seq_len)."
    )
    micro_batch: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(
        "auto", description="Sequences (dpo/orpo: pairs) per GPU per forward pass; `auto` lets the planner pick."
    )
    activation_checkpointing: Literal["auto", "off", "selective", "full"] | bool = Field(
        "auto", description="Recompute activations in backward: `full` (each layer keeps its input), `selective` "
        "(keeps every matmul's and attention's output, recomputes the cheap ops between them), `off`; true and "
        "false mean full and off. `auto` lets the planner pick.",
    )
    checkpoint_every_layers: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(
        "auto", description="Under full checkpointing, checkpoint only every k-th decoder layer (the first of each "
        "k); the others keep all their activations (torchtitan's per-layer mode): less recomputation for more "
        "memory. `auto`: the planner tries 1, 2 and 4 when it picks the mode, else 1 (a pinned `full` is every layer).")
    fsdp_embedding_units: Literal["auto", "separate", "root"] = Field(
        "auto",
        description="FSDP2: give the embedding and the LM head units of their own, resharded after use "
        "(`separate`, as torchtitan does: less memory, one more all-gather of each in backward), or leave them "
        "in the root unit, which stays gathered from forward through backward (`root`). `auto`: separate "
        "unless the embeddings are tied.",
    )
    chunked_loss: Literal["auto"] | bool = Field(
        "auto",
        description="Compute the cross-entropy `loss_chunk_tokens` positions at a time inside the LM head, "
        "recomputing each chunk's logits in backward (torchtune, torchtitan): the fp32 logits of the whole "
        "micro-batch never exist, for one more LM-head forward. `auto`: on for GPUs, off on the CPU device.",
    )
    loss_chunk_tokens: int = Field(1024, ge=1, description="Positions per chunk of the chunked loss.")
    compile: Literal["auto"] | bool = Field(
        "auto",
        description="torch.compile each decoder layer. `auto`: on for GPUs with full fine-tuning or LoRA under "
        "DDP/FSDP2; off for QLoRA, DeepSpeed and the CPU device.",
    )
    optimizer: Literal["adamw", "adamw-8bit"] = Field("adamw", description="AdamW, or bitsandbytes 8-bit AdamW.")
    lr: float = Field(2e-5, gt=0, lt=1, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a share of `lr`.")
    schedule: Literal["cosine", "linear", "constant", "wsd", "constant-with-cooldown"] = Field(
        "cosine", description="After warmup: cosine or linear decay to the floor over the remaining steps; "
        "constant; `wsd` (warmup-stable-decay: constant, then a linear decay over the last `decay_fraction` of "
        "steps); `constant-with-cooldown` (the same with a 1-sqrt cooldown, Hägele et al. 2024).")
    warmup_fraction: float = Field(0.01, ge=0, lt=1, description="Share of steps spent warming up.")
    warmup_start_lr: float = Field(
        0.0, ge=0, lt=1, description="Learning rate the warmup starts from: 0, or re-warming from the pretrained "
        "model's final learning rate (Ibrahim et al. 2024).")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd / constant-with-cooldown: share of steps spent "
                                  "decaying at the end.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float | None = Field(1.0, gt=0, description="Global gradient-norm clip; null disables.")
    precision: Precision = Field("bf16", description="bf16/fp16 mixed precision (fp32 master weights) or fp32.")
    weights_dtype: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="Dtype the trained weights, their gradients and AdamW states are stored in. fp32: an fp32 master "
        "copy under bf16/fp16 compute (mixed precision). bf16: pure bf16 training, no fp32 copy (torchtune's "
        "default; needs precision bf16 and a DDP or FSDP2 strategy).",
    )
    seed: int = Field(1234, ge=0, description="Seeds the model init, the data order and dropout.")
    log_every_steps: int = Field(1, ge=1, description="Steps between metric lines.")

    @model_validator(mode="after")
    def _one_batch_size(self) -> "TrainingSection":
        if self.global_batch_tokens is not None and self.global_batch_sequences is not None:
            raise ValueError("set global_batch_tokens or global_batch_sequences, not both")
        if self.warmup_start_lr >= self.lr:
            raise ValueError(f"warmup_start_lr {self.warmup_start_lr:g} must be below the peak lr {self.lr:g}")
        if self.schedule in ("wsd", "constant-with-cooldown") and self.warmup_fraction + self.decay_fraction > 1:
            raise ValueError(f"warmup_fraction {self.warmup_fraction:g} + decay_fraction {self.decay_fraction:g} "
                             "exceed the whole run")
        if self.weights_dtype == "bf16" and self.precision != "bf16":
            raise ValueError(f"weights_dtype bf16 (pure bf16 training) needs precision bf16, not {self.precision}")
        return self


class HardwareSection(Section):
    gpu: str = Field("H100-SXM-80GB", description="GPU type from the hardware catalog, `cpu`, or `custom`.")
    gpu_memory_gib: float | None = Field(None, gt=0, description="Device memory; overrides the catalog.")
    gpu_bf16_tflops: float | None = Field(None, gt=0, description="Dense bf16 TFLOP/s; overrides the catalog.")
    gpu_memory_bandwidth_gbps: float | None = Field(None, gt=0, description="Device memory GB/s.")
    gpu_tdp_watts: float | None = Field(None, gt=0, description="Board power; overrides the catalog.")
    intra_node_gbps: float | None = Field(
        None, gt=0, description="GPU-to-GPU bandwidth inside a node, GB/s per GPU per direction."
    )
    gpus_per_node: int = Field(8, ge=1, le=64, description="Training processes (GPUs) per node.")
    nodes: int = Field(1, ge=1, le=4096, description="Number of nodes.")
    cpu_ram_gib: float = Field(1024.0, gt=0, description="Host RAM per node available to training.")
    nvme_gib: float = Field(0.0, ge=0, description="Local NVMe per node available for offload.")
    nvme_path: str = Field("/local_nvme", min_length=1, description="Mount point of that NVMe on each node.")
    inter_node_gbps: float = Field(
        50.0, gt=0, description="Network bandwidth between nodes, GB/s per GPU (400 Gb/s NIC per GPU = 50)."
    )
    assumed_mfu: float = Field(0.40, gt=0, le=1, description="Model FLOPs utilisation assumed for time.")
    usd_per_gpu_hour: float = Field(2.50, ge=0, description="Price of one GPU-hour.")
    pue: float = Field(1.0, ge=1, le=3, description="Facility power usage effectiveness applied to TDP.")
    headroom_fraction: float = Field(
        0.05, ge=0, lt=0.9, description="Share of device memory kept free for safety."
    )


class SlurmSection(Section):
    partition: SafeName | None = Field(None, description="Partition (-p); cluster default if unset.")
    account: SafeName | None = Field(None, description="Account (-A).")
    time: str = Field("24:00:00", pattern=r"^([0-9]+-)?[0-9]{1,3}:[0-9]{2}:[0-9]{2}$",
                      description="Wall-clock limit, [days-]hours:minutes:seconds in ASCII digits.")
    cpus_per_task: int | None = Field(None, ge=1, description="CPUs per node; default 8 per GPU.")
    extra_directives: list[str] = Field(
        default_factory=list, description="Extra `#SBATCH` lines, e.g. `--exclusive` (written as given)."
    )


class LaunchSection(Section):
    python: str = Field("python", min_length=1, description="Interpreter the scripts run.")
    rdzv_port: int = Field(29500, ge=1024, le=65535, description="torchrun c10d rendezvous port.")
    container_image: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$",
                                        description="Image for the Kubernetes PyTorchJob (a registry reference).")
    namespace: K8sLabel = Field("default", description="Kubernetes namespace (an RFC 1123 label: a-z, 0-9, '-').")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables set for training.")
    passthrough_env: list[str] = Field(
        default_factory=list, description="Names of variables (tokens, passwords) the training processes take from "
        "the environment the job is launched from; their values are never written into a rendered file. Kubernetes "
        "reads each from the Secret `secrets_name`.")
    secrets_name: K8sLabel = Field("dapc-secrets", description="Kubernetes Secret holding the passthrough_env "
                                   "variables, one key per name.")
    cuda_expandable_segments: bool = Field(
        True, description="Run with PyTorch's expandable-segments CUDA allocator (less fragmentation); the memory "
        "model assumes what this says. Ignored where launch.env sets PYTORCH_CUDA_ALLOC_CONF.")
    slurm: SlurmSection = Field(default_factory=dict, description="SLURM settings.")

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for key, value in env.items():
            _check_env_name(key)
            if any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in value):
                raise ValueError(f"the value of {key} holds a control character")
        return env

    @field_validator("passthrough_env")
    @classmethod
    def _passthrough_names(cls, names: list[str]) -> list[str]:
        for key in names:
            _check_env_name(key)
        if len(set(names)) != len(names):
            raise ValueError("a name is listed twice")
        return names

    @model_validator(mode="after")
    def _env_named_once(self) -> "LaunchSection":
        both = sorted(set(self.env) & set(self.passthrough_env))
        if both:
            raise ValueError(f"{both[0]} is both set in launch.env and passed through; keep one")
        return self


def _check_env_name(key: str) -> None:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise ValueError(f"{key!r} is not a valid environment variable name")
    if key in RESERVED_ENV_NAMES or key.startswith(("SLURM_", "BASH", "PET_")):  # PET_*: the PyTorchJob operator
        raise ValueError(f"{key!r} is set by the rendered launch scripts or torchrun; choose another name")


class CheckpointSection(Section):
    every_steps: int = Field(500, ge=1, description="Optimizer steps between checkpoints.")
    keep_last: int = Field(3, ge=1, description="Complete checkpoints kept; older ones are deleted.")
    export_hf: bool = Field(True, description="Write a Hugging Face model directory at the end.")
    merge_lora: bool = Field(False, description="Export LoRA merged into the base instead of adapters only.")


class BenchmarkRef(Section):
    name: Literal["cti-mcq", "cybermetric", "seceval"] = Field(description="Benchmark format.")
    path: str = Field(description="Local copy of the benchmark file (relative to the recipe file).")


class EvalSection(Section):
    benchmarks: list[BenchmarkRef] = Field(default_factory=list, description="Run after training.")
    mode: Literal["loglik", "generate"] = Field("loglik", description="Option log-likelihood or generation.")
    k_shot: int = Field(0, ge=0, le=25, description="Examples in each prompt.")
    limit: int | None = Field(None, ge=1, description="Questions per benchmark (all when unset).")
    general_text: list[str] = Field(
        default_factory=list, description="General-English files for the forgetting perplexity."
    )


class TensorBoardSection(Section):
    enabled: bool = Field(True, description="Write TensorBoard event files (offline, read with `tensorboard --logdir`).")
    dir: str = Field("tensorboard", min_length=1, description="Where the event files go, relative to `output`.")


class WandbSection(Section):
    enabled: bool = Field(False, description="Log to Weights & Biases (needs the `wandb` package where training runs).")
    mode: Literal["offline", "online"] = Field(
        "offline", description="offline: write the run under `dir` only, never a network call (upload it later with "
        "`wandb sync`); online: stream to the W&B server (needs WANDB_API_KEY, e.g. in launch.passthrough_env).")
    project: str | None = Field(None, description="W&B project; defaults to the recipe's `name`.")
    entity: str | None = Field(None, description="W&B entity (user or team); the account's default if unset.")
    dir: str = Field(".", min_length=1, description="Folder W&B writes its `wandb/` folder into, relative to `output`.")

    @field_validator("project", "entity")
    @classmethod
    def _wandb_name(cls, name: str | None) -> str | None:
        if name is not None and not re.fullmatch(r"[^/\\#?%:\s][^/\\#?%:\x00-\x1f]{0,127}", name):
            raise ValueError("a W&B name has 1 to 128 characters, none of / \\ # ? % : or a control character, "
                             "and does not start with a space")
        return name


class MlflowSection(Section):
    enabled: bool = Field(False, description="Log to MLflow (needs the `mlflow-skinny` or `mlflow` package where "
                          "training runs).")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (`file:`, `http(s):`, `databricks`, ...); defaults to a local file store, "
        "`file:` <output>/mlruns. A relative `file:` path is relative to `output`.")
    experiment: str | None = Field(None, min_length=1, max_length=500,
                                   description="MLflow experiment; defaults to the recipe's `name`.")

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, uri: str | None) -> str | None:
        if uri is not None and not re.fullmatch(r"databricks|[A-Za-z][A-Za-z0-9+.-]*:\S+", uri):
            raise ValueError("not a tracking URI: give one with its scheme (file:/path/mlruns, file:mlruns relative "
                             "to output, http://host:5000, databricks)")
        return uri


class LoggingSection(Section):
    tensorboard: TensorBoardSection = Field(default_factory=dict, description="TensorBoard (on).")
    wandb: WandbSection = Field(default_factory=dict, description="Weights & Biases (off).")
    mlflow: MlflowSection = Field(default_factory=dict, description="MLflow (off).")


class Recipe(Section):
    """A whole recipe, after `base:` inheritance and `--set` overrides."""

    name: SafeName = Field(description="Run name: letters, digits, `.`, `_`, `-`.")
    model: ModelSection
    method: MethodSection = Field(default_factory=dict)
    data: DataSection
    training: TrainingSection = Field(default_factory=dict)
    hardware: HardwareSection = Field(default_factory=dict)
    strategy: Literal["auto"] | StrategyName = Field(  # type: ignore[valid-type]
        "auto", description="Sharding strategy; `auto` lets the planner pick."
    )
    launch: LaunchSection = Field(default_factory=dict)
    checkpoint: CheckpointSection = Field(default_factory=dict)
    eval: EvalSection = Field(default_factory=dict)
    logging: LoggingSection = Field(
        default_factory=dict, description="Experiment tracking by the trainer's rank 0, besides "
        "metrics.jsonl: TensorBoard on, W&B and MLflow off unless enabled.")
    output: str = Field("runs", description="Run directory (relative to the recipe file); `render -o` overrides.")
