"""The question inside a prompt: what a router should read.

A model is given much more than the user's question: a chat template (role tags, special tokens,
a system prompt), and evaluation harnesses add instruction lines ("Answer the question using a
single word or phrase.", "Please answer yes or no."), multiple-choice options and hints. Routed
as they are, these words decide the class ("word" reads as OCR). :func:`extract_question` keeps
the question and sets the rest aside:

1. **chat templates**: special tokens (``<|im_start|>``, ``[INST]``, ``<image>`` ...) go; when
   role tags mark turns (``USER:``, ``user``/``assistant`` lines, ``### Human:`` ...), only the
   last user turn is kept, so a system prompt and earlier turns never reach the router;
2. **context lines** (``Hint: ...``, ``Context: ...``) go to :attr:`Question.context`;
3. **options** (``A. ...``, ``(B) ...``, an ``Options:`` block, or ``(A) x (B) y`` after the
   question) go to :attr:`Question.options`;
4. **instructions** about the answer's form, as whole lines or as sentences before or after the
   question, go to :attr:`Question.dropped`.

What is left, on one line, is :attr:`Question.text`. The rules are literal patterns (see
``INSTRUCTIONS``), so a question that merely contains such words ("What word is written on the
sign?") is never cut: a sentence is dropped only when it *is* an instruction from start to end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Question", "extract_question", "INSTRUCTIONS"]

#: Special tokens of chat templates, left in text when a tokenizer decodes with them.
_SPECIAL = re.compile(
    r"<\|[^|<>\n]{1,40}\|>|</?s>|\[/?INST\]|<<SYS>>.*?<</SYS>>|<start_of_turn>|<end_of_turn>|<image>|<video>"
    r"|<\|image_pad\|>|<\|vision_(start|end)\|>|<im_(start|end)>", re.S)
#: A role word alone on its line (a turn marker whose special tokens were skipped), or "### Human:".
_ROLE = re.compile(r"^\s*(?:#{2,3}\s*)?(system|user|human|assistant|gpt|model|bot)\s*:?\s*$", re.I)
#: Role tags with a colon inside a line ("USER: ... ASSISTANT:", "user: <image>").
_INLINE_ROLE = re.compile(r"(?:^|\s)(?:#{2,3}\s*)?((?i:user|assistant|human|gpt))\s*:(?=\s|$)")

#: Instructions about the answer's form (lmms-eval, VLMEvalKit and LLaVA's evaluation prompts):
#: a line or sentence that matches one of these from its start to its end is not the question.
INSTRUCTIONS: tuple[str, ...] = (
    r"answer the question (using|with|in) (a|one) (single )?(word|phrase|number|sentence)( or (a )?(phrase|word|number))?",
    r"answer (using|with) (a|one) (single )?(word|phrase|number)( or (a )?(phrase|word))?",
    r"answer (with )?(only )?(yes or no|\"?yes\"? or \"?no\"?)",
    r"please answer (only )?(with )?(yes or no|\"?yes\"? or \"?no\"?)",
    r"(please )?answer with the option'?s letter from the given choices( directly)?",
    r"answer with the letter( of the correct option)?( directly)?",
    r"(please )?(answer|respond|reply) (with|using) (only )?(the|a) (letter|option|number|word)s?( .{0,40})?",
    r"(please )?(give|provide) (a |an |your )?(short|brief|concise|one-word|single-word|final) answer( .{0,40})?",
    r"(please )?answer (briefly|concisely|directly|in one word|in a few words)",
    r"(please )?(choose|select|pick) (the )?(correct|best|right) (answer|option|choice)( .{0,40})?",
    r"(please )?answer the question and provide the correct option letter.*",
    r"first please perform reasoning.*",
    r"(please )?think step by step.*",
    r"the (last|final) line of your (response|answer) should be.*",
    r"(please )?(output|return) (only )?the (answer|letter|number).*",
    r"(please )?answer the following question.{0,40}",
    r"(please )?look at the (image|picture) and answer.{0,40}",
)
_INSTRUCTION = re.compile(r"^\s*(?:" + "|".join(INSTRUCTIONS) + r")\s*[.:!]?\s*$", re.I)
_CONTEXT = re.compile(r"^\s*(hint|context|note)\s*:\s*(.*)$", re.I)
_QUESTION_TAG = re.compile(r"^\s*(question|q)\s*:\s*", re.I)
_OPTION_LINE = re.compile(r"^\s*(?:\(([A-Ha-h])\)|([A-H])[.):])\s+(\S.*)$")
_OPTIONS_HEAD = re.compile(r"^\s*(options|choices|answer choices)\s*:\s*(.*)$", re.I)
_INLINE_OPTIONS = re.compile(r"\s\(([A-H])\)\s*\S.*$")
_SENTENCE = re.compile(r"(?<=[.?!])\s+")


@dataclass(frozen=True)
class Question:
    """A prompt taken apart: the question to route, and what was set aside."""

    text: str
    options: tuple[str, ...] = ()
    context: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()


def extract_question(prompt: str) -> Question:
    """The question of ``prompt`` (see the module docstring). A plain question comes back as it
    is (whitespace collapsed); a prompt that is only an instruction keeps it as its text."""
    text = _SPECIAL.sub("\n", prompt)
    lines = _last_user_turn([ln.strip() for ln in text.replace("\r", "").split("\n")])
    options: list[str] = []
    context: list[str] = []
    dropped: list[str] = []
    kept: list[str] = []
    in_options = False
    for line in lines:
        if not line:
            continue
        if m := _CONTEXT.match(line):
            context.append(m.group(2))
            continue
        if m := _OPTIONS_HEAD.match(line):
            in_options = True
            if m.group(2):
                options += _split_inline_options(m.group(2))
            continue
        if m := _OPTION_LINE.match(line):
            options.append(m.group(3).strip())
            in_options = True
            continue
        if in_options and not _INSTRUCTION.match(line) and not line.endswith("?"):
            options.append(line)  # an unlabelled option below an "Options:" head
            continue
        line = _QUESTION_TAG.sub("", line)
        sentences = [s for s in _SENTENCE.split(line) if s]
        for s in sentences:
            (dropped if _INSTRUCTION.match(s) else kept).append(s)
    question = " ".join(kept)
    if m := _INLINE_OPTIONS.search(question):  # "Which is red? (A) ball (B) box"
        options += _split_inline_options(question[m.start():])
        question = question[:m.start()]
    question = re.sub(r"\s+", " ", question).strip()
    if not question and dropped:  # nothing but an instruction: route that, not an empty string
        question, dropped = " ".join(dropped), []
    return Question(question, tuple(options), tuple(context), tuple(dropped))


def _last_user_turn(lines: list[str]) -> list[str]:
    """The lines of the last user turn when role tags mark turns; else all lines."""
    turns: list[tuple[str, list[str]]] = []
    for line in lines:
        for role, body in _roles_in(line):
            if role is None:
                if turns:
                    turns[-1][1].append(body)
                else:
                    turns.append(("", [body]))
            else:
                turns.append((role, [body] if body else []))
    if not any(role for role, _ in turns):
        return lines
    users = [body for role, body in turns if role in ("user", "human")]
    if users:
        return users[-1]
    return [b for role, body in turns if role not in ("system", "assistant", "gpt", "model", "bot") for b in body]


def _roles_in(line: str) -> list[tuple[str | None, str]]:
    """``line`` split at role tags: ``[(role or None, text), ...]``. A role word alone on its line
    (Qwen's ``user`` after its special tokens are skipped) or followed by a colon is a tag;
    "user manual?" is not."""
    if (m := _ROLE.match(line)) and line[m.end():].strip() == "":
        return [(m.group(1).lower(), "")]
    pieces = _INLINE_ROLE.split(line)
    if len(pieces) == 1:
        return [(None, line)]
    parts: list[tuple[str | None, str]] = []
    if pieces[0].strip():
        parts.append((None, pieces[0].strip()))
    for role, body in zip(pieces[1::2], pieces[2::2], strict=True):  # re.split with one group: pre, (role, body)*
        parts.append((role.lower(), ""))
        if body.strip():
            parts.append((None, body.strip()))
    return parts


def _split_inline_options(text: str) -> list[str]:
    """``"(A) red (B) blue"`` or ``"A. red B. blue"`` -> ``["red", "blue"]``."""
    pieces = re.split(r"\s*\(?\b[A-H][.)]\s+|\s*\([A-H]\)\s*", " " + text)
    return [p.strip() for p in pieces if p.strip()]
