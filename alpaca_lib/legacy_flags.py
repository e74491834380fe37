"""train.py's command line as the original README wrote it: transformers-4 flags rewritten for transformers 5.

translate_legacy_args maps each removed or renamed TrainingArguments flag to its successor (or drops it) and returns a
one-line notice for each; train.parse_args applies it before argparse sees the command line.
"""

import json
import os

from alpaca_lib.cli import UsageError

# old flag -> (new flag, kind). "bool" flags may appear bare (`--group_by_length`) or with a value (`... True`).
LEGACY_FLAGS = {
    "--evaluation_strategy": ("--eval_strategy", "value"),
    "--warmup_ratio": ("--warmup_steps", "ratio"),
    "--per_gpu_train_batch_size": ("--per_device_train_batch_size", "value"),
    "--per_gpu_eval_batch_size": ("--per_device_eval_batch_size", "value"),
    "--no_cuda": ("--use_cpu", "bool"),
    "--group_by_length": ("--train_sampling_strategy", "bool"),
    "--gradient_checkpointing": ("--activation_checkpointing", "bool"),
    "--gradient_checkpointing_kwargs": ("--activation_checkpointing_kwargs", "value"),
    "--fsdp_transformer_layer_cls_to_wrap": ("fsdp_config.transformer_layer_cls_to_wrap", "value"),
    "--fsdp_min_num_params": ("fsdp_config.min_num_params", "value"),
    "--overwrite_output_dir": (None, "bool"),
    "--save_safetensors": (None, "bool"),
    "--logging_dir": ("TENSORBOARD_LOGGING_DIR", "value"),
}
TRUE_STRINGS = {"true", "1", "yes", "y"}
FALSE_STRINGS = {"false", "0", "no", "n", ""}


def _split_flags(argv):
    """Split argv into (flag, [values]) pairs: `--flag=value`, `--flag value`, `--flag v1 v2` (lists), bare `--flag`."""
    pairs = []
    for token in argv:
        if token.startswith("--"):
            name, eq, value = token.partition("=")
            pairs.append((name, [value] if eq else []))
        elif pairs:
            pairs[-1][1].append(token)
        else:
            raise UsageError(f"unexpected argument {token!r} (every argument is a --flag, see --help)")
    return pairs


def _as_bool(flag, value):
    if value is None or value.lower() in TRUE_STRINGS:
        return True
    if value.lower() in FALSE_STRINGS:
        return False
    raise UsageError(f"{flag} expects True or False, got {value!r}")


def translate_legacy_args(argv):
    """Rewrite transformers-4 flags (the original README's) into transformers-5 ones.

    Returns (new_argv, notices): one notice per rewritten flag. `--fsdp "full_shard auto_wrap [offload]"` and
    `--fsdp_transformer_layer_cls_to_wrap X` become `--fsdp` plus `fsdp_config` entries (merged over a given
    `--fsdp_config` file); `--warmup_ratio r` becomes `--warmup_steps r` (transformers 5 reads a float < 1 as a ratio).
    Raises UsageError on a malformed value.
    """
    out, notices, fsdp_entries = [], [], {}
    fsdp_config_value, fsdp_enabled = None, False
    for flag, values in _split_flags(argv):
        if flag == "--fsdp":  # `--fsdp full_shard auto_wrap` unquoted is the same option string
            values = [" ".join(values)] if values else []
        if (flag in LEGACY_FLAGS or flag == "--fsdp_config") and len(values) > 1:
            raise UsageError(f"{flag} takes one value, got {values}")
        value = values[0] if values else None
        if flag in LEGACY_FLAGS:
            new, kind = LEGACY_FLAGS[flag]
            if kind != "bool" and value is None:
                raise UsageError(f"{flag} expects a value")
            if flag == "--warmup_ratio":
                try:
                    ratio = float(value)
                except ValueError:
                    raise UsageError(f"--warmup_ratio expects a number in [0, 1), got {value!r}") from None
                if not 0 <= ratio < 1:
                    raise UsageError(f"--warmup_ratio must be in [0, 1), got {value}")
                out += ["--warmup_steps", repr(ratio)]
                notices.append(f"--warmup_ratio {value} -> --warmup_steps {ratio} (transformers 5 reads a float < 1 "
                               "as a ratio of the total steps)")
            elif flag == "--group_by_length":
                if _as_bool(flag, value):
                    out += ["--train_sampling_strategy", "group_by_length"]
                notices.append(f"{flag} -> --train_sampling_strategy group_by_length")
            elif new is not None and new.startswith("fsdp_config."):
                key = new.split(".", 1)[1]
                if key == "transformer_layer_cls_to_wrap":
                    fsdp_entries[key] = [name.strip() for name in value.split(",") if name.strip()]
                else:
                    if not value.isdigit():
                        raise UsageError(f"{flag} expects a whole number, got {value!r}")
                    fsdp_entries[key] = int(value)
                    fsdp_entries["auto_wrap_policy"] = "SIZE_BASED_WRAP"
                notices.append(f"{flag} {value} -> fsdp_config[{key!r}]")
            elif flag == "--logging_dir":
                os.environ["TENSORBOARD_LOGGING_DIR"] = value
                notices.append(f"--logging_dir {value} -> environment variable TENSORBOARD_LOGGING_DIR")
            elif new is None:
                notices.append(f"{flag} ignored: transformers 5 removed it "
                               + ("(it always writes into output_dir)" if "overwrite" in flag else
                                  "(weights are always saved as safetensors)"))
            elif kind == "bool":
                out += [new, str(_as_bool(flag, value))]
                notices.append(f"{flag} -> {new}")
            else:
                out += [new, value]
                notices.append(f"{flag} -> {new}")
        elif flag == "--fsdp":
            if value is None or value.lower() in TRUE_STRINGS:
                fsdp_enabled = True
            elif value.lower() in FALSE_STRINGS:
                pass
            else:  # the transformers-4 option string, e.g. "full_shard auto_wrap offload"
                fsdp_enabled = True
                for option in value.split():
                    if option == "full_shard":
                        fsdp_entries["reshard_after_forward"] = True
                    elif option == "shard_grad_op":
                        fsdp_entries["reshard_after_forward"] = False
                    elif option == "offload":
                        fsdp_entries["cpu_offload"] = True
                    elif option == "auto_wrap":
                        fsdp_entries.setdefault("auto_wrap_policy", "TRANSFORMER_BASED_WRAP")
                    else:
                        raise UsageError(f"--fsdp option {option!r} is not supported by FSDP2 (transformers 5); use "
                                         "full_shard, shard_grad_op, offload, auto_wrap")
                notices.append(f"--fsdp {value!r} -> --fsdp with fsdp_config {json.dumps(fsdp_entries)}")
        elif flag == "--fsdp_config":
            fsdp_config_value = value
        else:
            out += [flag, *values]
    if fsdp_enabled:
        out.append("--fsdp")
    if fsdp_entries:
        base = {}
        if fsdp_config_value is not None:
            base = _read_fsdp_config(fsdp_config_value)
        base = {key[5:] if key.startswith("fsdp_") else key: v for key, v in base.items()}
        base.update(fsdp_entries)  # the flags on the command line win over the file
        out += ["--fsdp_config", json.dumps(base)]
    elif fsdp_config_value is not None:
        out += ["--fsdp_config", fsdp_config_value]
    return out, notices


def _read_fsdp_config(value):
    try:
        if value.lstrip().startswith("{"):
            return json.loads(value)
        with open(value, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"--fsdp_config {value}: {e}") from None
