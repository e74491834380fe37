"""Load time of the 52,002-record alpaca_data.json in every format load_alpaca_data reads, and the same records.

    python bench/data_formats.py [--data_path ../shared/data/alpaca_data.json] [--repeats 5] [--baseline REV]

Writes the records as JSON lines, parquet, CSV and a `datasets` folder in a temporary folder, then times
load_alpaca_data on each (the best of --repeats, in this process, after one warm-up read so the files are in the page
cache and the libraries imported) and checks that each gives the JSON file's records. --baseline REV also times the
JSON and JSON-lines reads of data_files.py as it was at git revision REV (e.g. the commit before the formats), in the
same run.
"""

import argparse
import csv
import gc
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alpaca_lib import data_files  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def best_time(load, path, repeats):
    load(path)  # warm-up: page cache, imports
    times = []
    for _ in range(repeats):
        gc.collect()  # the previous read's garbage is not this one's cost
        start = time.perf_counter()
        load(path)
        times.append(time.perf_counter() - start)
    return min(times)


def module_at(revision):
    """data_files.py as it was at a git revision, imported under another name."""
    source = subprocess.run(["git", "show", f"{revision}:alpaca_lib/data_files.py"], cwd=REPO_ROOT, check=True,
                            capture_output=True, text=True).stdout
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "data_files_baseline.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("data_files_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", default=os.path.join(REPO_ROOT, "..", "shared", "data", "alpaca_data.json"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", default=None, help="git revision whose JSON / JSON-lines reader to time too")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the 28 empty outputs, once per read

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = data_files.load_alpaca_data(args.data_path)
    with tempfile.TemporaryDirectory() as folder:
        paths = {"JSON (the original file)": args.data_path, "JSON lines": os.path.join(folder, "d.jsonl"),
                 "parquet": os.path.join(folder, "d.parquet"), "CSV": os.path.join(folder, "d.csv"),
                 "datasets folder": os.path.join(folder, "saved")}
        data_files.write_jsonl(records, paths["JSON lines"])
        pq.write_table(pa.Table.from_pylist(records), paths["parquet"])
        datasets.Dataset.from_list(records).to_pandas().to_csv(paths["CSV"], index=False, quoting=csv.QUOTE_ALL)
        datasets.Dataset.from_list(records).save_to_disk(paths["datasets folder"])

        print(f"{len(records)} records; best of {args.repeats} (seconds):")
        for kind, path in paths.items():
            assert data_files.load_alpaca_data(path) == records, kind
            seconds = best_time(data_files.load_alpaca_data, path, args.repeats)
            size = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names
                       ) if os.path.isdir(path) else os.path.getsize(path)
            print(f"  {kind:<24} {seconds:6.3f}  ({size / 1e6:.1f} MB), identical records")
        if args.baseline:
            # Interleaved, one read of each in turn, so that a change of load on a shared machine hits both alike.
            baseline = module_at(args.baseline)
            print(f"against data_files.py at {args.baseline}, interleaved, best of {args.repeats}:")
            for kind in ("JSON (the original file)", "JSON lines"):
                assert baseline.load_alpaca_data(paths[kind]) == records
                times = {"now": [], args.baseline: []}
                for _ in range(args.repeats):
                    for name, module in (("now", data_files), (args.baseline, baseline)):
                        times[name].append(best_time(module.load_alpaca_data, paths[kind], 1))
                print(f"  {kind:<24} now {min(times['now']):6.3f}, at {args.baseline} "
                      f"{min(times[args.baseline]):6.3f}")


if __name__ == "__main__":
    main()
