"""The original Alpaca novelty filter and reply parser, as references for tests and benchmarks (not used by the
project's code).

original_novelty_filter is the original generate_instruction.py loop, verbatim except that Pool.map became a list
comprehension (same order): rouge_score's tokenizer once per instruction, rouge_scorer._score_lcs(new, old).fmeasure
against every known instruction, np.argsort for the ten most similar, np.mean, reject when max > threshold, and a kept
instruction joins the pool at once.

original_post_process restates the original post_process_gpt3_response rule by rule, so that the new parser can be
checked side by side against it.
"""

import re
import string

import numpy as np
from rouge_score import rouge_scorer


def original_novelty_filter(pool_instructions, candidates, threshold=0.7):
    """For each candidate in order: None (rejected) or its two fields (kept). The pool grows with every kept one."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    all_instructions = list(pool_instructions)
    all_instruction_tokens = [scorer._tokenizer.tokenize(inst) for inst in all_instructions]
    results = []
    for instruction in candidates:
        new_instruction_tokens = scorer._tokenizer.tokenize(instruction)
        rouge_scores = [rouge_scorer._score_lcs(new_instruction_tokens, tokens) for tokens in all_instruction_tokens]
        rouge_scores = [score.fmeasure for score in rouge_scores]
        most_similar_instructions = {
            all_instructions[i]: rouge_scores[i] for i in np.argsort(rouge_scores)[-10:][::-1]
        }
        if max(rouge_scores) > threshold:
            results.append(None)
            continue
        results.append({"most_similar_instructions": most_similar_instructions,
                        "avg_similarity_score": float(np.mean(rouge_scores))})
        all_instructions.append(instruction)
        all_instruction_tokens.append(new_instruction_tokens)
    return results


ORIGINAL_BLACKLIST = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                      "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram"]


def original_post_process(num_prompt_instructions, response):
    """The original parsing of one reply ({"text", "finish_reason"} or None), rule by rule.

    The "{n+1}. Instruction:" header the prompt ended with goes back in front, and the text is cut at every "###".
    Piece k (from 0) belongs to task n+1+k and must split on "{n+1+k}. Instruction|Input|Output:" (anywhere, with at
    least one whitespace after the dot) into exactly 7 parts: parts 2, 4 and 6, stripped, are the instruction, input
    ("<noinput>" in any case becomes "") and output. The last piece is skipped when the reply stopped for length.
    Dropped: 3 words or fewer, more than 150, a blacklisted word (whole word, any case), "Write a program" at the
    start, a first character that is ASCII punctuation or not ASCII.
    """
    if response is None:
        return []
    pieces = (f"{num_prompt_instructions + 1}. Instruction:" + response["text"]).split("###")
    tasks = []
    for position, piece in enumerate(pieces):
        if position == len(pieces) - 1 and response["finish_reason"] == "length":
            continue
        parts = re.split(rf"{num_prompt_instructions + 1 + position}\.\s+(Instruction|Input|Output):", piece)
        if len(parts) != 7:
            continue
        instruction, task_input, output = parts[2].strip(), parts[4].strip(), parts[6].strip()
        task_input = "" if task_input.lower() == "<noinput>" else task_input
        num_words = len(instruction.split())
        if num_words <= 3 or num_words > 150:
            continue
        if any(re.search(rf"\b({word})\b", instruction, flags=re.IGNORECASE) for word in ORIGINAL_BLACKLIST):
            continue
        if instruction.startswith("Write a program") or instruction[0] in string.punctuation:
            continue
        if not instruction[0].isascii():
            continue
        tasks.append({"instruction": instruction, "input": task_input, "output": output})
    return tasks
