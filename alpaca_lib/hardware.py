"""Fitting train.py's run to the machine: GPU-less fallbacks, DDP over gloo, FSDP's layer class, DeepSpeed ZeRO-3.

  * adapt_to_hardware / check_distributed: FSDP, DeepSpeed and tf32 requests on a machine without a GPU, and torchrun
    on CPU (real DDP over gloo, never two silent copies);
  * resolve_fsdp_wrap_class: the FSDP layer class from the model (the original README spelled it LLaMADecoderLayer);
  * check_padding_free: models that do not keep packed examples apart with sdpa/eager attention (OPT);
  * gathered_parameters: editing embedding rows under DeepSpeed ZeRO-3; outside_deepspeed_zero3: loading the base
    in one process to merge a LoRA adapter during a ZeRO-3 run;
  * end_distributed: leaving torchrun without the interpreter's shutdown racing gloo's threads.
"""

import atexit
import contextlib
import logging
import os
import sys
import threading

import torch

from alpaca_lib.cli import UsageError

logger = logging.getLogger(__name__)

def _gpu_available():
    return torch.cuda.is_available()


def _cpu_only():
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return not accelerator.is_available()
    return not torch.cuda.is_available()


def adapt_to_hardware(namespace, world_size):
    """Adjust parsed arguments (an argparse Namespace, edited in place) to what this machine can run; return notices.

    Without a GPU: train on CPU (`use_cpu`), across processes with DDP over gloo when launched by torchrun; FSDP,
    DeepSpeed and tf32 need CUDA GPUs, so they fall back (to DDP or a single process) with a notice.
    """
    notices = []
    if _gpu_available():
        if namespace.deepspeed:
            try:
                import deepspeed  # noqa: F401
            except ImportError:
                raise UsageError("--deepspeed needs the deepspeed package: pip install deepspeed") from None
        return notices
    fallback = f"DDP over gloo across {world_size} processes" if world_size > 1 else "a single process"
    fallback += " on CPU" if _cpu_only() else ""
    if namespace.fsdp:
        notices.append(f"FSDP needs CUDA GPUs and none was found: falling back to {fallback}")
        namespace.fsdp, namespace.fsdp_config = None, None
    if namespace.deepspeed:
        notices.append(f"DeepSpeed needs CUDA GPUs and none was found: falling back to {fallback}")
        namespace.deepspeed = None
    if namespace.tf32:
        notices.append("--tf32 ignored: TF32 is a mode of NVIDIA Ampere+ GPUs and none was found")
        namespace.tf32 = None
    if _cpu_only() and not namespace.use_cpu:
        namespace.use_cpu = True
        notices.append("no GPU found: training on CPU (--use_cpu True)")
    if namespace.use_cpu and world_size > 1 and namespace.ddp_backend in (None, "nccl"):
        if namespace.ddp_backend == "nccl":
            notices.append("--ddp_backend nccl needs GPUs: using gloo")
        namespace.ddp_backend = "gloo"
    return notices


def check_distributed(trainer, world_size, args):
    """Raise unless the Trainer trains one distributed model when torchrun started `world_size` > 1 processes.

    (HF Trainer on CPU with only `--ddp_backend gloo` shards the data but never wraps the model: each process trains
    its own copy. That must never happen silently.) Logs the distribution in use from the first process.
    """
    wrapped = trainer.model_wrapped
    kind = type(wrapped).__name__
    if world_size <= 1:
        return
    if args.world_size != world_size or (wrapped is trainer.model and not (
            trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled)):
        raise RuntimeError(
            f"torchrun started {world_size} processes but the Trainer is not training one distributed model (Trainer "
            f"world size {args.world_size}, model wrapped as {kind}). On a CPU-only machine pass --use_cpu True "
            "--ddp_backend gloo; on GPUs check CUDA_VISIBLE_DEVICES."
        )
    if args.process_index == 0:
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "?"
        logger.info("distributed: %s over %d processes (backend %s, device %s)",
                    "FSDP" if trainer.is_fsdp_enabled else "DeepSpeed" if trainer.is_deepspeed_enabled else kind,
                    world_size, backend, args.device)


def resolve_fsdp_wrap_class(training_args, model):
    """Set the FSDP auto-wrap class from the model's `_no_split_modules` when not given; check a given one exists.

    A name differing only in case from the model's layer (the original README's `LLaMADecoderLayer`) is corrected with
    a notice; an unknown one is a UsageError listing the model's layer classes.
    """
    if not training_args.fsdp or training_args.fsdp_plugin_args is None:
        return None
    plugin_args, config = training_args.fsdp_plugin_args, training_args.fsdp_config
    if plugin_args.get("auto_wrap_policy") != "TRANSFORMER_BASED_WRAP":
        return None
    model_classes = {type(module).__name__ for module in model.modules()}
    requested = config.get("transformer_layer_cls_to_wrap")
    if not requested:
        requested = list(getattr(model, "_no_split_modules", None) or [])
        if not requested:
            raise UsageError(f"cannot tell which layer FSDP should wrap in {type(model).__name__}; pass --fsdp_config "
                             "with transformer_layer_cls_to_wrap")
        logger.info("FSDP: wrapping %s (the model's _no_split_modules)", ", ".join(requested))
    resolved = []
    by_lower_name = {name.lower(): name for name in model_classes}
    for name in requested:
        if name in model_classes:
            resolved.append(name)
        elif name.lower() in by_lower_name:
            logger.warning("FSDP: layer class %s does not exist, using %s", name, by_lower_name[name.lower()])
            resolved.append(by_lower_name[name.lower()])
        else:
            layers = sorted(n for n in model_classes if n.endswith(("Layer", "Block")))
            raise UsageError(f"FSDP layer class {name!r} is not in {type(model).__name__}; its layer classes are "
                             f"{layers}")
    config["transformer_layer_cls_to_wrap"] = resolved
    plugin_args["transformer_cls_names_to_wrap"] = ",".join(resolved)
    return resolved


def check_padding_free(model):
    """Stop unless `model` keeps packed examples apart: run two short sequences packed in one row (position_ids
    restarting) and one by one, and compare the second one's logits.

    With sdpa / eager attention transformers builds the block-diagonal mask from position_ids only when the model passes
    no attention_mask of its own: Llama, Mistral, Qwen2, GPT-2 do; OPT builds an all-ones mask and mixes the examples.
    (flash-attention instead uses the cumulative lengths the collator passes.) Returns the largest logit difference.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled() or any(p.device.type == "meta" for p in model.parameters()):
        logger.warning("padding-free: cannot probe a partitioned model; trusting %s to honour packed position_ids",
                       type(model).__name__)
        return None
    vocab_size = model.get_input_embeddings().weight.shape[0]  # under LoRA, a peft wrapper of the embedding
    device = model.get_input_embeddings().weight.device
    input_ids = ((torch.arange(7) * 37 + 11) % vocab_size)[None].to(device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        packed = model(input_ids=input_ids, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2]], device=device),
                       use_cache=False).logits[0, 4:].float()
        alone = model(input_ids=input_ids[:, 4:], use_cache=False).logits[0].float()
    model.train(was_training)
    difference = (packed - alone).abs().max().item()
    if difference > 0.02 * max(alone.abs().max().item(), 1e-6):  # bf16 noise is ~1e-3 of the scale, leakage ~0.3
        raise UsageError(
            f"--padding_free True: {type(model).__name__} with {model.config._attn_implementation} attention lets "
            f"packed examples attend to each other (logits differ by {difference:.3g} on a probe). Use "
            "--attn_implementation flash_attention_2 on GPU, or leave --padding_free off."
        )
    return difference


def gathered_parameters(params):
    """Under DeepSpeed ZeRO-3 parameters are partitioned across ranks; gather them (rank 0 edits) while rows are set.
    Elsewhere a no-op context."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


@contextlib.contextmanager
def outside_deepspeed_zero3():
    """Load a model in one process while a DeepSpeed ZeRO-3 run is configured (train.py --merge_lora, on the first
    process): from_pretrained would otherwise partition it across processes that are not there. Elsewhere a no-op."""
    from transformers.integrations import deepspeed

    reference = deepspeed._hf_deepspeed_config_weak_ref
    config = reference() if reference is not None else None
    if config is None:
        yield
        return
    deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        deepspeed.set_hf_deepspeed_config(config)


# ----------------------------------------------------------------------------------------------------------------------
# Leaving torchrun


def end_distributed(trainer):
    """End a torchrun process without the interpreter's finalization racing torch's C++ threads.

    destroy_process_group() does not stop gloo's worker and transport threads in torch 2.13 (the DDP model still holds
    the process group), and a gloo worker drops its reference to a finished collective, and the Python-created tensors
    it holds, only after the waiting rank has been released. If that rank is already finalizing its interpreter, the
    release must take the GIL, CPython ends the thread inside a C++ destructor, and std::terminate aborts the process
    ("terminate called without an active exception", SIGABRT; pytorch issues #38228, #190489). So every rank waits for
    the others, leaves the process group, runs the exit handlers (trackers, loggers, thread pools) and then exits with
    os._exit: there is no finalization left for a thread to race. Single-process runs exit normally.
    """
    if not torch.distributed.is_initialized():
        return
    trainer.accelerator.wait_for_everyone()  # every rank is done with collectives and with saving
    trainer.accelerator.end_training()  # trackers finished, process group destroyed
    for thread in threading.enumerate():  # what interpreter shutdown would wait for
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
