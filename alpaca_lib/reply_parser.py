"""Reading a self-instruct reply back into tasks, and the rules a generated task must pass (stage 1).

The prompt (generate_instruction.encode_prompt) lists tasks as "N. Instruction: / N. Input: / N. Output:" separated by
"###" lines, ending with the header of the next task; the model continues the list. parse_reply reads a reply as the
original read it, and also as chat models write it (markdown on the headers, prefaces, code fences, closing remarks).
instruction_rejection_reason holds the original's post-filters.
"""

import collections
import dataclasses
import re
import string

# The prompt asks for a list of 20 tasks; each reply stops before task 20, as in the original. The original's stops,
# "\n20" and "20.", also cut any output that held them ("as of 2020." became "as of 20"): these name only the header
# of task 20 (plain, and as chat models dress it in markdown; "**20. Instruction:**" contains the first).
LAST_TASK_NUMBER = 20
STOP_SEQUENCES = ["20. Instruction", "20. **Instruction"]


# ----------------------------------------------------------------------------------------------------------------------
# Parsing a reply into tasks.
#
# A reply that continues the prompt (it starts with task n+1's instruction, as completion models write it) is read as
# the original read it: cut at its "###" lines, each piece one task, whose headers are "{number}. Instruction:",
# "{number}. Input:" and "{number}. Output:" with that task's number, found where the original found them (anywhere in
# the piece); text between them is the fields, stripped. Two differences: a piece ends only at a line that is "###"
# alone (an output may hold "### Ingredients"), and a task's number is that of its own first header, not its position
# (a missing or repeated number loses that task, not every later one).
# A reply that starts over, restating the first header (after a preface or not), is a chat reply: its tasks also start
# at each Instruction header at the start of a line, and the decoration chat models put around the list is removed.

FIELDS = ("Instruction", "Input", "Output")
_HEADER = (
    # dressed in markdown, at the start of a line, as chat models write it: "**5. Instruction:**",
    # "### 5. Instruction:", "5. **Input**:", "_5. Output:_" (only with markdown: a bare one is matched as below)
    r"^[ \t]*(?=#|[*_]|{number}\.[ \t]*[*_])(?:#{{1,6}}[ \t]*)?(?P<open>[*_]{{1,3}})?[ \t]*(?P<dressed_number>{number})"
    r"\.[ \t]*(?P<inner>[*_]{{1,3}})?[ \t]*(?P<dressed_field>Instruction|Input|Output)[ \t]*(?P<close>[*_]{{1,3}})?"
    r"[ \t]*:(?P<after>[ \t]*[*_]{{1,3}})?"
    # as the original matched it, anywhere: re.split(rf"{idx}\.\s+(Instruction|Input|Output):", piece)
    r"|(?P<number>{number})\.\s+(?P<field>Instruction|Input|Output):"
)
_ANY_HEADER = re.compile(_HEADER.format(number=r"\d{1,3}"), re.MULTILINE)
# (A "\r" before "\n" is part of the line's end: some servers answer with "\r\n".)
_SEPARATOR_LINE = re.compile(r"^[ \t]*###[ \t\r]*$", re.MULTILINE)  # the prompt's separator between tasks
_RULE_LINE = re.compile(r"^[ \t]*(?:-{3,}|\*{3,}|_{3,})[ \t\r]*$", re.MULTILINE)  # a markdown horizontal rule
_INSTRUCTION_HEADER_NEXT = re.compile(r"\s*(?:#{1,6}[ \t]*)?[*_]{0,3}[ \t]*\d{1,3}\.[ \t]*[*_]{0,3}[ \t]*Instruction")
_FENCE_LINE = re.compile(r"^[ \t]*```", re.MULTILINE)
_INSTRUCTION_LABEL = re.compile(r"\A[ \t]*[*_]{0,3}Instruction[*_]{0,3}[ \t]*:[*_]{0,3}")
# How chat models start the remarks they add after the last task (only a last paragraph starting so is cut).
CLOSING_REMARKS = ("I hope", "Hope this", "Let me know", "Feel free", "These tasks", "These instructions",
                   "I've ", "I have ", "Would you like", "If you need", "If you'd like", "Enjoy")


@dataclasses.dataclass
class _Header:
    number: int
    field: str
    start: int
    end: int  # where the field's text starts
    at_line_start: bool


def _headers(text, number=None):
    """The task headers in `text`, of task `number` (None: of any number), in order."""
    headers = []
    pattern = _ANY_HEADER if number is None else re.compile(_HEADER.format(number=number), re.MULTILINE)
    for match in pattern.finditer(text):
        if match["dressed_field"]:
            # Emphasis after the colon closes the header's ("**5. Input:**"); any other starts the field's text.
            opened = len(match["open"] or "") + len(match["inner"] or "")
            closes_header = match["after"] and len(match["close"] or "") < opened
            end = match.end() if closes_header or not match["after"] else match.start("after")
            headers.append(_Header(int(match["dressed_number"]), match["dressed_field"], match.start(), end, True))
        else:
            line = text[text.rfind("\n", 0, match.start()) + 1: match.start()]
            headers.append(_Header(int(match["number"]), match["field"], match.start(), match.end(),
                                   not line.strip(" \t")))
    return headers


def _after_blank_line(text, position):
    """Whether the line starting at `position` is the text's first or follows a blank line."""
    lines_before = text[:position].split("\n")
    return len(lines_before) < 2 or not lines_before[-2].strip()


def _separators(text):
    """[(start, end)] of the lines that separate tasks: "###" lines; in a reply that has none, markdown rules (a rule
    line after a blank line, as markdown reads one) followed by an Instruction header, and then also one ending the
    reply. (A rule under a line of text is that text's: a table's last line, a heading's underline.)"""
    lines = [match.span() for match in _SEPARATOR_LINE.finditer(text)]
    if lines:
        return lines
    rules = [match for match in _RULE_LINE.finditer(text) if _after_blank_line(text, match.start())]
    between = [match.span() for match in rules if _INSTRUCTION_HEADER_NEXT.match(text, match.end())]
    if between and not text[rules[-1].end():].strip():
        between.append(rules[-1].span())
    return between


def _units(text, chat):
    """[(text, closed)]: the reply cut at its separators, and a chat reply's pieces also at each Instruction header at
    the start of a line; closed: followed by a separator or another task."""
    pieces, start = [], 0
    for separator_start, separator_end in _separators(text):
        pieces.append((text[start:separator_start], True))
        start = separator_end
    pieces.append((text[start:], False))
    if not chat:
        return pieces
    units = []
    for piece, closed in pieces:
        starts = [0] + [h.start for h in _headers(piece) if h.field == "Instruction" and h.at_line_start and h.start]
        units += [(piece[a:b], True) for a, b in zip(starts, starts[1:])] + [(piece[starts[-1]:], closed)]
    return units


def _chat_reply_end(output, fenced):
    """The last output of a chat reply without what follows the list: the code fence that closes the one opened before
    the first task (fenced) and the text after it, the text after a markdown rule, a last paragraph of closing
    remarks."""
    fences = list(_FENCE_LINE.finditer(output)) if fenced else []
    if fences:
        output = output[:fences[-1].start()]
    rules = [match for match in _RULE_LINE.finditer(output) if _after_blank_line(output, match.start())]
    if rules and output[rules[-1].end():].strip():
        output = output[:rules[-1].start()]
    head, blank_line, last_paragraph = output.rstrip().rpartition("\n\n")
    if blank_line and last_paragraph.lstrip().startswith(CLOSING_REMARKS):
        output = head
    return output


def _without_stop_text(text):
    """The reply without the stop sequence some servers leave at its end (`transformers serve` does)."""
    stripped = text.rstrip()
    for stop in STOP_SEQUENCES:
        if stripped.endswith(stop):
            return stripped[:-len(stop)]
    return text


def parse_reply(text, num_prompt_instructions, finish_reason=None):
    """Split one reply into tasks (see the comment above). Returns (tasks, dropped).

    tasks: [{"instruction", "input", "output"}] in reply order, before the rule filters (instruction_rejection_reason);
    "<noinput>" becomes "". dropped: Counter {reason: tasks} of the tasks found but not returned: "malformed" (its
    headers are not exactly N. Instruction, N. Input, N. Output) and "cut by max_tokens" (the last task of a reply that
    stopped for length without closing it with "###", as the original dropped it). Text holding no header is no task.

    The reply continues the prompt after "{n+1}. Instruction:", so text before the first header is that task's
    instruction, unless the first header at the start of a line is an Instruction header: then the reply starts over
    and what comes before is a preface, ignored. Tolerated as chat models write them: markdown on the headers, a
    restated header, a leading "Instruction:" label, a code fence around the list, markdown rules instead of "###", and
    closing remarks after the last task (after the fence or a rule, or a last paragraph starting like CLOSING_REMARKS).
    """
    text = _without_stop_text(text)
    headers = _headers(text)
    if not headers:
        return [], collections.Counter()
    line_headers = [header for header in headers if header.at_line_start]
    chat_reply = bool(line_headers) and line_headers[0].field == "Instruction"  # it starts over
    if chat_reply:
        preface, text = text[:line_headers[0].start], text[line_headers[0].start:]
    else:
        first_line, _, rest = text.lstrip("\n").partition("\n")
        chat_reply = bool(_FENCE_LINE.match(first_line))  # a code fence opened before the list
        preface, text = (first_line, rest) if chat_reply else ("", text)
        text = f"{num_prompt_instructions + 1}. Instruction:" + _INSTRUCTION_LABEL.sub("", text)
    # The list is fenced when the preface opens a code fence and the list closes it.
    fenced = len(_FENCE_LINE.findall(preface)) % 2 == 1 and len(_FENCE_LINE.findall(text)) % 2 == 1

    units = [(unit, closed) for unit, closed in _units(text, chat_reply) if _headers(unit)]
    tasks, dropped = [], collections.Counter()
    for index, (unit, closed) in enumerate(units):
        last_in_reply = index == len(units) - 1
        headers = _headers(unit, _headers(unit)[0].number)
        if last_in_reply and finish_reason == "length" and not closed:
            dropped["cut by max_tokens"] += 1
        elif tuple(header.field for header in headers) != FIELDS:
            dropped["malformed"] += 1
        else:
            instruction, task_input, output = (unit[header.end: following.start if following else len(unit)]
                                               for header, following in zip(headers, headers[1:] + [None]))
            if chat_reply and last_in_reply and not closed:
                output = _chat_reply_end(output, fenced)
            task_input = task_input.strip()
            tasks.append({"instruction": instruction.strip(),
                          "input": "" if task_input.lower() == "<noinput>" else task_input, "output": output.strip()})
    return tasks, dropped


# ----------------------------------------------------------------------------------------------------------------------
# The rules a generated task must pass (the original's post-filters)

# Keywords for tasks a text-only model cannot do (the original's list).
BLACKLIST = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
             "plot", "go to", "video", "audio", "music", "flowchart", "diagram"]


def find_word_in_string(w, s):
    """The match of word `w` in `s` as a whole word, ignoring case (None when absent)."""
    return re.compile(r"\b({0})\b".format(w), flags=re.IGNORECASE).search(s)


def instruction_rejection_reason(instruction):
    """Why the original's post-filters drop a (stripped) generated instruction, or None when it passes: "too short"
    (3 words or fewer), "too long" (over 150), "blacklisted word", "starts with 'Write a program'", "starts with
    punctuation", "starts with non-ASCII"."""
    num_words = len(instruction.split())
    if num_words <= 3:
        return "too short"
    if num_words > 150:
        return "too long"
    for word in BLACKLIST:  # things a language model cannot see, hear, draw or do
        if find_word_in_string(word, instruction):
            return "blacklisted word"
    # Models tend to prefix tasks with "Write a program", which makes it unclear whether to code or to answer.
    if instruction.startswith("Write a program"):
        return "starts with 'Write a program'"
    if instruction[0] in string.punctuation:
        return "starts with punctuation"
    if not instruction[0].isascii():
        return "starts with non-ASCII"
    return None

