"""Prompt formats of training and inference: the Alpaca prompt, or the model's own chat template.

  * PROMPT_FORMATS: "alpaca" (the original's PROMPT_DICT prompt) or "chat_template" (tokenizer.apply_chat_template);
  * user_content / conversation: an Alpaca record as a chat, a user turn (USER_CONTENT_RULE) and an assistant turn;
  * load_training_records / check_conversations: a data file of Alpaca records or of conversations (`messages`),
    checked, each error naming file, record and field;
  * tokenize_conversations: ids and labels of conversations, a loss on every assistant turn (its content and the
    end-of-turn token(s) the template writes after it) and nothing else; merges and dropped rows counted;
  * alpaca_chat_template / save_prompt_format / read_prompt_format: a saved folder says how it was trained (a
    prompt_format.json file) and, for the Alpaca format, carries a chat template that renders exactly the Alpaca prompt.

Peers: TRL's `assistant_only_loss`, axolotl's `roles_to_train: [assistant]`, LLaMA-Factory's `template`.
"""

import json
import logging
import os

import jinja2

from alpaca_lib import cli, data_files, tokenization
from alpaca_lib.cli import UsageError
from alpaca_lib.data_files import AlpacaDataError

logger = logging.getLogger(__name__)

PROMPT_FORMATS = ("alpaca", "chat_template")
ROLES = ("system", "user", "assistant")
# The file a saved folder records its prompt format in; a folder without it was trained with the Alpaca prompt.
FORMAT_FILE = "prompt_format.json"
# An Alpaca record's user turn: the instruction, then a blank line and the input when there is one (the same fold as
# AlpacaEval's and most instruction-to-chat conversions).
USER_CONTENT_RULE = "{instruction}\n\n{input}"
IGNORE_INDEX = -100  # utils.IGNORE_INDEX (the package does not import utils)
PROGRESS_FROM = 4096  # conversations: fewer render and tokenize in a few seconds, without a progress bar


class ChatTemplateError(UsageError):
    """A model without a chat template asked for one, or a template that cannot be used to find the assistant turns."""


# ----------------------------------------------------------------------------------------------------------------------
# Records as conversations


def user_content(instruction, task_input=""):
    """The user turn of an Alpaca record under --prompt_format chat_template (USER_CONTENT_RULE)."""
    return USER_CONTENT_RULE.format(instruction=instruction, input=task_input) if task_input else instruction


def conversation(record):
    """The messages of a record: its own `messages`, or an Alpaca record as a user turn and an assistant turn."""
    if "messages" in record:
        return record["messages"]
    return [{"role": "user", "content": user_content(record["instruction"], record.get("input") or "")},
            {"role": "assistant", "content": record["output"]}]


def check_conversations(path, records):
    """Check records holding `messages`: [{"role": system|user|assistant, "content": str}, ...] with at least one
    assistant turn (extra keys are ignored). Raises AlpacaDataError naming file, record and field; returns records."""
    if not records:
        raise AlpacaDataError(f"{path}: holds no records; nothing to train on")
    first_conversation = next(i for i, r in enumerate(records) if isinstance(r, dict) and "messages" in r)
    for index, record in enumerate(records):
        where = f"{path}: record {index}"
        if not isinstance(record, dict):
            raise AlpacaDataError(f"{where}: is {type(record).__name__}; expected an object")
        if "messages" not in record:
            raise AlpacaDataError(f"{where}: has no 'messages' but record {first_conversation} has: a file holds "
                                  "conversations or Alpaca records (instruction, input, output), not both")
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise AlpacaDataError(f"{where}: field 'messages' is {type(messages).__name__}"
                                  f"{' (empty)' if messages == [] else ''}; expected a list of "
                                  "{\"role\", \"content\"} objects")
        for turn, message in enumerate(messages):
            field = f"{where}: messages[{turn}]"
            if not isinstance(message, dict):
                raise AlpacaDataError(f"{field}: is {type(message).__name__}; expected an object with role and content")
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise AlpacaDataError(f"{field}: role {role!r} is not one of {', '.join(ROLES)}")
            if "content" not in message:  # (parquet gives a message every key: a null there is absent too)
                raise AlpacaDataError(f"{field}: missing field 'content'")
            if not isinstance(content, str):
                kind = "null" if content is None else type(content).__name__
                raise AlpacaDataError(f"{field}: field 'content' is {kind}; expected a string")
        if not any(message["role"] == "assistant" for message in messages):
            raise AlpacaDataError(f"{where}: field 'messages' has no assistant turn; nothing to learn")
    return records


def holds_conversations(records):
    return any(isinstance(record, dict) and "messages" in record for record in records)


def load_training_records(path, prompt_format=None, load_alpaca=data_files.load_training_data):
    """(records, prompt format) of a training file: Alpaca records (read by `load_alpaca`), or conversations
    (`messages`, checked by check_conversations), which imply "chat_template". prompt_format None: "alpaca" for
    Alpaca records. Raises AlpacaDataError (a bad record, a file mixing both kinds, conversations with "alpaca")."""
    try:
        return load_alpaca(path), prompt_format or "alpaca"
    except AlpacaDataError as alpaca_error:
        records = data_files.load_alpaca_data(path, required_fields=())  # the same error for an unreadable file
        if not holds_conversations(records):
            raise alpaca_error from None
    if prompt_format == "alpaca":
        raise AlpacaDataError(f"{path}: holds conversations ('messages'), which train through the model's chat "
                              "template: drop --prompt_format alpaca (or pass chat_template)")
    return check_conversations(path, records), "chat_template"


# ----------------------------------------------------------------------------------------------------------------------
# Conversations to ids and labels


def check_chat_template(tokenizer, where):
    """ChatTemplateError (one line) when the tokenizer has no chat template; `where` names the model."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(f"{where}: the tokenizer has no chat template, so --prompt_format chat_template (or "
                                "a file of conversations) cannot render its records; use --prompt_format alpaca or an "
                                "instruct model")


def render(tokenizer, messages, add_generation_prompt=False):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def prompt_ids(tokenizer, messages):
    """The ids a chat model is prompted with: `messages` rendered with the generation prompt, tokenized as
    apply_chat_template tokenizes (the template writes the BOS itself): exactly the start of a training row."""
    # verbose=False: a row past model_max_length is counted and dropped by the caller, not warned about per row
    return tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False,
                     verbose=False)["input_ids"]


def special_tokens(tokenizer):
    """The texts of the tokenizer's special tokens (bos, eos, ... and added special tokens such as <|im_start|>)."""
    return tuple(dict.fromkeys([token for token in tokenizer.all_special_tokens if token] + [
        token.content for token in tokenizer.added_tokens_decoder.values() if token.special]))


def assistant_spans(tokenizer, messages, index=None, specials=None):
    """[(text before the turn, text through the turn's end-of-turn token)] for each assistant turn of `messages`, and
    the whole rendered text. The text before is messages[:i] with the generation prompt; the text through is
    messages[:i+1], less the whitespace the template writes after the turn's last special token (ChatML's newline
    after <|im_end|>: never generated, as generation stops at that token). ChatTemplateError when the template renders
    a turn differently once later turns follow (its tokens cannot be found then)."""
    text = render(tokenizer, messages)
    specials = special_tokens(tokenizer) if specials is None else specials
    spans = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:turn], add_generation_prompt=True)
        through = render(tokenizer, messages[:turn + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise ChatTemplateError(f"record {index}: messages[{turn}]: the chat template renders this assistant "
                                    "turn differently once later turns follow (or without the generation prompt), so "
                                    "its tokens cannot be found")
        stripped = through.rstrip()
        if stripped != through and stripped.endswith(specials) and len(stripped) > len(before):
            through = stripped
        spans.append((before, through))
    return spans, text


def tokenize_conversations(tokenizer, conversations, max_length=None):
    """ids and labels of each conversation through the tokenizer's chat template: labels are IGNORE_INDEX except on
    every assistant turn's tokens and its end-of-turn token(s) (assistant_spans). Rows are cut to their first
    max_length ids; a row left with no label is dropped and counted in a warning.

    A turn's labels start after as many ids as the text before it has alone (the Alpaca path's rule), so where the
    template's last token before the content merges with the content's first, that merged token carries no loss; such
    rows are counted in a warning. Returns (input_ids, labels): lists of lists of ints.
    """
    from tqdm import tqdm

    input_ids, labels, dropped, merged = [], [], [], []
    specials = special_tokens(tokenizer)
    quiet = os.environ.get("LOCAL_RANK", "0") != "0" or len(conversations) <= PROGRESS_FROM
    for index, messages in enumerate(tqdm(conversations, desc="Rendering and tokenizing", unit="example",
                                          disable=quiet, mininterval=1)):
        try:
            spans, text = assistant_spans(tokenizer, messages, index, specials)
        except jinja2.TemplateError as e:  # e.g. a template that raises on a system turn or roles out of order
            raise ChatTemplateError(f"record {index}: the chat template refuses it: {cli.first_line(e)}") from None
        texts = [text] + [piece for span in spans for piece in span]
        ids, *pieces = tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                                 verbose=False)["input_ids"]  # rows too long are counted and dropped below
        label = [IGNORE_INDEX] * len(ids)
        for before_ids, through_ids in zip(pieces[::2], pieces[1::2]):
            start, end = len(before_ids), len(through_ids)
            if ids[:start] != before_ids or ids[:end] != through_ids:
                merged.append(index)
            label[start:end] = ids[start:end]
        if max_length is not None:
            ids, label = ids[:max_length], label[:max_length]
        if all(token == IGNORE_INDEX for token in label):
            dropped.append(index)
            continue
        input_ids.append(ids)
        labels.append(label)
    merged = sorted(set(merged))
    if dropped:
        logger.warning("Dropped %d of %d examples whose assistant turns all lie past model_max_length=%s (no "
                       "response token left to learn); first indices: %s", len(dropped), len(conversations),
                       max_length, dropped[:10])
    if merged:
        logger.warning("%d of %d examples: the chat template's text before an assistant turn merges with the turn's "
                       "first token when tokenized together; as on the Alpaca path, the count of the text before is "
                       "masked, so that merged token carries no loss; first indices: %s", len(merged),
                       len(conversations), merged[:10])
    return input_ids, labels


# ----------------------------------------------------------------------------------------------------------------------
# Saved folders: the prompt format, and the Alpaca prompt as a chat template


def _jinja_string(text):
    """`text` as a Jinja string literal (JSON's escapes are Jinja's: \\n, \\", \\uXXXX)."""
    return json.dumps(text)


def _filled(template, fields):
    """A PROMPT_DICT template as a Jinja expression: its {field}s replaced by the Jinja expressions of `fields`."""
    parts, rest = [], template
    while rest:
        positions = [(rest.find("{" + name + "}"), name) for name in fields if "{" + name + "}" in rest]
        if not positions:
            parts.append(_jinja_string(rest))
            break
        position, name = min(positions)
        if position:
            parts.append(_jinja_string(rest[:position]))
        parts.append(fields[name])
        rest = rest[position + len(name) + 2:]
    return " + ".join(parts)


def _leading_text(tokenizer):
    """The text a chat template must start with so that its ids start as a training row does: the tokens the
    tokenizer puts before a text (BOS), and a space after them where the tokenizer would otherwise lose the first
    word's prefix space (sentencepiece LLaMA: "<s>Below" is not "<s>" + "▁Below")."""
    leading = tokenization.leading_special_tokens(tokenizer)
    text = "".join(tokenizer.convert_ids_to_tokens(leading))
    probe = "Below is an instruction."
    expected = tokenization.prompt_token_ids(tokenizer, [probe])[0]
    for candidate in (text, text + " "):
        if tokenizer(candidate + probe, add_special_tokens=False)["input_ids"] == expected:
            return candidate
    raise ChatTemplateError(f"{type(tokenizer).__name__}: no text before a prompt renders the ids the tokenizer puts "
                            f"before it ({leading}); cannot write an Alpaca chat template")


def alpaca_chat_template(tokenizer, prompt_dict):
    """A Jinja chat template that renders exactly the Alpaca prompt of training (`prompt_dict`: utils.PROMPT_DICT):

      * the BOS as the tokenizer puts it before a text (_leading_text), once, at the start;
      * a user turn: the no-input prompt with its content as the instruction; a user message with an `input` key
        ({"role": "user", "content": instruction, "input": input}) gets the input prompt;
      * an assistant turn: its content, then the EOS, as trained; the generation prompt adds nothing (the Alpaca prompt
        ends with "### Response:"); system turns are not rendered (the Alpaca prompt has its own preamble).

    So apply_chat_template([user], add_generation_prompt=True) gives the training row's prompt ids, and with the
    assistant turn the whole training row's ids (tests/test_chat_format.py checks both on every tokenizer family)."""
    instruction, task_input = "message['content']", "message['input']"
    with_input = _filled(prompt_dict["prompt_input"], {"instruction": instruction, "input": task_input})
    no_input = _filled(prompt_dict["prompt_no_input"], {"instruction": instruction})
    return ("{{- " + _jinja_string(_leading_text(tokenizer)) + " -}}"
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}"
            "{%- if message['input'] is defined and message['input'] -%}{{- " + with_input + " -}}"
            "{%- else -%}{{- " + no_input + " -}}{%- endif -%}"
            "{%- elif message['role'] == 'assistant' -%}"
            "{{- message['content'] + " + _jinja_string(tokenizer.eos_token or "") + " -}}"
            "{%- endif -%}"
            "{%- endfor -%}")


def set_saved_template(tokenizer, prompt_format, prompt_dict):
    """Before a tokenizer is saved: under the Alpaca format its chat template becomes alpaca_chat_template (a base's
    own template would build a prompt the model was not trained on); under chat_template it keeps its own. A
    tokenizer whose BOS no text renders is saved without a template, with a warning: training goes on."""
    if prompt_format in (None, "alpaca"):
        try:
            tokenizer.chat_template = alpaca_chat_template(tokenizer, prompt_dict)
        except ChatTemplateError as e:
            logger.warning("%s; the model is saved without a chat template", e)
            tokenizer.chat_template = None


def save_prompt_format(folder, prompt_format):
    """Write FORMAT_FILE into a saved model, adapter or checkpoint folder (atomically)."""
    data_files.jdump({"prompt_format": prompt_format or "alpaca"}, os.path.join(folder, FORMAT_FILE))


def check_resume(checkpoint, prompt_format):
    """ChatTemplateError when the checkpoint to resume was trained in another prompt format (its FORMAT_FILE; a
    checkpoint without one was trained with the Alpaca prompt): its steps and the rest would train two formats."""
    saved = read_prompt_format(checkpoint)
    if saved != (prompt_format or "alpaca"):
        raise ChatTemplateError(f"--resume_from_checkpoint {checkpoint}: prompt format {prompt_format or 'alpaca'}, "
                                f"but the checkpoint was trained with {saved} (its {FORMAT_FILE}): pass "
                                f"--prompt_format {saved} to resume it, with data in that format")


def read_prompt_format(name_or_path):
    """The prompt format a model folder (or LoRA adapter folder, or hub id) was trained with: its FORMAT_FILE's, or
    "alpaca" without one (the original's folders, and base models). ChatTemplateError for a file with another value."""
    from transformers.utils import cached_file

    path = cached_file(str(name_or_path), FORMAT_FILE, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)
    if path is None:
        return "alpaca"
    try:
        with open(path, encoding="utf-8") as f:
            prompt_format = json.load(f).get("prompt_format")
    except (OSError, ValueError, AttributeError):
        prompt_format = None
    if prompt_format not in PROMPT_FORMATS:
        raise ChatTemplateError(f"{path}: prompt_format should be one of {', '.join(PROMPT_FORMATS)}")
    return prompt_format
