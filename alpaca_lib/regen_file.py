"""regen.json, stage 1's output: every accepted record, in order, rewritten atomically after every round; an existing
file is resumed."""

import dataclasses
import os

from alpaca_lib import data_files
from alpaca_lib.generation_rounds import GenerationError, plural


regen_record_json = data_files.jdump_item  # one regen.json record, serialized once


def write_regen_json(path, record_texts):
    """Atomically write regen.json from records serialized by regen_record_json (data_files.jdump_items)."""
    data_files.jdump_items(record_texts, path)


@dataclasses.dataclass
class RegenFile:
    """OUTPUT_DIR/regen.json: the records (in order) and their serialized texts."""

    path: str
    records: list
    texts: list

    @classmethod
    def resume(cls, output_dir):
        """The records of an existing regen.json (none if absent), after removing the temp file a kill mid-write may
        have left beside it. A file that is not valid Alpaca data is a GenerationError, and left alone."""
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "regen.json")
        data_files.remove_stale_temp_files(path)
        records = []
        if os.path.exists(path):
            try:
                records = data_files.load_alpaca_data(path)
            except data_files.AlpacaDataError as e:
                raise GenerationError(f"cannot resume: {e}") from None
        return cls(path, records, [regen_record_json(record) for record in records])

    def __len__(self):
        return len(self.records)

    def append_and_write(self, records):
        self.append(records)
        self.write()

    def append(self, records):
        """Add records in memory only (batch jobs apply many rounds, then write once)."""
        self.records += records
        self.texts += [regen_record_json(record) for record in records]

    def write(self):
        write_regen_json(self.path, self.texts)  # atomic: a kill leaves the previous file

    def where(self):
        count = len(self.records)
        held = "the 1 accepted record" if count == 1 else f"all {plural(count, 'accepted record')}"
        return f"{self.path} holds {held}; rerun the same command to resume"

