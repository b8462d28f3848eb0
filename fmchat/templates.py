"""Chat templates: fmchat's built-in ones, and which template renders a model's conversation.

The choice, the same for every token-level backend (transformers, llama.cpp):

1. ``--chat-template NAME|FILE``: a built-in (``BUILTINS``) or a Jinja file;
2. else the model's own template (``tokenizer.chat_template`` in a GGUF's metadata or an HF tokenizer);
3. else a built-in picked from the model's special tokens (``<|im_start|>`` -> chatml, ``<start_of_turn>`` ->
   gemma, ...) and then its architecture (GGUF ``general.architecture``, HF ``model_type``); chatml when nothing
   says otherwise, as llama.cpp does with a model that carries no template.

A built-in also names its end-of-turn token (``<|im_end|>`` for chatml...): where the model's vocabulary has it,
generation stops on it as on the model's own end-of-sequence token. Every template writes ``bos_token`` itself
where its format wants one (the backends tokenize the rendered text without adding special tokens).

This module imports nothing of fmchat's but the errors: the config validates ``--chat-template`` with it before
anything loads, and a GGUF's metadata is read with the ``gguf`` package before any conversion runs.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Container
from dataclasses import dataclass
from pathlib import Path

from fmchat.errors import UserError

# ---------------------------------------------------------------- the built-ins (fmchat's own wording of each format)
_CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

_LLAMA3 = (
    "{{- bos_token if bos_token else '' -}}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)

_PHI3 = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)

# Gemma has no system role: the system prompt opens the first turn. The assistant's role is "model".
_GEMMA = (
    "{{- bos_token if bos_token else '' -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + (message['content'] | trim) + '\\n\\n' -%}"
    "{%- else -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n'"
    " + ns.system + (message['content'] | trim) + '<end_of_turn>\\n' }}"
    "{%- set ns.system = '' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

# [INST] ... [/INST] around each user turn, each reply closed by the end-of-sequence token; no system role: the
# system prompt opens the first user turn. The generation prompt is the [/INST] itself.
_MISTRAL = (
    "{{- bos_token if bos_token else '' -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + (message['content'] | trim) + '\\n\\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '[INST] ' + ns.system + (message['content'] | trim) + ' [/INST]' }}"
    "{%- set ns.system = '' -%}"
    "{%- else -%}"
    "{{ ' ' + (message['content'] | trim) + (eos_token if eos_token else '') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


@dataclass(frozen=True)
class Builtin:
    name: str
    source: str  # Jinja
    end: str | None  # the end-of-turn token generation stops on (where the vocabulary has it); None: the model's eos


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in (
        Builtin("chatml", _CHATML, "<|im_end|>"),
        Builtin("llama3", _LLAMA3, "<|eot_id|>"),
        Builtin("phi3", _PHI3, "<|end|>"),
        Builtin("gemma", _GEMMA, "<end_of_turn>"),
        Builtin("mistral", _MISTRAL, None),
    )
}
FALLBACK = "chatml"

# Special tokens that give a format away, in the order they are tried (all of a tuple must be in the vocabulary).
TOKEN_HINTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("<|im_start|>", "<|im_end|>"), "chatml"),
    (("<start_of_turn>", "<end_of_turn>"), "gemma"),
    (("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "llama3"),
    (("<|user|>", "<|assistant|>", "<|end|>"), "phi3"),
    (("[INST]", "[/INST]"), "mistral"),
)
# Architectures (GGUF general.architecture / HF model_type, by prefix) whose format is known when the tokens say nothing.
ARCH_HINTS: tuple[tuple[str, str], ...] = (
    ("gemma", "gemma"),
    ("phi3", "phi3"),
    ("mistral", "mistral"),
    ("mixtral", "mistral"),
    ("qwen", "chatml"),
)

WHY_FLAG = "--chat-template"
WHY_OWN = "the model's own"


@dataclass(frozen=True)
class ChatTemplate:
    """The template a backend renders with, and why it is that one."""

    name: str  # a built-in's name, the file given, or "model" (the model's own)
    source: str  # Jinja
    why: str  # WHY_FLAG, WHY_OWN, or "built-in: the model has none; <how it was picked>"
    end: str | None = None  # the end-of-turn token to stop on (a built-in's)

    @property
    def own(self) -> bool:
        return self.why == WHY_OWN

    def describe(self) -> str:
        """One line for the user: "the model's own", "chatml (built-in, --chat-template)",
        "chatml (built-in: the model has none; its vocabulary has <|im_start|>)", "t.jinja (--chat-template)"."""
        if self.own:
            return WHY_OWN
        if self.why == WHY_FLAG and self.name in BUILTINS:
            return f"{self.name} (built-in, {WHY_FLAG})"
        return f"{self.name} ({self.why})"


# ---------------------------------------------------------------- --chat-template
def _names() -> str:
    return ", ".join(BUILTINS)


def _bad(value: str, why: str) -> UserError:
    return UserError(f"--chat-template '{value}': {why} (built-ins: {_names()}; or a .jinja file)")


def _compile(source: str):
    """Parse a Jinja template as the backends will (sandboxed, trim_blocks, lstrip_blocks, loop controls)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    return env.from_string(source)


def from_choice(value: str) -> ChatTemplate:
    """The template ``--chat-template value`` names: a built-in, or a Jinja file. One-line UserError otherwise."""
    if value in BUILTINS:
        b = BUILTINS[value]
        return ChatTemplate(b.name, b.source, WHY_FLAG, b.end)
    path = Path(value).expanduser()
    if not path.is_file():
        looks_like_file = "/" in value or path.suffix in (".jinja", ".jinja2", ".j2", ".txt")
        raise _bad(value, "no such file" if looks_like_file else "unknown name")
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _bad(value, f"cannot read it ({type(exc).__name__})") from None
    if not source.strip():
        raise _bad(value, "the file is empty")
    from jinja2 import TemplateSyntaxError

    try:
        _compile(source)
    except TemplateSyntaxError as exc:
        raise _bad(value, f"not a valid Jinja template ({exc.message}, line {exc.lineno})") from None
    return ChatTemplate(value, source, WHY_FLAG)


def problem(value: str | None) -> str | None:
    """What is wrong with a ``--chat-template`` value (None: nothing; also for no value)."""
    if not value:
        return None
    try:
        from_choice(value)
    except UserError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------- the choice
def pick(architecture: str | None, vocab: Container[str]) -> tuple[str, str]:
    """A built-in for a model without a template: (name, how it was picked), from its special tokens, then its
    architecture, else chatml."""
    for tokens, name in TOKEN_HINTS:
        if all(t in vocab for t in tokens):
            return name, f"its vocabulary has {tokens[0]}"
    arch = (architecture or "").lower()
    for prefix, name in ARCH_HINTS:
        if arch.startswith(prefix):
            return name, f"architecture {arch}"
    return FALLBACK, "the default"


def resolve(choice: str | None, own: str | None, architecture: str | None, vocab: Container[str]) -> ChatTemplate:
    """Which template renders the chat: ``choice`` (--chat-template), else the model's ``own``, else a picked built-in."""
    if choice:
        return from_choice(choice)
    if isinstance(own, str) and own.strip():
        return ChatTemplate("model", own, WHY_OWN)
    name, how = pick(architecture, vocab)
    b = BUILTINS[name]
    return ChatTemplate(b.name, b.source, f"built-in: the model has none; {how}", b.end)


def own_template(tokenizer_template) -> str | None:
    """A tokenizer's own template: a string, or the "default" one of a named set."""
    if isinstance(tokenizer_template, dict):
        tokenizer_template = tokenizer_template.get("default")
    return tokenizer_template if isinstance(tokenizer_template, str) and tokenizer_template.strip() else None


def stop_ids(template: ChatTemplate, token_id: Callable[[str], int | None]) -> set[int]:
    """The ids generation stops on besides the model's eos: the template's end-of-turn token, where the
    vocabulary has it."""
    if template.end is None:
        return set()
    i = token_id(template.end)
    return set() if i is None or i < 0 else {int(i)}


@dataclass(frozen=True)
class GGUFFacts:
    architecture: str | None
    template: str | None
    tokens: frozenset[str]


def gguf_facts(path: Path) -> GGUFFacts:
    """What the choice needs from a GGUF file's metadata (no tensor is touched). Read in one pass of the header
    (``gguf_header.gguf_metadata``: a fraction of a second for Gemma 3's 262k-token vocabulary, where gguf's
    GGUFReader took over 10 s); a header that pass cannot read (a big-endian file) goes to the gguf package."""
    from fmchat import gguf_header

    keys = ("general.architecture", "tokenizer.chat_template", "tokenizer.ggml.tokens")
    try:
        meta = gguf_header.gguf_metadata(path, keys)
    except (OSError, ValueError, struct.error):
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        meta = {k: f.contents() for k in keys if (f := reader.get_field(k)) is not None}
    tokens = frozenset(meta.get("tokenizer.ggml.tokens") or [])
    return GGUFFacts(meta.get("general.architecture"), own_template(meta.get("tokenizer.chat_template")), tokens)


def for_gguf(path: Path, choice: str | None) -> ChatTemplate:
    """The template for a GGUF file, decided from its metadata alone (before any conversion)."""
    if choice:
        return from_choice(choice)  # the file's metadata is not needed (nor read)
    facts = gguf_facts(path)
    return resolve(None, facts.template, facts.architecture, facts.tokens)
