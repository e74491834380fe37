"""Chat templates in and out: --prompt_format chat_template and conversation files train through the model's own
template with a loss on the assistant turns only (ids and labels checked id for id on every fixture family with a
template, and on the real SmolLM2); a saved folder records its format, and an Alpaca-trained one carries a chat
template that renders exactly the training prompt on every family."""

import json
import logging
import pytest
import transformers

from alpaca_lib import chat_format, tokenization
from alpaca_lib.chat_format import ChatTemplateError
from alpaca_lib.data_files import AlpacaDataError
import utils
from utils import IGNORE_INDEX
from conftest import REAL_TOKENIZER_MATRIX, TOKENIZER_MATRIX, _byte_level_bpe
import train
from test_train import base_argv, load_tokenizer, records_without_merges, sources_and_targets

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py says why

# The families with a chat template, the text of their end of turn, and the tokens the template writes after it
# (ChatML's newline after <|im_end|>), which carry no loss.
CHAT_FAMILIES = {"llama3": ("<|eot_id|>", 0), "qwen": ("<|im_end|>", 1), "smollm2": ("<|im_end|>", 1)}
CONVERSATION = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of Australia?"},
    {"role": "assistant", "content": "Canberra."},
    {"role": "user", "content": "Translate the sentence into French.\n\nThe library opens at nine."},
    {"role": "assistant", "content": "La bibliothèque ouvre à neuf heures."},
]


def chat_ids(tokenizer, messages, add_generation_prompt=False):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)["input_ids"]


def labelled_runs(labels):
    """The runs of consecutive labelled positions: [(start, end)]."""
    runs, start = [], None
    for position, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = position
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, position))
            start = None
    return runs


# ----------------------------------------------------------------------------------------------------------------------
# Training rows: id for id


@pytest.mark.parametrize("name", [n for n in TOKENIZER_MATRIX + REAL_TOKENIZER_MATRIX if n in CHAT_FAMILIES])
def test_alpaca_records_through_the_chat_template_id_for_id(name, tokenizer_matrix):
    """ids = apply_chat_template([user, assistant]); labels = the ids after the generation prompt's, up to and with
    the end-of-turn token, nothing else; the user turn is the instruction, a blank line, the input."""
    tokenizer = load_tokenizer(tokenizer_matrix[name])
    end_of_turn, after_end = CHAT_FAMILIES[name]
    records = records_without_merges()
    rows = train.preprocess_conversations(records, tokenizer)
    assert len(rows["input_ids"]) == len(records)
    for record, ids, labels in zip(records, rows["input_ids"], rows["labels"]):
        user = record["instruction"] + ("\n\n" + record["input"] if record.get("input") else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
        assert chat_format.conversation(record) == messages
        prompt, full = chat_ids(tokenizer, messages[:1], add_generation_prompt=True), chat_ids(tokenizer, messages)
        assert full[:len(prompt)] == prompt  # no merge at the boundary in these records
        end = len(full) - after_end
        assert ids.tolist() == full
        assert labels.tolist() == [IGNORE_INDEX] * len(prompt) + full[len(prompt):end] + [IGNORE_INDEX] * after_end
        assert tokenizer.decode(full[len(prompt):end]) == record["output"] + end_of_turn
        assert chat_format.prompt_ids(tokenizer, messages[:1]) == prompt  # what inference.py feeds


@pytest.mark.parametrize("name", [n for n in TOKENIZER_MATRIX + REAL_TOKENIZER_MATRIX if n in CHAT_FAMILIES])
def test_conversations_learn_every_assistant_turn_and_nothing_else(name, tokenizer_matrix):
    tokenizer = load_tokenizer(tokenizer_matrix[name])
    end_of_turn, after_end = CHAT_FAMILIES[name]
    rows = train.preprocess_conversations([{"messages": CONVERSATION}], tokenizer)
    ids, labels = rows["input_ids"][0].tolist(), rows["labels"][0].tolist()
    assert ids == chat_ids(tokenizer, CONVERSATION)
    runs = labelled_runs(labels)
    assistant_turns = [i for i, m in enumerate(CONVERSATION) if m["role"] == "assistant"]
    assert len(runs) == len(assistant_turns) == 2
    for (start, end), turn in zip(runs, assistant_turns):
        assert start == len(chat_ids(tokenizer, CONVERSATION[:turn], add_generation_prompt=True))
        assert end == len(chat_ids(tokenizer, CONVERSATION[:turn + 1])) - after_end
        assert labels[start:end] == ids[start:end]
        assert tokenizer.decode(ids[start:end]) == CONVERSATION[turn]["content"] + end_of_turn


def test_template_merges_are_counted_and_rows_past_the_length_dropped(caplog):
    """A BPE that learned ':"' joins the template's "Assistant:" to an answer starting with '"': the count of the text
    before is masked (the Alpaca rule), the rows counted; rows whose answer lies past model_max_length are dropped."""
    from transformers import PreTrainedTokenizerFast

    backend = _byte_level_bpe(first_specials=["</s>", "<pad>"], extra_lines=['Assistant:"quoted"'] * 50)
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\nAssistant:"
                "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>",
                                        chat_template=template, model_max_length=512)
    records = [{"instruction": "Quote a proverb.", "input": "", "output": '"Haste makes waste."'},
               {"instruction": "Name a colour.", "input": "", "output": "Red."},
               {"instruction": "Quote a film.", "input": "", "output": '"Here\'s looking at you."'}]
    with caplog.at_level(logging.WARNING):
        rows = train.preprocess_conversations(records, tokenizer)
    assert "2 of 3 examples: the chat template's text before an assistant turn merges" in caplog.text
    assert "first indices: [0, 2]" in caplog.text
    for record, ids, labels in zip(records, rows["input_ids"], rows["labels"]):
        before = tokenizer(f"User: {record['instruction']}\nAssistant:", add_special_tokens=False)["input_ids"]
        assert ids.tolist() == chat_ids(tokenizer, chat_format.conversation(record))
        assert labels.tolist() == [IGNORE_INDEX] * len(before) + ids.tolist()[len(before):]

    caplog.clear()
    tokenizer.model_max_length = len(rows["input_ids"][1]) - 3  # record 1 keeps a cut answer; 0 and 2 lose it all
    long = [dict(r, instruction=r["instruction"] + " Please.") for r in records[:1]] + records
    transformers_warnings = caplog.handler  # transformers' loggers do not propagate: listen to them directly
    logging.getLogger("transformers").addHandler(transformers_warnings)
    try:
        with caplog.at_level(logging.WARNING):
            cut = train.preprocess_conversations(long, tokenizer)
    finally:
        logging.getLogger("transformers").removeHandler(transformers_warnings)
    # the rows past the length are counted below, not each warned about by the tokenizer ("... will result in
    # indexing errors", which they never reach: they are cut or dropped)
    assert "Token indices sequence length" not in caplog.text
    assert [len(ids) for ids in cut["input_ids"]] == [tokenizer.model_max_length] * len(cut["input_ids"])
    kept = [i for i, r in enumerate(long)
            if len(tokenizer(f"User: {r['instruction']}\nAssistant:", add_special_tokens=False)["input_ids"])
            < tokenizer.model_max_length]
    assert len(cut["input_ids"]) == len(kept) < len(long)
    assert f"Dropped {len(long) - len(kept)} of {len(long)} examples whose assistant turns all lie past" in caplog.text


# ----------------------------------------------------------------------------------------------------------------------
# Files of conversations, and their errors


@pytest.mark.parametrize("records, message", [
    ([{"messages": [{"role": "bot", "content": "hi"}]}], "record 0: messages[0]: role 'bot' is not one of system, "
                                                         "user, assistant"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]}],
     "record 0: messages[1]: field 'content' is int; expected a string"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}],
     "record 0: messages[1]: missing field 'content'"),
    ([{"messages": [{"role": "user", "content": "a"}]}], "record 0: field 'messages' has no assistant turn"),
    ([{"messages": []}], "record 0: field 'messages' is list (empty); expected a list"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
      {"instruction": "a", "input": "", "output": "b"}],
     "record 1: has no 'messages' but record 0 has: a file holds conversations or Alpaca records"),
    ([{"messages": "hi"}], "record 0: field 'messages' is str; expected a list"),
    ([{"instruction": "a", "output": "b"}, {"messages": "hi"}], "record 0: has no 'messages' but record 1 has"),
])
def test_a_bad_conversation_file_names_file_record_and_field(tmp_path, records, message):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    with pytest.raises(AlpacaDataError) as raised:
        chat_format.load_training_records(str(path))
    assert str(raised.value).startswith(f"{path}: {message}")


def test_a_conversations_file_where_instructions_are_read_says_what_it_is(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello"}]}))
    with pytest.raises(AlpacaDataError, match=r"record 0: missing field 'instruction' \(a file of conversations: only "
                                              r"train.py and validate read those\)"):
        utils.load_alpaca_data(path, required_fields=("instruction",))


def test_conversations_imply_the_chat_template_and_refuse_alpaca(tmp_path, capsys):
    path = tmp_path / "chat.json"
    utils.jdump([{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}], path)
    records, prompt_format = chat_format.load_training_records(str(path))
    assert prompt_format == "chat_template" and len(records) == 2
    assert chat_format.load_training_records(str(path), "chat_template")[1] == "chat_template"
    with pytest.raises(AlpacaDataError, match="holds conversations .* drop --prompt_format alpaca"):
        chat_format.load_training_records(str(path), "alpaca")
    utils.validate(str(path))
    assert capsys.readouterr().out.strip() == f"{path}: 2 conversations, 3 assistant turns, 1 with a system turn"


def test_a_model_without_a_chat_template_is_one_line_before_it_loads(tmp_path, tokenizer_matrix, alpaca_sample_path,
                                                                    capsys, monkeypatch):
    monkeypatch.setattr(train, "load_model", lambda *args: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exited:
        train.main(base_argv(tokenizer_matrix["llama1"], alpaca_sample_path, tmp_path / "out", "--prompt_format",
                             "chat_template"))
    stderr = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"train.py: error: --model_name_or_path {tokenizer_matrix['llama1']}: the tokenizer has no chat template, so "
        "--prompt_format chat_template (or a file of conversations) cannot render its records; use --prompt_format "
        "alpaca or an instruct model")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Saved folders: the Alpaca prompt as a chat template


@pytest.mark.parametrize("name", TOKENIZER_MATRIX + REAL_TOKENIZER_MATRIX)
def test_the_saved_alpaca_chat_template_renders_the_training_row_id_for_id(name, tokenizer_matrix, tmp_path):
    """apply_chat_template([user], add_generation_prompt=True) is the training row's prompt part; with the assistant
    turn, the whole training row (the output and one EOS); after save_pretrained and a reload too."""
    tokenizer = load_tokenizer(tokenizer_matrix[name])
    chat_format.set_saved_template(tokenizer, "alpaca", utils.PROMPT_DICT)
    tokenizer.save_pretrained(tmp_path)
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    records = records_without_merges()
    sources, targets = sources_and_targets(records, tokenizer)
    rows = train.preprocess(sources, targets, tokenizer)
    for record, ids, labels in zip(records, rows["input_ids"], rows["labels"]):
        user = {"role": "user", "content": record["instruction"]}
        if record.get("input"):
            user["input"] = record["input"]
        messages = [user, {"role": "assistant", "content": record["output"]}]
        prompt = ids[labels == IGNORE_INDEX].tolist()
        assert prompt == tokenization.prompt_token_ids(tokenizer, [utils.format_prompt(record)])[0]
        for saved in (tokenizer, reloaded):
            assert chat_ids(saved, messages[:1], add_generation_prompt=True) == prompt
            assert chat_ids(saved, [{"role": "system", "content": "Be brief."}] + messages[:1],
                            add_generation_prompt=True) == prompt  # a client's system turn changes nothing
            assert chat_ids(saved, messages) == ids.tolist()


def test_training_saves_the_format_and_inference_reads_it(tmp_path, tokenizer_matrix, alpaca_sample_path):
    """chat_template: prompt_format.json in the output folder and in each checkpoint, the base's own template kept;
    alpaca: the Alpaca chat template saved. A folder without the file is alpaca."""
    chat_out, alpaca_out = tmp_path / "chat", tmp_path / "alpaca"
    steps = ("--max_steps", "2", "--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "2")
    train.train(base_argv(tokenizer_matrix["qwen"], alpaca_sample_path, chat_out, "--prompt_format", "chat_template",
                          *steps))
    train.train(base_argv(tokenizer_matrix["qwen"], alpaca_sample_path, alpaca_out, *steps))
    for folder in (chat_out, chat_out / "checkpoint-2"):
        assert json.loads((folder / "prompt_format.json").read_text()) == {"prompt_format": "chat_template"}
        assert chat_format.read_prompt_format(folder) == "chat_template"
    base = transformers.AutoTokenizer.from_pretrained(tokenizer_matrix["qwen"])
    assert transformers.AutoTokenizer.from_pretrained(chat_out).chat_template == base.chat_template
    assert chat_format.read_prompt_format(alpaca_out) == "alpaca"
    saved = transformers.AutoTokenizer.from_pretrained(alpaca_out)
    assert chat_ids(saved, [{"role": "user", "content": "Name a colour."}], add_generation_prompt=True) == \
        tokenization.prompt_token_ids(saved, [utils.format_prompt({"instruction": "Name a colour."})])[0]
    assert chat_format.read_prompt_format(tokenizer_matrix["qwen"]) == "alpaca"  # no file: the original's format
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "prompt_format.json").write_text('{"prompt_format": "vicuna"}')
    with pytest.raises(ChatTemplateError, match="prompt_format should be one of alpaca, chat_template"):
        chat_format.read_prompt_format(tmp_path / "odd")


@pytest.mark.parametrize("prompt_format", ["chat_template", "alpaca"])
def test_a_lora_adapter_and_its_merged_model_carry_the_format(prompt_format, tmp_path, tokenizer_matrix,
                                                              alpaca_sample_path):
    out = tmp_path / "lora"
    train.train(base_argv(tokenizer_matrix["llama3"], alpaca_sample_path, out, "--max_steps", "1", "--lora_r", "2",
                          "--merge_lora", "True", "--prompt_format", prompt_format, "--save_strategy", "no"))
    base_template = transformers.AutoTokenizer.from_pretrained(tokenizer_matrix["llama3"]).chat_template
    for folder in (out, out / "merged"):
        assert chat_format.read_prompt_format(folder) == prompt_format
        template = transformers.AutoTokenizer.from_pretrained(folder).chat_template
        assert (template == base_template) == (prompt_format == "chat_template")
    assert (out / "adapter_config.json").exists()
    merged = transformers.AutoTokenizer.from_pretrained(out / "merged")
    prompt = chat_ids(merged, [{"role": "user", "content": "Name a colour."}], add_generation_prompt=True)
    if prompt_format == "alpaca":
        expected = tokenization.prompt_token_ids(merged, [utils.format_prompt({"instruction": "Name a colour."})])
        assert prompt == expected[0]


def test_help_explains_the_flag():
    parser = transformers.HfArgumentParser((train.ModelArguments, train.DataArguments, train.TrainingArguments))
    text = " ".join(parser.format_help().split())
    assert "--prompt_format {alpaca,chat_template}" in text
    assert "Unset: chat_template for a file of conversations" in text


def test_a_template_that_refuses_a_record_names_file_and_record(tokenizer_matrix, tmp_path):
    """Gemma-style templates raise on a system turn: one line naming the file and the record, not a Jinja traceback."""
    tokenizer = load_tokenizer(tokenizer_matrix["qwen"])
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                               "supported') }}{% endif %}" + tokenizer.chat_template)
    path = tmp_path / "chat.json"
    utils.jdump([{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION}], path)
    with pytest.raises(ChatTemplateError) as raised:
        train.SupervisedDataset(str(path), tokenizer)
    assert str(raised.value) == f"{path}: record 1: the chat template refuses it: System role not supported"
