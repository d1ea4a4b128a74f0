"""Peak GPU memory of one training step, per GPU, by component.

The estimate is the CUDA caching allocator's peak (what `torch.cuda.max_memory_allocated`
reports) plus a fragmentation margin and the CUDA context. Components, in bytes:

- weights: 2 per parameter (bf16/fp16), 4 (fp32, or fp32 master weights of full
  fine-tuning); QLoRA stores the decoder linears in NF4 (4.127 bits with double quantization,
  4.5 without) and keeps embeddings, norms and lm_head in bf16.
- trainable: adapters in fp32 (PEFT upcasts them), `modules_to_save` copies in the model dtype.
- gradients: one per trainable parameter, in its dtype.
- optimizer: AdamW 2 states in the parameter dtype (8 bytes for fp32), 8-bit AdamW 2 bytes,
  paged variants the same (their steady state sits on the GPU), SGD none (no momentum),
  Adafactor the factored second moment (rows + columns per matrix, fp32).
- activations: `activations.layer_activations` per token per layer; with gradient
  checkpointing a checkpointed layer keeps only its input and one layer is recomputed at a
  time. Checkpointing every n-th layer (`checkpoint_every`, transformers' `every_n_layers`)
  keeps the full activations of the others: the least recomputation that fits is what
  `least_checkpointing` finds for `gradientCheckpointing: Auto`. With activation offload
  (`offload_activations`, transformers' `offload`) the checkpointed layers' inputs wait in
  pinned host memory instead: one is on the GPU at a time.
- logits: a fused, chunked LM-head loss (TRL >= 1.16) keeps a bf16 4096 x 32768 tile and the
  hidden states it scores; the plain
  loss keeps bf16 logits, their fp32 copy and log-softmax (12 bytes per token per vocab entry).
- gradients appear layer by layer while activations are released, so the peak is the largest
  of three moments (loss, start and end of the backward pass), not the sum; `overlap` is the
  difference. With gradient accumulation the gradients of the earlier micro-batches are held
  through the next forward and backward pass.
- several GPUs: DDP adds gradient buckets the size of the gradients. FSDP and ZeRO-3 shard
  weights, gradients and optimizer state. FSDP gathers two layers at a time, in bf16 (so
  autocast makes no bf16 copies of full fine-tuning's fp32 weights); ZeRO-3 keeps up to
  `DEEPSPEED_MAX_LIVE_PARAMETERS` gathered, in the weights' dtype. DeepSpeed reduces
  gradients through buckets of `DEEPSPEED_REDUCE_BUCKET` elements (ZeRO-3 one, ZeRO-2 two
  with overlapped communication); the trainer writes these values into its DeepSpeed
  config. Full fine-tuning under DeepSpeed keeps fp32 weights under torch autocast, as on
  one GPU, so its gathered parameters are fp32, and it keeps a bf16 and an fp32 set of
  buckets. ZeRO-3 also holds the optimizer's fp32 gradient partition next to the reduced
  one; ZeRO-2 makes its fp32 master partition as a copy, even of fp32 weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from kubetune.api.v1alpha1.methods import Method
from kubetune.api.v1alpha1.training import DistributedStrategy, Optimizer, Precision
from kubetune.calc.activations import layer_activations
from kubetune.calc.architectures import Architecture, parameter_count
from kubetune.calc.lora import AdapterSettings, TrainableParams, trainable_params
from kubetune.calc.optimizers import optimizer_bytes, resolve_optimizer

GIB = 1024**3
NF4_BITS_DOUBLE_QUANT = 4.127
"""4 bits + an 8-bit absmax per 64 weights + an fp32 constant per 256 absmax values."""
NF4_BITS = 4.5
"""4 bits + an fp32 absmax per 64 weights."""
CUDA_CONTEXT_GIB = 1.5
"""CUDA context, cuBLAS/cuDNN workspaces and loaded kernels: 1.3–2 GiB in practice."""
NCCL_GIB = 0.5
"""NCCL communicators and buffers when several GPUs train together."""
FRAGMENTATION = 0.10
"""Caching-allocator margin over the peak allocation (measured 1–6 %, 20 % with full logits)."""
VARIABLE_SHAPE_FRAGMENTATION = 0.25
"""The margin for a setup sized by its data (`data_tokens`): its batches change shape every
step, which fragments the caching allocator more, and the plan no longer carries the slack
of full-length sequences. Conservative, not measured under memory pressure."""
HOST_FRAGMENTATION = 0.10
"""A CPU run's margin over the estimate (docs/calc.md#cpu-runs)."""
HOST_ACTIVATION_FACTOR = 1.25
"""On a CPU the activations cost more than autograd saves: glibc's allocator keeps freed
blocks of the backward pass (measured 1.15-1.3x on SmolLM2, fp32)."""
HOST_LOSS_BYTES = 40
"""Bytes per token per vocabulary entry of TRL's chunked LM-head loss on a CPU, for the
first 4,096 tokens of a micro-batch: without Triton it runs torch ops over [4096, 32768]
tiles, about ten fp32 temporaries of the full rows with their fragmentation (measured 42 on
SmolLM2; the GPU path keeps one bf16 tile)."""
HOST_LOSS_BYTES_BEYOND = 10
"""The same for every token after the first 4,096 (measured on 8,192-token micro-batches)."""
LOSS_TOKEN_TILE = 4096
LOSS_VOCAB_TILE = 32768
SHARDED = (DistributedStrategy.FSDP, DistributedStrategy.DEEPSPEED_ZERO3)
DEEPSPEED = (DistributedStrategy.DEEPSPEED_ZERO2, DistributedStrategy.DEEPSPEED_ZERO3)
DEEPSPEED_REDUCE_BUCKET = 500_000_000
"""Elements per DeepSpeed gradient-reduction bucket (`reduce_bucket_size`, DeepSpeed's
default), in the gradients' dtype: one buffer under ZeRO-3, two under ZeRO-2 with
`overlap_comm`."""
DEEPSPEED_AUTOCAST_BUCKET_BYTES = 4 + 2
"""Under torch autocast DeepSpeed keeps one set of buckets per communication dtype: bf16 for
the Linear layers' gradients, fp32 for the rest (measured: 1.86 + 0.93 GiB)."""
DEEPSPEED_MAX_LIVE_PARAMETERS = 1_000_000_000
"""Parameters ZeRO-3 may keep gathered (`stage3_max_live_parameters`, DeepSpeed's default):
the layers used last in the forward pass stay gathered for the backward pass."""
FUSED_KERNEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
"""Architectures whose RMSNorm and SwiGLU Liger replaces (the memory counts above)."""


@dataclass(frozen=True)
class TrainingSetup:
    """What one GPU runs: method, shapes and the knobs that move memory.

    Attributes:
        method: tuning method.
        seq_len: tokens per sequence (padded length, or the packed row length).
        batch_size: sequences per micro-batch per GPU.
        adapter: LoRA / prefix / prompt settings.
        gradient_checkpointing: recompute activations in the backward pass.
        checkpoint_every: with gradient_checkpointing, checkpoint layers 0, n, 2n, ... only
            (1: every layer).
        offload_activations: with gradient_checkpointing, the checkpointed layers' inputs
            wait in pinned host memory (`host_offload_gib`) instead of GPU memory.
        precision: Auto (= BF16), BF16, FP16 or FP32.
        optimizer: Auto (PagedAdamW8bit for QLoRA, else AdamW) or a named one.
        gpus: GPUs that train together.
        strategy: None/DDP (replicas), FSDP or DeepSpeed ZeRO-2/3 (sharding).
        cpu_offload: FSDP / ZeRO-3 keep parameters, gradients and optimizer state in CPU memory.
        double_quant: QLoRA double quantization.
        fused_loss: chunked LM-head loss that never builds the logits (TRL's default).
        fp32_master: full fine-tuning keeps fp32 weights under bf16 autocast.
        eager_attention: attention without a fused kernel (keeps the s x s scores).
        sequences_per_example: 2 for preference pairs (chosen and rejected).
        frozen_model_copies: extra frozen bf16 copies of the base (reference or reward model).
        fused_kernels: the trainer's Liger kernels (RMSNorm, SwiGLU) for the architectures in
            FUSED_KERNEL_TYPES.
        lean_adapters: LoRA layers without PEFT's fp32 input cast.
        gradient_accumulation: micro-batches per optimizer step (above 1 the gradients are
            held through the forward and backward passes of the later micro-batches).
        data_tokens: the most tokens one micro-batch of the prepared data holds, when the
            data is known (`preference_batch_tokens`); None plans every sequence at
            seq_len.
        host: a CPU run, in host memory: Auto precision is FP32 (the trainer's choice on
            CPUs), no CUDA context, and the estimate is what the step adds to the process
            (`HOST_FRAGMENTATION` instead of the caching allocator's margin).
    """

    method: Method = Method.LORA
    seq_len: int = 2048
    batch_size: int = 1
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    gradient_checkpointing: bool = True
    checkpoint_every: int = 1
    offload_activations: bool = False
    precision: Precision = Precision.AUTO
    optimizer: Optimizer = Optimizer.AUTO
    gpus: int = 1
    strategy: DistributedStrategy = DistributedStrategy.NONE
    cpu_offload: bool = False
    double_quant: bool = True
    fused_loss: bool = True
    fp32_master: bool = True
    eager_attention: bool = False
    sequences_per_example: int = 1
    frozen_model_copies: int = 0
    fused_kernels: bool = False
    lean_adapters: bool = False
    gradient_accumulation: int = 1
    data_tokens: int | None = None
    host: bool = False

    @property
    def tokens(self) -> int:
        """Tokens in one micro-batch (prompt tuning prepends its virtual tokens); at most
        `data_tokens` when the data is known."""
        virtual = self.adapter.num_virtual_tokens if self.method == Method.PROMPT_TUNING else 0
        planned = self.batch_size * self.sequences_per_example * (self.seq_len + virtual)
        return planned if self.data_tokens is None else min(planned, self.data_tokens)

    def checkpointed_layers(self, num_layers: int) -> int:
        """How many of `num_layers` decoder layers recompute their activations."""
        if not self.gradient_checkpointing:
            return 0
        return -(-num_layers // max(self.checkpoint_every, 1))


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak GPU memory per GPU, in GiB, by component.

    `allocated_gib` is comparable to `torch.cuda.max_memory_allocated`; `total_gib` adds the
    fragmentation margin and the CUDA context and is what must fit on the GPU.
    """

    weights_gib: float
    trainable_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    logits_gib: float
    overlap_gib: float
    allocated_gib: float
    fragmentation_gib: float
    cuda_context_gib: float
    total_gib: float
    params: TrainableParams
    tokens_per_micro_batch: int
    gradient_checkpointing: bool
    checkpointed_layers: int
    optimizer: Optimizer
    precision: Precision
    notes: tuple[str, ...] = ()
    host_offload_gib: float = 0.0
    """Pinned host memory that activation offload takes (not part of `total_gib`)."""

    def components(self) -> list[tuple[str, float]]:
        """(label, GiB) rows that add up to `total_gib`."""
        return [
            ("weights", self.weights_gib),
            ("trainable parameters", self.trainable_gib),
            ("gradients", self.gradients_gib),
            ("optimizer states", self.optimizer_gib),
            ("activations", self.activations_gib),
            ("logits / loss", self.logits_gib),
            ("not at the same time", self.overlap_gib),
            ("fragmentation margin", self.fragmentation_gib),
            ("CUDA context", self.cuda_context_gib),
        ]


def estimate_memory(arch: Architecture, setup: TrainingSetup) -> MemoryEstimate:
    """Estimate the peak GPU memory of one training step of `setup` on `arch`, per GPU."""
    method, notes = setup.method, []
    params = trainable_params(arch, method, setup.adapter)
    precision = setup.precision
    if precision == Precision.AUTO:
        precision = Precision.FP32 if setup.host else Precision.BF16
    fp32 = precision == Precision.FP32
    full = method == Method.FULL
    master = full and setup.fp32_master and not fp32
    gc = setup.gradient_checkpointing
    if gc and method == Method.PREFIX_TUNING:
        gc = False
        notes.append("prefix tuning trains without gradient checkpointing (PEFT's key/value cache)")
    optimizer = resolve_optimizer(method, setup.optimizer)
    base = parameter_count(arch)
    layer_linears = arch.num_layers * arch.layer_linear_params()
    model_bytes = 4 if fp32 else 2

    if method == Method.QLORA:
        bits = NF4_BITS_DOUBLE_QUANT if setup.double_quant else NF4_BITS
        weights = layer_linears * bits / 8 + (base - layer_linears) * 2
    else:
        weights = float(base * (4 if fp32 or master else 2))
    weights += setup.frozen_model_copies * base * 2
    if full:
        param_bytes = grad_bytes = 4 if fp32 or master else 2
        trainable, grads = 0.0, float(base * param_bytes)
        head = arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
        head_grads = float(head * param_bytes)
        states = optimizer_bytes(optimizer, arch, method, setup.adapter, param_bytes)
    else:
        copies = arch.vocab_size * arch.hidden_size * len(set(setup.adapter.modules_to_save))
        adapter = params.trainable - copies
        trainable = float(adapter * 4 + copies * model_bytes)
        grads = head_grads = trainable
        grad_bytes = 4
        states = optimizer_bytes(optimizer, arch, method, setup.adapter, 4)

    several = setup.gpus > 1
    sharded = several and setup.strategy in SHARDED
    deepspeed = several and setup.strategy in DEEPSPEED
    buckets = grads if several and setup.strategy not in (*SHARDED, *DEEPSPEED) else 0.0
    # DeepSpeed keeps full fine-tuning's weights in fp32 under torch autocast (the trainer's
    # config), else in the model dtype; its gathered parameters follow.
    deepspeed_bytes = 4 if master else model_bytes
    optimizer_grads = 0.0  # ZeRO's fp32 gradient partition for the optimizer step
    if deepspeed:  # gradient-reduction buckets, one set per communication dtype
        count = 1 if setup.strategy == DistributedStrategy.DEEPSPEED_ZERO3 else 2
        bucket_bytes = DEEPSPEED_AUTOCAST_BUCKET_BYTES if master else model_bytes
        buckets = count * DEEPSPEED_REDUCE_BUCKET * bucket_bytes
    if sharded:
        weights, trainable = weights / setup.gpus, trainable / setup.gpus
        grads, head_grads, states = grads / setup.gpus, head_grads / setup.gpus, states / setup.gpus
        two_layers = 2 * arch.layer_linear_params()  # the one in use, the next
        if setup.strategy == DistributedStrategy.DEEPSPEED_ZERO3:
            live = max(two_layers, min(DEEPSPEED_MAX_LIVE_PARAMETERS, base))
            weights += live * deepspeed_bytes
            optimizer_grads = grads * 4 / grad_bytes
        else:  # FSDP gathers in bf16 (its mixed-precision policy)
            weights += two_layers * model_bytes
        if setup.cpu_offload:
            trainable = grads = head_grads = states = optimizer_grads = 0.0
            notes.append("CPU offload: gradients and optimizer states live in CPU memory")
    elif deepspeed:  # ZeRO-2: gradients and optimizer state sharded, parameters replicated
        grads, head_grads, states = grads / setup.gpus, head_grads / setup.gpus, states / setup.gpus
        if master:  # its fp32 master partition is a copy even of fp32 weights
            states += base * 4 / setup.gpus

    tokens = setup.tokens
    layer = layer_activations(
        arch,
        full=full,
        fp32_master=master,
        lora_modules=setup.adapter.target_modules if method in (Method.LORA, Method.QLORA) else (),
        lora_dropout=setup.adapter.dropout,
        quantized_base=method == Method.QLORA,
        eager_attention=setup.eager_attention,
        fused_kernels=setup.fused_kernels and arch.model_type in FUSED_KERNEL_TYPES,
        lean_adapters=setup.lean_adapters,
    )
    scale = tokens * (2 if fp32 else 1) * (HOST_ACTIVATION_FACTOR if setup.host else 1)
    saved = float((layer.saved + layer.attention_scores_per_token * setup.seq_len) * scale)
    working, layer_input = float(layer.working * scale), float(layer.layer_input * scale)
    checkpointed = replace(setup, gradient_checkpointing=gc).checkpointed_layers(arch.num_layers)
    kept = arch.num_layers - checkpointed  # layers that keep all their activations
    offloaded = layer_input * checkpointed if setup.offload_activations and not setup.host else 0
    if offloaded:  # one checkpointed input is on the GPU at a time, on its way out or back
        stored = layer_input + kept * saved
        notes.append(
            f"activation offload: {offloaded / GIB:.1f} GiB of checkpointed layer inputs "
            "in pinned host memory"
        )
    else:
        stored = checkpointed * layer_input + kept * saved
    if checkpointed:
        layer_peak = saved + working
        end_of_backward = layer_input + saved + working
    else:
        layer_peak = 0.0  # the last layer's gradients reuse what its activations release
        end_of_backward = saved + working
    fsdp = sharded and setup.strategy == DistributedStrategy.FSDP
    if master and not fsdp:  # autocast's bf16 copies of the fp32 weights
        stored += 2 * arch.layer_linear_params() * (kept + (1 if checkpointed else 0))
    if method == Method.QLORA:  # one dequantized weight, forward and backward
        layer_peak += 2 * 2 * max(i * o for i, o in arch.linear_shapes().values())

    if setup.fused_loss and setup.host:  # its torch fallback: fp32 temporaries of full rows
        first = min(tokens, LOSS_TOKEN_TILE)
        loss = arch.vocab_size * (
            first * HOST_LOSS_BYTES + (tokens - first) * HOST_LOSS_BYTES_BEYOND
        )
        loss += tokens * arch.hidden_size * 4
    elif setup.fused_loss:
        tile = min(tokens, LOSS_TOKEN_TILE) * min(arch.vocab_size, LOSS_VOCAB_TILE)
        loss = tile * (4 if fp32 else 2)
        loss += tokens * arch.hidden_size * 4
    else:
        loss = tokens * arch.vocab_size * 12
        notes.append("full logits: a fused (chunked) LM-head loss would save most of this")
    activations = stored + layer_peak
    if setup.gradient_accumulation > 1:  # the earlier micro-batches' gradients are held
        peak = grads + max(stored + loss, activations, end_of_backward)
    else:
        peak = max(
            stored + loss + head_grads,
            activations + head_grads,
            grads + end_of_backward,
        )
    persistent = weights + trainable + states + buckets + optimizer_grads
    allocated = persistent + peak
    context = CUDA_CONTEXT_GIB + (NCCL_GIB if setup.gpus > 1 else 0.0)
    margin = FRAGMENTATION if setup.data_tokens is None else VARIABLE_SHAPE_FRAGMENTATION
    if setup.host:
        context, margin = 0.0, HOST_FRAGMENTATION
    fragmentation = margin * allocated / GIB
    overlap = allocated - (persistent + grads + activations + loss)
    return MemoryEstimate(
        weights_gib=weights / GIB,
        trainable_gib=trainable / GIB,
        gradients_gib=(grads + buckets + optimizer_grads) / GIB,
        optimizer_gib=states / GIB,
        activations_gib=activations / GIB,
        logits_gib=loss / GIB,
        overlap_gib=overlap / GIB,
        allocated_gib=allocated / GIB,
        fragmentation_gib=fragmentation,
        cuda_context_gib=context,
        total_gib=allocated / GIB + fragmentation + context,
        params=params,
        tokens_per_micro_batch=tokens,
        gradient_checkpointing=gc,
        checkpointed_layers=checkpointed,
        optimizer=optimizer,
        precision=precision,
        notes=tuple(notes),
        host_offload_gib=offloaded / GIB,
    )


def checkpointing_options(num_layers: int) -> list[int]:
    """`checkpoint_every` values from the least recomputation to the most: 0 (off), then
    every n-th layer, one n per count of checkpointed layers (the smallest n, which spaces
    them most evenly), ending with 1 (every layer)."""
    smallest: dict[int, int] = {}  # checkpointed layers -> the evenest spacing giving them
    for every in range(max(num_layers, 1), 0, -1):
        smallest[-(-num_layers // every)] = every
    return [0] + [smallest[count] for count in sorted(smallest)]


def with_checkpointing(setup: TrainingSetup, every: int) -> TrainingSetup:
    """`setup` with checkpointing off (every 0) or on every n-th layer."""
    if every <= 0:
        return replace(setup, gradient_checkpointing=False, checkpoint_every=1)
    return replace(setup, gradient_checkpointing=True, checkpoint_every=every)


def least_checkpointing(arch: Architecture, setup: TrainingSetup, memory_gib: float) -> int:
    """The `checkpoint_every` of `gradientCheckpointing: Auto`: off when the step fits in
    `memory_gib` without it, else the fewest checkpointed layers that fit, else every layer
    (1; the job then does not fit at all)."""
    for every in checkpointing_options(arch.num_layers):
        if estimate_memory(arch, with_checkpointing(setup, every)).total_gib <= memory_gib:
            return every
    return 1
