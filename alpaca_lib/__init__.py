"""The machinery beneath the entry scripts at the repository root; each module is named for what it holds.

  cli                 the command line of every script: flags checked first, --help, one-line errors
  errors              UserError, the one type every user-facing error derives from
  data_files          Alpaca-format records and files: atomic writes, JSON / JSON lines, the data loader
  tokenization        tokenizer and vocabulary rules shared by training, inference and the weight diff
  api_client          talking to OpenAI-compatible servers: checks, retries shown, usage, cost, budget
  novelty_filter      the exact ROUGE-L novelty filter of stage 1 and `deduplicate`
  lora                LoRA / QLoRA adapters for train.py (peft, bitsandbytes)
  legacy_flags        the original README's transformers-4 flags, rewritten for transformers 5
  hardware            fitting a training run to the machine: GPU-less fallbacks, DDP over gloo, FSDP, DeepSpeed
  checkpoint_tensors  checkpoint tensors streamed through memory allocated once (weight_diff.py)
  legacy_checkpoints  the 2023 naive integrity sum of weight_diff.py (transformers 4.28's key order, inv_freq)
  weight_diff_format  the weight diff: tensor-pair plan (mean rows), streamed pass, ulp corrections, manifest
  eval_files          evaluation files: instruction sets in, AlpacaEval-format outputs out (resumable)

Nothing here imports an entry script (train.py, generate_instruction.py, ...) or utils.py.
"""
