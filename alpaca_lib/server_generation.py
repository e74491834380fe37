"""Answers from an OpenAI-compatible server (inference.py --api_base): a file's prompts sent concurrently, one request
each, the output file written as the answers come; a refused prompt is left out, a failed one skipped (a rerun fills
it in), and too many failures in a row stop the run.
"""

import asyncio
import sys

import tqdm

from alpaca_lib import api_client
from alpaca_lib.decoding import InferenceError, clean_output

# Requests in a row that fail after all their retries before the run stops.
MAX_FAILURES_IN_A_ROW = 8


class _RecordFailed(Exception):
    """The request for record `index` failed (`error`: api_client.RequestFailed or RequestRefused)."""

    def __init__(self, index, error):
        super().__init__(str(error))
        self.index, self.error = index, error


async def answer_with_server(api, output, prompts, params, batch_size):
    """Send each prompt of `prompts` ({record index: a completion prompt, or a list of chat messages sent to
    /v1/chat/completions}, the records missing from `output`; one request each,
    `api.concurrency` in flight) with the completion `params`; write the file after every `batch_size` answers and
    when stopped. Returns (the number of prompts whose request failed after its retries, {record index:
    api_client.RequestRefused} for those the server refused: they can never succeed as they are)."""
    bar = tqdm.tqdm(total=len(output.instructions), initial=len(output), unit="prompt", dynamic_ncols=True)
    api.log = lambda text: bar.write(text, file=sys.stderr)

    async def ask(index):
        try:
            if isinstance(prompts[index], list):  # chat messages: the server renders them with its chat template
                reply, _ = await api.chat(prompts[index], label=f"record {index}", **params)
                return index, reply
            replies, _ = await api.complete([prompts[index]], label=f"record {index}", **params)
        except api_client.RequestFailed as e:
            raise _RecordFailed(index, e) from None
        return index, replies[0]

    refused = {}
    failed = failures_in_a_row = unwritten = 0
    async with api:
        await api.check_connection()
        bar.write(f"Answering with {params['model']} at {api.url}, up to {api.concurrency} requests in flight",
                  file=sys.stderr)
        try:
            async with api.requests_in_flight(ask(index) for index in prompts) as requests:
                for request in asyncio.as_completed(requests):
                    try:
                        index, reply = await request
                    except _RecordFailed as e:
                        if isinstance(e.error, api_client.RequestRefused):  # this record's failure, not the server's
                            refused[e.index] = e.error
                            bar.write(f"warning: {e.error}; left out", file=sys.stderr)
                            continue
                        failed += 1
                        failures_in_a_row += 1
                        bar.write(f"warning: record {e.index}: failed after all retries ({e.error}); its prompt is "
                                  "skipped", file=sys.stderr)
                        if failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                            raise InferenceError(f"{failures_in_a_row} requests in a row failed after all retries "
                                                 f"(last: record {e.index}: {e.error}). {output.where()}") from None
                        continue
                    failures_in_a_row = 0
                    output.add(index, clean_output(reply.text if reply is not None else ""))
                    unwritten += 1
                    bar.update(1)
                    if unwritten >= batch_size:
                        output.write()
                        unwritten = 0
        finally:
            bar.close()
            output.write()
    return failed, refused


def refusals_note(refused):
    """What the last line says of the records the server refused: how many, for which reasons, which records."""
    if not refused:
        return ""
    reasons = [error.reason for error in refused.values()]
    counts = ", ".join(f"{reason}: {reasons.count(reason)}" for reason in sorted(set(reasons)))
    records = ", ".join(map(str, sorted(refused)))
    return f"; {len(refused)} left out, refused by the server ({counts}): records {records}"
