"""Typed configuration: one source of truth for a run.

A run is described by a YAML file plus dotted `key=value` overrides. Every key maps onto a field of the nested
dataclasses below; an unknown key is an error that names it, never a silently ignored default. Values are parsed
with `yaml.safe_load` (no eval of config text).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_po.families import FAMILIES, FAMILY_NAMES


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Ranks that split each layer's weights (Megatron tensor parallel)."""
    pp: int = 1
    """Pipeline stages (megatron's 1F1B schedule). The first stage also holds the vision tower and projector, the
    last one the output layer, the log-probs and the objective; policy and reference are split the same way."""
    pp_layers_first: int = 0
    """Decoder layers on the first pipeline stage (0: an even split). Give it fewer than the others to make room
    for the vision tower (megatron's num_layers_in_first_pipeline_stage)."""
    pp_layers_last: int = 0
    """Decoder layers on the last pipeline stage (0: an even split); it also holds the output layer and the
    log-prob stage (megatron's num_layers_in_last_pipeline_stage)."""
    sp: bool = False
    """Sequence parallel: shard LayerNorm/dropout activations over the TP group (needs tp > 1)."""
    cp: int = 1
    """Context parallel degree (GPU only: needs Transformer-Engine attention)."""
    backend: str = "auto"
    """'auto' (nccl with CUDA, else gloo on CPU), 'nccl' or 'gloo'."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over DP (Megatron distributed optimizer). Its checkpoints do not work on CPU."""
    overlap_grad_reduce: bool = True
    """Overlap the DP gradient all-reduce (reduce-scatter with the distributed optimizer) with the backward pass,
    bucket by bucket (megatron DDP's overlap_grad_reduce)."""
    overlap_param_gather: bool = True
    """With the distributed optimizer: overlap the all-gather of updated parameters with the next step's forward
    (megatron's overlap_param_gather; ignored without use_distributed_optimizer)."""

    def __post_init__(self):
        for name in ("tp", "pp", "cp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.sp and self.tp == 1:
            raise ConfigError("parallel.sp=true needs parallel.tp > 1")
        for name in ("pp_layers_first", "pp_layers_last"):
            if getattr(self, name) < 0 or (getattr(self, name) and self.pp == 1):
                raise ConfigError(f"parallel.{name} must be >= 0, and is meaningful only with parallel.pp > 1")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"parallel.backend must be auto|nccl|gloo, got {self.backend!r}")

    def stage_layers(self, num_layers: int) -> list[int]:
        """Decoder layers of each pipeline stage, as megatron splits them (get_num_layers_to_build).

        Raises:
            ConfigError: the split leaves a stage without a layer or the middle stages an uneven share.
        """
        first, last = self.pp_layers_first or None, self.pp_layers_last or None
        if self.pp == 1:
            return [num_layers]
        fixed = [n for n in (first, last) if n is not None]
        rest, stages = num_layers - sum(fixed), self.pp - len(fixed)
        if rest < stages or (stages and rest % stages):
            raise ConfigError(f"{num_layers} decoder layers do not split over parallel.pp={self.pp} stages with "
                              f"pp_layers_first={self.pp_layers_first}, pp_layers_last={self.pp_layers_last}: "
                              "every stage needs a layer and the stages without a fixed count an equal share")
        if not stages and rest:
            raise ConfigError(f"parallel.pp_layers_first + pp_layers_last = {sum(fixed)} != {num_layers} layers")
        even = rest // stages if stages else 0
        return [first or even] + [even] * (self.pp - 2) + [last or even]


@dataclass
class VisionConfig:
    image_size: int = 32
    """Input images are resized to image_size x image_size."""
    patch_size: int = 8
    """ViT patch size in pixels; the tower sees (image_size / patch_size)^2 patches."""
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 4
    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ConfigError("model.vision.image_size must be a multiple of model.vision.patch_size")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class LoraConfig:
    """LoRA adapters (models/lora.py): the base weights stay frozen, only the adapters train."""

    rank: int = 0
    """Adapter rank r (0: no LoRA, every weight trains as configured by the freeze_* switches)."""
    alpha: float = 32.0
    """Scale α: an adapter adds (α/r)·B A x (peft's lora_alpha)."""
    dropout: float = 0.0
    """Dropout on the adapters' input (peft's lora_dropout)."""
    target_modules: str = "linear_qkv,linear_proj,linear_fc1,linear_fc2"
    """Comma list of the linears to adapt: linear_qkv, linear_proj, linear_fc1, linear_fc2 (every decoder layer's
    attention and MLP: HF's q/k/v_proj, o_proj, gate/up_proj, down_proj) and 'projector' (both linears of the
    vision-to-LLM projector)."""

    def __post_init__(self):
        from megatron_po.models.lora import TARGETS

        if self.rank < 0 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora: rank must be >= 0, alpha > 0 and dropout in [0, 1), got rank={self.rank}, "
                              f"alpha={self.alpha}, dropout={self.dropout}")
        bad = set(self.targets) - set(TARGETS)
        if bad or not self.targets:
            raise ConfigError(f"model.lora.target_modules: unknown {sorted(bad)}; known {', '.join(TARGETS)}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.target_modules.split(",") if t.strip())


@dataclass
class ModelConfig:
    family: str = "tiny_vlm"
    """Model builder: 'tiny_vlm' (ViT + MLP projector + Qwen2.5-shaped GPT decoder, shapes from the fields below),
    or a Hugging Face family, 'internvl3' or 'qwen2_5_vl', whose shapes come from `hf_path`."""
    hf_path: str = ""
    """HF families: directory with the HF config.json, tokenizer and processor files (a converted checkpoint's
    hf/ directory, see tools/convert_hf.py). Weights come from checkpoint.init_from."""
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 176
    num_attention_heads: int = 4
    num_query_groups: int = 2
    """Grouped-query attention: key/value heads (Qwen2.5 uses GQA)."""
    rotary_base: int = 1_000_000
    norm_epsilon: float = 1e-6
    init_method_std: float = 0.02
    vocab_size: int = 0
    """tiny_vlm's vocabulary: 0 = the tokenizer's; larger adds rows no token uses (to benchmark at a real model's
    vocabulary). Padded up to a multiple of 128 (not 128 * tp as Megatron does: log-probs stay layout-free)."""
    max_seq_length: int = 160
    """Longest pair sequence (prompt + image tokens + response); longer pairs are skipped and counted."""
    freeze_vit: bool = True
    """Freeze the vision tower (ACPO trains the LLM only). The three freeze_* switches mean the same parts in every
    family, named as Megatron-SWIFT names them."""
    freeze_aligner: bool = True
    """Freeze the projector between the tower and the LLM (MLP / pixel-shuffle MLP / patch merger)."""
    freeze_llm: bool = False
    """Freeze the language model (embedding, decoder, output layer): trains the tower and/or projector only."""
    spec: str = "auto"
    """Layer spec: 'auto' (Transformer-Engine on GPU when installed, else local), 'te', 'local'."""
    params_dtype: str = "fp32"
    """'fp32' or 'bf16' (bf16 needs a GPU)."""
    logprobs: str = "fused"
    """How the trainer takes log-probs: 'fused' (from the final hidden states and the output weight, response
    positions only, `logprob_chunk_tokens` at a time: [T, V/tp] logits never exist) or 'logits' (the output
    layer's full logits, then a vocab-parallel log-softmax)."""
    recompute: str = "none"
    """Activation recompute of the decoder (megatron's recompute_granularity): 'none', 'selective' (the
    `recompute_modules` of every layer) or 'full' (whole layers, per `recompute_method`). A frozen vision tower
    runs without autograd whatever this says."""
    recompute_method: str = "uniform"
    """With recompute=full: 'uniform' (checkpoint every `recompute_num_layers` layers as one unit) or 'block'
    (recompute the first `recompute_num_layers` layers of each pipeline stage)."""
    recompute_num_layers: int = 1
    """With recompute=full: layers per recompute unit (uniform) or layers recomputed per stage (block)."""
    recompute_modules: str = "core_attn"
    """With recompute=selective: comma list of core_attn, mlp, layernorm."""
    logprob_chunk_tokens: int = 0
    """Tokens per chunk of the fused log-prob stage; its buffer is chunk x V/tp fp32. 0: sized to the device
    (`logprobs.auto_chunk_tokens`: 256 on the CPU, a ~1 GiB buffer on a GPU)."""
    init_weights: bool = True
    """Draw initial weights (at full size on the CPU, then sliced: the same weights in every layout). The trainer
    turns it off when checkpoint.init_from overwrites them: the weights are then allocated on the device and not
    initialised (models/init.py; a 78B model is never initialised on the host)."""
    fusions: str = "auto"
    """megatron's kernel fusions (bias + SwiGLU, bias-dropout-add, persistent layer norm, gradient-accumulation
    fusion into the fp32 main_grad): 'auto' (on with the Transformer-Engine spec, whose kernels provide them),
    'on' or 'off'."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA (model.lora.rank > 0): adapters on the decoder's (and optionally the projector's) linears, the base
    frozen; the reference is then the same model with its adapters off (reference.source=adapters_off)."""

    @property
    def decoder_frozen(self) -> bool:
        """The language model's weights take no gradient: freeze_llm, or LoRA (every base weight frozen; only the
        adapters train)."""
        return self.freeze_llm or self.lora.enabled

    def __post_init__(self):
        if self.family not in FAMILY_NAMES:
            raise ConfigError(f"model.family {self.family!r} unknown; known: {list(FAMILY_NAMES)}")
        if FAMILIES[self.family].from_hf != bool(self.hf_path):
            raise ConfigError("model.hf_path is required by HF families and meaningless for the others "
                              f"(model.family={self.family})")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError("model.num_attention_heads must be a multiple of model.num_query_groups")
        if self.spec not in ("auto", "te", "local"):
            raise ConfigError(f"model.spec must be auto|te|local, got {self.spec!r}")
        if self.params_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"model.params_dtype must be fp32|bf16, got {self.params_dtype!r}")
        if self.logprobs not in ("fused", "logits"):
            raise ConfigError(f"model.logprobs must be fused|logits, got {self.logprobs!r}")
        if self.recompute not in ("none", "selective", "full"):
            raise ConfigError(f"model.recompute must be none|selective|full, got {self.recompute!r}")
        if self.recompute_method not in ("uniform", "block"):
            raise ConfigError(f"model.recompute_method must be uniform|block, got {self.recompute_method!r}")
        if self.recompute_num_layers < 1:
            raise ConfigError(f"model.recompute_num_layers must be >= 1, got {self.recompute_num_layers}")
        bad = set(self.recompute_modules.split(",")) - {"core_attn", "mlp", "layernorm"}
        if bad:
            raise ConfigError(f"model.recompute_modules: unknown {sorted(bad)}; known core_attn, mlp, layernorm")
        if self.logprob_chunk_tokens < 0:
            raise ConfigError(f"model.logprob_chunk_tokens must be >= 0 (0: auto), got {self.logprob_chunk_tokens}")
        if self.fusions not in ("auto", "on", "off"):
            raise ConfigError(f"model.fusions must be auto|on|off, got {self.fusions!r}")


@dataclass
class DataConfig:
    source: str = "synthetic"
    """'synthetic' (the embedded shapes task, generated into output_dir/data) or 'jsonl'. The record kind follows
    the objective: preference pairs, or P2-DPO samples (data/p2_records.py) for objective p2_dpo, for which the
    synthetic task writes p2_train.jsonl."""
    train_path: str = ""
    """Training records (source=jsonl): preference pairs in any `format`, or P2-DPO samples (our JSONL) for
    objective p2_dpo."""
    format: str = "auto"
    """Preference data's format (data/formats.py): 'jsonl' (ours), 'trl' (TRL's prompt/chosen/rejected as strings
    or messages, with `images`; JSON lines or array), 'mpo' (InternVL's MPO/MMPR meta file or annotation jsonl),
    'hf' (a Hugging Face dataset directory, parquet or arrow file; needs the [data] extra), or 'auto' (from the
    path and the first record's keys)."""
    tokenizer_path: str = ""
    """SentencePiece model. Empty with source=synthetic: trained on the synthetic text at preparation."""
    num_train: int = 512
    num_eval: int = 64
    seed: int = 1234
    tokenizer_vocab_size: int = 512
    yesno_share: float = 0.2
    """Synthetic task: share of "Is there a <colour> <shape>?" pairs (half about drawn objects, half not)."""
    near_miss: float = 0.0
    """Synthetic task: share of the absent objects in those questions that share their colour or shape with a
    drawn one (only binding colour to shape tells them apart); the rest are any combination not drawn."""
    images_outside_root: bool = False
    """Accept image paths that leave the data file's directory (absolute paths, ``..``); refused by default so a
    record cannot make the job read arbitrary files."""
    packing: bool = False
    """Pack each micro-batch's sequences into as few rows of up to model.max_seq_length tokens as first-fit-
    decreasing finds (attention isolated per sequence, positions restarting), after spreading the global batch
    over DP ranks by tokens. Losses and gradients equal the unpacked ones; only the padding goes."""
    index: str = "auto"
    """The prepared index of each split (data/index.py, `megatron-po prepare-data`): 'auto' uses a valid one and
    prepares a missing or stale one at launch (all ranks sharing the work, the change named in the log);
    'require' refuses to start without a valid one, naming what changed."""
    index_dir: str = ""
    """Where the prepared indexes live (one directory per split); empty: output_dir/data_index. Point several
    runs (a sweep, the stages of a pipeline) at one directory to prepare once."""
    num_workers: int = 2
    """DataLoader worker processes per rank that read, decode, tokenize, collate and pack the micro-batches ahead
    of the step (0: inline, on the training thread); also the processes per rank that prepare an index at launch."""
    prefetch_factor: int = 2
    """Steps each worker makes ahead."""

    def __post_init__(self):
        if self.index not in ("auto", "require"):
            raise ConfigError(f"data.index must be auto|require, got {self.index!r}")
        if self.num_workers < 0 or self.prefetch_factor < 1:
            raise ConfigError(f"data.num_workers must be >= 0 and data.prefetch_factor >= 1, got "
                              f"{self.num_workers} and {self.prefetch_factor}")
        if self.source not in ("synthetic", "jsonl"):
            raise ConfigError(f"data.source must be synthetic|jsonl, got {self.source!r}")
        if self.format not in ("auto", "jsonl", "trl", "mpo", "hf"):
            raise ConfigError(f"data.format must be auto|jsonl|trl|mpo|hf, got {self.format!r}")
        if not (0.0 <= self.yesno_share <= 1.0 and 0.0 <= self.near_miss <= 1.0):
            raise ConfigError(f"data.yesno_share and data.near_miss must lie in [0, 1], got {self.yesno_share} "
                              f"and {self.near_miss}")


@dataclass
class ObjectiveSection:
    name: str = "acpo"
    """Registered objective (see megatron_po.objectives.OBJECTIVES)."""
    params: dict = field(default_factory=dict)
    """Hyper-parameters of that objective; unknown keys are rejected by the objective's config class."""
    batch_stat_scope: str = "global_batch"
    """Where batch statistics (ACPO batch-alpha, beta-DPO, CW-DPO gate) are taken: 'global_batch' (the whole
    optimizer step, all DP ranks and micro-batches: layout-invariant; costs a no-grad policy pass) or
    'micro_batch' (each micro-step over DP, as the reference implementations do)."""

    def __post_init__(self):
        if self.batch_stat_scope not in ("global_batch", "micro_batch"):
            raise ConfigError(f"objective.batch_stat_scope must be global_batch|micro_batch, got {self.batch_stat_scope!r}")


@dataclass
class ReferenceConfig:
    source: str = "auto"
    """Where the reference log-probs come from: 'model' (a frozen copy of the initial policy runs a forward-only
    pass every step), 'adapters_off' (model.lora only: the policy itself with every adapter off, its base; no second
    model), 'cache' (read from `cache_path`, written by `megatron-po precompute-ref`: no reference model is built,
    which frees its weights and a quarter of the step's FLOPs), or 'auto': adapters_off under LoRA, else model."""
    cache_path: str = ""
    """Directory of the reference log-prob cache (precompute-ref writes it; source=cache reads and checks it)."""

    def __post_init__(self):
        if self.source not in ("auto", "model", "adapters_off", "cache"):
            raise ConfigError(f"reference.source must be auto|model|adapters_off|cache, got {self.source!r}")
        if self.source == "cache" and not self.cache_path:
            raise ConfigError("reference.source=cache needs reference.cache_path")


@dataclass
class EvalConfig:
    interval: int = 0
    """Evaluate held-out pairs at step 0, every `interval` steps and at the end (0: never)."""
    max_pairs: int = 64
    """Held-out pairs scored per evaluation (from the synthetic eval split or eval.path)."""
    path: str = ""
    """JSONL of held-out preference pairs; empty with data.source=synthetic: the generated eval split."""
    probe_path: str = ""
    """JSONL of yes/no probe records (meta.present); empty with data.source=synthetic: generated held-out images."""
    probe_images: int = 64
    """Images of the generated yes/no probe (synthetic source)."""
    probe_style: str = "yesno"
    """The generated probe: 'yesno' (one present and one random absent object per image) or 'pope' (POPE's
    random / popular / adversarial absent objects, with per-split precision, recall, F1, yes-ratio)."""

    def __post_init__(self):
        if self.interval < 0 or self.max_pairs < 1:
            raise ConfigError("eval.interval must be >= 0 and eval.max_pairs >= 1")
        if self.probe_style not in ("yesno", "pope"):
            raise ConfigError(f"eval.probe_style must be yesno|pope, got {self.probe_style!r}")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr: float = 1e-5
    """Where the decay ends (cosine and linear); 0 with linear is TRL's / transformers' default schedule."""
    lr_schedule: str = "cosine"
    """'cosine', 'linear' or 'constant' after the warm-up (megatron's lr_decay_style)."""
    warmup_steps: int = -1
    """Linear warm-up steps from 0 to `lr`; -1: `warmup_fraction` of train.train_steps."""
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"optim.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"optim.lr_schedule must be cosine|linear|constant, got {self.lr_schedule!r}")
        if self.warmup_steps < -1:
            raise ConfigError(f"optim.warmup_steps must be >= 0 (or -1: warmup_fraction), got {self.warmup_steps}")


@dataclass
class TrainConfig:
    global_batch_size: int = 8
    """Pairs per optimizer step, over all DP ranks and micro-batches."""
    micro_batch_size: int = 2
    """Pairs per forward pass on one DP rank."""
    train_steps: int = 20
    epochs: int = 0
    """> 0: train this many passes over the kept samples instead (train_steps = epochs x full global batches per
    epoch, set once the data is read; it is what the LR schedule and the progress use)."""
    seed: int = 1234
    log_interval: int = 1
    """Write every N-th step's metrics; only those steps read the phase timers and memory peaks (one
    all-gather over the world each)."""
    peak_tflops: float = 0.0
    """The device's dense bf16 peak TFLOP/s for `mfu` (0: from the table of flops.PEAK_BF16_TFLOPS on a known
    GPU; on the CPU, or an unknown GPU, no `mfu` is logged, only `flops/tflops_per_device`)."""
    progress_bar: bool = True
    exit_interval: int = 0
    """Save a checkpoint and exit after a step divisible by this (Megatron's --exit-interval): for job time
    limits; the next launch resumes. 0 = run to train_steps."""
    exit_duration_minutes: float = 0.0
    """Save a checkpoint and exit (code 75, requeue) at the first step boundary after this many minutes of the
    job (Megatron's --exit-duration-in-mins); SIGTERM / SIGUSR1 do the same at once. 0: no limit."""
    skip_nonfinite_steps: bool = False
    """A step whose loss, log-probs or gradient norm is NaN/Inf is skipped (no update, counted in
    `train/skipped_steps`) instead of stopping the run."""
    wandb_project: str = ""
    """Also log every step's metrics to this Weights & Biases project (the `[wandb]` extra; WANDB_MODE=offline
    and the other WANDB_* variables work as usual). Empty: metrics.jsonl and TensorBoard only."""
    wandb_run_name: str = ""
    """The W&B run's name (default: output_dir's name). A resumed run continues the same W&B run."""

    def __post_init__(self):
        for name in ("global_batch_size", "micro_batch_size", "train_steps", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs < 0:
            raise ConfigError(f"train.epochs must be >= 0, got {self.epochs}")
        if self.peak_tflops < 0:
            raise ConfigError(f"train.peak_tflops must be >= 0, got {self.peak_tflops}")
        if self.exit_duration_minutes < 0:
            raise ConfigError(f"train.exit_duration_minutes must be >= 0, got {self.exit_duration_minutes}")
        if self.wandb_project and importlib.util.find_spec("wandb") is None:
            raise ConfigError("train.wandb_project needs the wandb package: pip install -e '.[wandb]'")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError("train.global_batch_size must be a multiple of train.micro_batch_size")


@dataclass
class CheckpointConfig:
    save_interval: int = 0
    """Save every N optimizer steps (0: only at the end)."""
    save: bool = True
    """Save at the end (and every save_interval steps) under output_dir/checkpoints."""
    resume: bool = True
    """Resume from the latest complete checkpoint in output_dir/checkpoints if there is one."""
    init_from: str = ""
    """A previous stage's checkpoint directory: initial weights of the policy and of the reference."""
    keep_last: int = 0
    """Keep only the newest N complete checkpoints under output_dir/checkpoints (0: keep all)."""
    async_save: bool = False
    """Write checkpoints in the background (megatron's asynchronous dist_checkpointing): training goes on while
    the shards are written; `latest` moves only once every rank's shards are durable."""

    def __post_init__(self):
        if self.save_interval < 0 or self.keep_last < 0:
            raise ConfigError("checkpoint.save_interval and checkpoint.keep_last must be >= 0")


@dataclass
class Config:
    output_dir: str = "outputs/run"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)

    def __post_init__(self):
        if self.optim.warmup_steps >= self.train.train_steps and not self.train.epochs:
            raise ConfigError(f"optim.warmup_steps={self.optim.warmup_steps} must be < train.train_steps="
                              f"{self.train.train_steps}")
        if self.data.packing and self.parallel.cp > 1:
            # TODO(megatron_po): THD rows split per sequence (TE's thd partitioning) and M-RoPE tables to match
            raise ConfigError("data.packing with parallel.cp > 1 is not supported: megatron's M-RoPE slices its "
                              "rotary table by whole rows under context parallelism, not per packed sequence")
        m = self.model
        if self.reference.source == "auto":  # resolved once: everything after reads model, adapters_off or cache
            self.reference.source = "adapters_off" if m.lora.enabled else "model"
        if self.reference.source == "adapters_off" and not m.lora.enabled:
            raise ConfigError("reference.source=adapters_off needs model.lora.rank > 0 (adapters to switch off)")
        if m.lora.enabled and (not m.freeze_vit or not m.freeze_aligner or m.freeze_llm):
            raise ConfigError("model.lora trains the adapters only: keep model.freeze_vit and freeze_aligner true and "
                              "freeze_llm false (a fully trained tower or projector would make the adapters-off "
                              "reference differ from the base; 'projector' in model.lora.target_modules adapts it)")
        if m.freeze_llm and m.freeze_vit and m.freeze_aligner:
            raise ConfigError("model.freeze_llm, freeze_vit and freeze_aligner are all true: nothing would train")
        if m.freeze_llm and self.parallel.pp > 1:
            raise ConfigError("model.freeze_llm=true with parallel.pp > 1: the stages after the first hold only "
                              "frozen decoder layers and would have nothing to train")
        if not FAMILIES[m.family].from_hf:  # shapes are config fields (HF: checked when config.json is read)
            self.parallel.stage_layers(self.model.num_layers)
        elif not self.checkpoint.init_from:
            raise ConfigError(f"model.family={self.model.family} needs checkpoint.init_from: a checkpoint "
                              "converted with tools/convert_hf.py (HF families never train from random weights)")

    def validate_world(self, world_size: int) -> int:
        """Checks the layout against the world size; returns the data-parallel size."""
        mp = self.parallel.tp * self.parallel.pp * self.parallel.cp
        if world_size % mp:
            raise ConfigError(f"world size {world_size} is not divisible by tp*pp*cp = {mp}")
        dp = world_size // mp
        per_step = dp * self.train.micro_batch_size
        if self.train.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                f"dp ({dp}) x train.micro_batch_size ({self.train.micro_batch_size})"
            )
        return dp


def _coerce(value: Any, tp: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        return _from_dict(tp, value, key + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads '5e-3' as a string: accept any text float() parses exactly
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _from_dict(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}' (known: {sorted(names)})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from e


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Applies `a.b.c=value` overrides to a nested dict (value parsed as YAML scalar)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: '{p}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def config_from_dict(data: dict) -> Config:
    return _from_dict(Config, data)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Reads a YAML config (or the defaults when path is None) and applies dotted overrides."""
    data: dict = {}
    if path:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    return config_from_dict(apply_overrides(data, list(overrides)))


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
