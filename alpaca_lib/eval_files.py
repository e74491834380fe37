"""The files of evaluation, shared by inference.py and judge.py: instruction sets in, model outputs out.

Read (`read_instructions`, `read_outputs`): Alpaca JSON / JSONL records, the self-instruct user-oriented set
(`instances[0].input`), AlpacaEval output files (`output`, `generator`) and the self-instruct prediction files
(`response`, e.g. text-davinci-003_predictions.jsonl). A record is named by its stripped (instruction, input) pair
(`record_key`): the prediction files carry the instruction with a trailing newline, the instruction sets without.

Write (`OutputFile`): the AlpacaEval format, a JSON list of {"instruction", "input", "output", "generator"}, in the
order of the instruction set, rewritten atomically; an existing file is resumed (its records are not asked again).
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


def record_key(record):
    """The name of a record: its (instruction, input) pair, stripped; a missing input is empty."""
    return record["instruction"].strip(), record.get("input", "").strip()


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
    completion model puts after "Output:". `generator` defaults to the file's name without extension. A key (stripped
    instruction and input) found twice is an error: a pair could not be matched.
    """
    default_generator = os.path.splitext(os.path.basename(path))[0]
    outputs, first_index = [], {}
    for index, record in enumerate(_load_records(path)):
        field = "output" if "output" in record else "response" if "response" in record else None
        if field is None:
            raise EvalDataError(f"{path}: record {index}: no 'output' field (nor 'response'): not a file of outputs")
        output = _string_field(path, index, record, field, record[field])
        task_input = _string_field(path, index, record, "input", record.get("input", ""))
        generator = record.get("generator", default_generator)
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
