"""What the benchmarks measure with: model shapes, training FLOPs, memory peaks, a measured train.py run, and
batched against one-at-a-time generation. Shared by train_throughput.py, lora_memory.py, inference.py and
gpu_check.py; importing it loads neither torch nor transformers (each function imports what it needs).

  * TINYLLAMA_SHAPE / llama_config: the random Llamas the benchmarks build
  * flops_per_token: training FLOPs per token, for model FLOPs utilisation (MFU)
  * proc_status_kb / reset_peak_rss / gb: this process's resident memory and its peak (Linux /proc)
  * measured_train: train.train(argv) with its batches counted, its steps timed, its memory peaks taken
  * batched_and_single_generation: inference.py's batched generation against one prompt at a time
"""

import statistics
import time

# TinyLlama-1.1B's shape: 22 layers, hidden 2048, grouped-query attention (32 heads, 4 key/value heads).
TINYLLAMA_SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4)


def llama_config(vocab_size, shape):
    """A LlamaConfig of `shape` (hidden_size, intermediate_size, ... keyword arguments) for a vocabulary whose
    unk/bos/eos are 0/1/2 (bench/preprocess.py's LLaMA-like tokenizer), untied embeddings, 2,048 positions."""
    import transformers

    return transformers.LlamaConfig(vocab_size=vocab_size, max_position_embeddings=2048, bos_token_id=1,
                                    eos_token_id=2, tie_word_embeddings=False, **shape)


def flops_per_token(config, seq_len):
    """Training FLOPs per token: 6 x (non-embedding matmul params + lm_head) + causal attention scores/values."""
    h, layers = config.hidden_size, config.num_hidden_layers
    kv = h * config.num_key_value_heads // config.num_attention_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * config.intermediate_size
    matmul_params = layers * per_layer + h * config.vocab_size
    attention = 6 * layers * h * seq_len  # 12*L*h*T/2: causal, forward+backward
    return 6 * matmul_params + attention


def proc_status_kb(field):
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak since start or reset), kB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss():
    """Start VmHWM again from the current RSS (Linux: writing 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def gb(num_bytes):
    return f"{num_bytes / 2**30:.2f} GB"


def measured_train(argv):
    """Run train.train(argv) in this process and measure it; returns (trainer, figures).

    figures (a JSON-ready dict): steps; trainable and total parameters; rss_before_load, load_peak (VmHWM of loading,
    wrapping, tokenizing and Trainer set-up), rss_loaded, train_peak (VmHWM while training, reset when training
    begins), in bytes; gpu_peak (torch.cuda.max_memory_allocated while training, bytes; None without CUDA); tokens
    (real tokens of the batches trained on) and positions (what the model computed, padding included);
    tokens_per_s / positions_per_s over the steps after the first (it warms up: kernels, allocator, Adam's state);
    step_seconds_median; losses (one per logging step); fsdp (whether the Trainer ran FSDP) and attention.
    """
    import torch
    import transformers

    import train

    rss_before_load = proc_status_kb("VmRSS")
    batches, step_ends, marks = [], [], {}
    cuda = torch.cuda.is_available()

    class Counting(train.DataCollatorForSupervisedDataset):
        def __call__(self, instances):
            batch = super().__call__(instances)
            batches.append((sum(len(instance["input_ids"]) for instance in instances), batch["input_ids"].numel()))
            return batch

    class Meter(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks["load_peak"] = proc_status_kb("VmHWM")
            marks["rss_loaded"] = proc_status_kb("VmRSS")
            reset_peak_rss()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            step_ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()  # the step's kernels are queued; time them, not their launch
            step_ends.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):
            marks["train_peak"] = proc_status_kb("VmHWM")  # before the final save
            if cuda:
                marks["gpu_peak"] = torch.cuda.max_memory_allocated()

    original_collator, original_trainer = train.DataCollatorForSupervisedDataset, transformers.Trainer

    def trainer_with_meter(*args, **kwargs):
        trainer = original_trainer(*args, **kwargs)
        trainer.add_callback(Meter())
        return trainer

    train.DataCollatorForSupervisedDataset = Counting  # make_supervised_data_module builds this one
    train.transformers.Trainer = trainer_with_meter
    try:
        trainer = train.train(argv)
    finally:
        train.DataCollatorForSupervisedDataset, train.transformers.Trainer = original_collator, original_trainer

    steps = len(step_ends) - 1
    per_step = trainer.args.gradient_accumulation_steps
    trained = batches[:steps * per_step]  # the data loader may have fetched a batch ahead
    timed = trained[per_step:]
    timed_seconds = step_ends[-1] - step_ends[1] if steps > 1 else None
    figures = dict(
        steps=steps,
        trainable=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        total=sum(p.numel() for p in trainer.model.parameters()),
        rss_before_load=rss_before_load * 1024, load_peak=marks["load_peak"] * 1024,
        rss_loaded=marks["rss_loaded"] * 1024, train_peak=marks["train_peak"] * 1024,
        gpu_peak=marks.get("gpu_peak"),
        tokens=sum(tokens for tokens, _ in trained), positions=sum(positions for _, positions in trained),
        tokens_per_s=sum(t for t, _ in timed) / timed_seconds if timed_seconds else None,
        positions_per_s=sum(p for _, p in timed) / timed_seconds if timed_seconds else None,
        step_seconds_median=statistics.median(b - a for a, b in zip(step_ends[1:], step_ends[2:])) if steps > 1
        else None,
        losses=[entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        fsdp=bool(trainer.is_fsdp_enabled),
        attention=trainer.accelerator.unwrap_model(trainer.model).config._attn_implementation,
    )
    return trainer, figures


def batched_and_single_generation(model, tokenizer, prompts, generation_config, batch_size):
    """Answer `prompts` with inference.py's batched generation (length-sorted batches of `batch_size`), then one at a
    time; returns dict(batched_tokens, batched_s, single_tokens, single_s, identical, answers) with `answers` the
    batched ones in prompt order and `identical` how many the two ways answered alike."""
    from alpaca_lib.local_generation import generate, length_sorted_batches, prompt_lengths

    synchronize = _synchronizer(model)
    answers, batched_tokens = [None] * len(prompts), 0
    start = time.perf_counter()
    for positions in length_sorted_batches(prompt_lengths(tokenizer, prompts), batch_size):
        texts, tokens = generate(model, tokenizer, [prompts[p] for p in positions], generation_config)
        batched_tokens += tokens
        for position, text in zip(positions, texts):
            answers[position] = text
    synchronize()
    batched_s = time.perf_counter() - start

    single_answers, single_tokens = [], 0
    start = time.perf_counter()
    for prompt in prompts:
        texts, tokens = generate(model, tokenizer, [prompt], generation_config)
        single_answers += texts
        single_tokens += tokens
    synchronize()
    single_s = time.perf_counter() - start
    return dict(batched_tokens=batched_tokens, batched_s=batched_s, single_tokens=single_tokens, single_s=single_s,
                identical=sum(a == b for a, b in zip(answers, single_answers)), answers=answers)


def _synchronizer(model):
    import torch

    if model.device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None
