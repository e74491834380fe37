"""Seed tasks: the self-instruct JSONL file of human-written tasks that stage 1 samples into its prompts."""

import os

from alpaca_lib import data_files
from alpaca_lib.generation_rounds import GenerationError


def load_seed_instruction_data(seed_tasks_path):
    """Seed tasks (self-instruct JSONL) -> [{instruction, input, output}] from each task's first instance.

    Every line is checked; a bad one is a GenerationError naming the file, the line and the field.
    """
    if not os.path.exists(seed_tasks_path):
        raise GenerationError(f"{seed_tasks_path}: no such file (the seed tasks, one JSON object per line)")
    seed_instruction_data = []
    for where, task in data_files.json_lines(seed_tasks_path, GenerationError):
        if not isinstance(task, dict):
            raise GenerationError(f"{where}: is a JSON {type(task).__name__}; expected an object")
        if not isinstance(task.get("instruction"), str) or not task["instruction"].strip():
            raise GenerationError(f"{where}: field 'instruction' is missing or not a non-empty string")
        instances = task.get("instances")
        if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
            raise GenerationError(f"{where}: field 'instances' must be a non-empty list of objects")
        # a missing or null input is ""
        instance = {**instances[0], "input": data_files.optional_field(instances[0], "input")}
        for field in ("input", "output"):
            if not isinstance(instance.get(field), str):
                raise GenerationError(f"{where}: field 'instances[0].{field}' is missing or not a string")
        seed_instruction_data.append(
            {"instruction": task["instruction"], "input": instance["input"], "output": instance["output"]}
        )
    return seed_instruction_data
