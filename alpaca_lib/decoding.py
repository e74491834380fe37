"""How inference.py decodes an answer and where the answer ends, for a local model and a server alike.

The answer ends at EOS or where the model starts a new "### Instruction:" (cut off); it is greedy at temperature 0,
else sampled with temperature and top_p.
"""

import dataclasses

from alpaca_lib.errors import UserError

# Where the model starts a new example after its answer: generation stops there and the text is cut before it.
STOP_SEQUENCES = ["### Instruction:"]


class InferenceError(UserError, RuntimeError):
    """A command line, model folder or server that cannot work; the message says what to fix."""


def clean_output(text):
    """The answer in a generated text: up to the first stop sequence, stripped."""
    for stop in STOP_SEQUENCES:
        text = text.split(stop, 1)[0]
    return text.strip()


@dataclasses.dataclass
class Decoding:
    """How answers are decoded: greedy at temperature 0, else sampled with temperature and top_p (no top-k)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None

    def generation_config(self, model, tokenizer):
        config = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
        eos_ids = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        eos_ids = [i for i in dict.fromkeys(eos_ids + [tokenizer.eos_token_id]) if i is not None]
        sampling = self.temperature > 0
        config.update(max_new_tokens=self.max_new_tokens, do_sample=sampling,
                      temperature=self.temperature if sampling else None, top_p=self.top_p if sampling else None,
                      top_k=0 if sampling else None, num_beams=1, eos_token_id=eos_ids,
                      pad_token_id=tokenizer.pad_token_id, stop_strings=STOP_SEQUENCES, max_length=None)
        return config

    def api_params(self, model_name):
        params = dict(model=model_name, max_tokens=self.max_new_tokens, temperature=self.temperature,
                      top_p=self.top_p, stop=STOP_SEQUENCES)
        if self.seed is not None:
            params["seed"] = self.seed
        return params
