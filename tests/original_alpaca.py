"""The original Alpaca novelty filter, as a reference for tests and benchmarks (not used by the project's code).

This is the original generate_instruction.py loop, verbatim except that Pool.map became a list comprehension (same
order): rouge_score's tokenizer once per instruction, rouge_scorer._score_lcs(new, old).fmeasure against every known
instruction, np.argsort for the ten most similar, np.mean, reject when max > threshold, and a kept instruction joins
the pool at once.
"""

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
