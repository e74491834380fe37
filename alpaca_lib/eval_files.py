"""The files of evaluation, shared by inference.py and judge.py: instruction sets in, model outputs out.

Read (`read_instructions`, `read_outputs`): Alpaca records (in any format data_files reads), the self-instruct
user-oriented set (`instances[0].input`), AlpacaEval output files (`output`, `generator`) and the self-instruct
prediction files (`response`, e.g. text-davinci-003_predictions.jsonl).

A record is named by its folded instruction (`record_key`, `fold_instruction`): the instruction and the input, each
stripped of surrounding whitespace, joined by a blank line; the instruction alone when the input is empty. The
prediction files carry the instruction with a trailing newline, the instruction sets without; AlpacaEval's files have
no `input`, it is inside their instruction by this same rule (AlpacaEval's own evaluation set folds the 252
self-instruct tasks so). So a record of ours and one of AlpacaEval's name the same task alike, and pair.

Write (`OutputFile`): the AlpacaEval format, a JSON list of {"instruction", "input", "output", "generator"}, in the
order of the instruction set, rewritten atomically; an existing file is resumed (its records are not asked again).
`to_alpaca_eval_records`: any outputs file as AlpacaEval reads it (the input folded into the instruction, no `input`).
"""

import collections
import os
from alpaca_lib import data_files
from alpaca_lib.errors import UserError


# Fields of an instruction set copied into each output record (the user-oriented set's category and id; AlpacaEval's
# dataset name), so that a judge can break results down without the instruction file.
CARRIED_FIELDS = ("id", "dataset", "motivation_app")


class EvalDataError(UserError, ValueError):
    """A file that is not an instruction set or an output file; the message names the file, the record and field."""


def fold_instruction(instruction, task_input):
    """The instruction AlpacaEval shows its judge for a task: "{instruction}\n\n{input}", each stripped, or the
    stripped instruction when the input is empty. AlpacaEval merges two outputs files on this text exactly."""
    instruction, task_input = instruction.strip(), task_input.strip()
    return f"{instruction}\n\n{task_input}" if task_input else instruction


def record_key(record):
    """The name of a record, by which two files pair: its folded instruction (fold_instruction; a missing input is
    empty). A record of an AlpacaEval file (input already inside the instruction) has the key of ours for the task."""
    return fold_instruction(record["instruction"], record.get("input") or "")


def _load_records(path):
    """JSON list or JSON lines of objects, each with a string `instruction` (AlpacaEval, Alpaca, self-instruct)."""
    try:
        return data_files.load_alpaca_data(path, required_fields=("instruction",))
    except data_files.AlpacaDataError as e:
        raise EvalDataError(str(e)) from None


def _string_field(path, index, record, field, value):
    if not isinstance(value, str):
        raise EvalDataError(f"{path}: record {index}: field '{field}' is {type(value).__name__}; expected a string")
    return value


def read_instructions(path):
    """The instructions of an evaluation or training set: [{"instruction", "input", + CARRIED_FIELDS present}].

    Accepts Alpaca JSON / JSONL (`input` missing means empty), the self-instruct user-oriented JSONL (the input is
    `instances[0].input`), and output files (their instructions). Errors name the file, the record and the field.
    """
    records = []
    for index, record in enumerate(_load_records(path)):
        if "instances" in record and "input" not in record:  # self-instruct: the first instance holds the input
            instances = record["instances"]
            if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
                raise EvalDataError(f"{path}: record {index}: field 'instances' must be a non-empty list of objects")
            task_input = _string_field(path, index, record, "instances[0].input",
                                       data_files.optional_field(instances[0], "input"))
        else:
            task_input = _string_field(path, index, record, "input", record.get("input", ""))
        if not record["instruction"].strip():
            raise EvalDataError(f"{path}: record {index}: field 'instruction' is empty")
        records.append({"instruction": record["instruction"], "input": task_input,
                        **{field: record[field] for field in CARRIED_FIELDS if field in record}})
    return records


def read_outputs(path):
    """A file of model outputs: [{"instruction", "input", "output", "generator", + CARRIED_FIELDS present}].

    The output is the field `output` (AlpacaEval) or `response` (self-instruct predictions), stripped of the space a
    completion model puts after "Output:". `generator` defaults to the file's name without extension. A key (the
    folded instruction, record_key) found twice is an error: a pair could not be matched. An AlpacaEval file (no
    `input`, the input folded into `instruction`) reads as records with an empty input, and pairs with ours.
    """
    default_generator = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]  # a folder: its name
    outputs, first_index = [], {}
    for index, record in enumerate(_load_records(path)):
        field = "output" if "output" in record else "response" if "response" in record else None
        if field is None:
            raise EvalDataError(f"{path}: record {index}: no 'output' field (nor 'response'): not a file of outputs")
        output = _string_field(path, index, record, field, record[field])
        task_input = _string_field(path, index, record, "input", record.get("input", ""))
        generator = record.get("generator") or default_generator  # a null one (a parquet column) too
        outputs.append({"instruction": record["instruction"], "input": task_input, "output": output.strip(),
                        "generator": str(generator),
                        **{field: record[field] for field in CARRIED_FIELDS if field in record}})
        key = record_key(outputs[-1])
        if key in first_index:
            raise EvalDataError(f"{path}: records {first_index[key]} and {index} have the same instruction and input")
        first_index[key] = index
    if not outputs:  # said here, not later as "the two files share no (instruction, input)"
        raise EvalDataError(f"{path}: holds no records")
    return outputs


class OutputFile:
    """The outputs of one generator for one instruction set, in the set's order, at `path` (AlpacaEval format).

    `resume` reads an existing file: each of its records is matched to the first instruction with the same key not
    yet matched; a record of another generator, or of an instruction not in the set, is an error (a file of another
    run, which resuming would mix in). `add` records an output, `write` rewrites the file atomically (each record is
    serialised once, so a rewrite costs a file write, not a re-encoding of everything).
    """

    def __init__(self, path, instructions, generator):
        self.path = os.fspath(path)
        self.instructions = instructions
        self.generator = generator
        self._texts = {}  # index in `instructions` -> the record's JSON text

    def resume(self):
        """Load what an earlier run wrote; returns how many instructions are done."""
        data_files.remove_stale_temp_files(self.path)  # left by a kill during a rewrite; the file itself is whole
        if not os.path.exists(self.path):
            return 0
        try:
            existing = data_files.load_alpaca_data(self.path, required_fields=("instruction", "input", "output"))
        except data_files.AlpacaDataError as e:
            raise EvalDataError(f"cannot resume: {e}") from None
        unmatched = collections.defaultdict(collections.deque)
        for index, record in enumerate(self.instructions):
            unmatched[record_key(record)].append(index)
        for position, record in enumerate(existing):
            if record.get("generator") != self.generator:
                raise EvalDataError(f"{self.path}: record {position} was written by generator "
                                    f"{record.get('generator')!r}, not {self.generator!r}: choose another "
                                    "--output_path (or pass --generator to name this run as that one)")
            indices = unmatched.get(record_key(record))
            if not indices:
                raise EvalDataError(f"{self.path}: record {position} answers an instruction that is not in the "
                                    "input file (or answers it twice): this file belongs to another run; choose "
                                    "another --output_path")
            self._texts[indices.popleft()] = data_files.jdump_item(record)
        return len(self._texts)

    def done(self, index):
        return index in self._texts

    def __len__(self):
        return len(self._texts)

    def add(self, index, output):
        source = self.instructions[index]
        record = {"instruction": source["instruction"], "input": source["input"], "output": output,
                  "generator": self.generator, **{field: source[field] for field in CARRIED_FIELDS if field in source}}
        self._texts[index] = data_files.jdump_item(record)

    def write(self):
        data_files.jdump_items([self._texts[index] for index in sorted(self._texts)], self.path)

    def where(self):
        return (f"{self.path} holds {len(self)} of {len(self.instructions)} outputs; rerun the same command to "
                "resume")


# ----------------------------------------------------------------------------------------------------------------------
# AlpacaEval's format


def to_alpaca_eval_records(outputs, generator=None):
    """Records of read_outputs as AlpacaEval reads them: [{"instruction": folded, "output", "generator", +
    CARRIED_FIELDS present}], in order. The input is folded into the instruction (fold_instruction), because
    AlpacaEval merges two files on `instruction` alone and its judge templates show only {instruction} and the
    outputs. `generator` replaces each record's generator (the name AlpacaEval's leaderboard shows)."""
    return [{"instruction": record_key(record), "output": record["output"],
             "generator": generator if generator is not None else record["generator"],
             **{field: record[field] for field in CARRIED_FIELDS if field in record}} for record in outputs]

