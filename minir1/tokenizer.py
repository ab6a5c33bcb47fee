"""Tokenizer: byte-level BPE (trained with the `tokenizers` library), DeepSeek-R1's special tokens and
chat template, and Hugging Face's on-disk layout (tokenizer.json + tokenizer_config.json).

A directory written by `save_pretrained` loads in `transformers.AutoTokenizer` with identical ids, and
`from_pretrained` reads tokenizer directories that `transformers` wrote (chat template in
tokenizer_config.json or chat_template.jinja).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

from minir1 import files

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
# Text markers of R1's output format: single ids, but not "special", so decoding with
# skip_special_tokens=True keeps them (as DeepSeek-R1's tokenizer does with <think>).
THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT)
MARKER_TOKENS = (THINK, END_THINK, ANSWER, END_ANSWER)

# DeepSeek-R1's chat template, without tool calls: system prompt after BOS, earlier assistant turns
# shown without their thinking, and a generation prompt that opens the thinking with "<think>\n".
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{% endif %}{% endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{% elif message['role'] != 'system' %}"
    "{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


class TokenizerError(ValueError):
    """A tokenizer file is missing or malformed; the message names it."""


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    """transformers' `tojson`: no ASCII escaping (Jinja's own escapes every non-ASCII character)."""
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    from datetime import datetime
    return datetime.now().strftime(fmt)


def template_environment() -> ImmutableSandboxedEnvironment:
    """A sandboxed Jinja2 environment set up as transformers sets up its own for chat templates: trimmed and
    lstripped blocks, loop controls, `raise_exception`, `tojson` without ASCII escaping, `strftime_now`."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _flag(config: dict[str, Any], key: str, where: Path) -> bool | None:
    value = config.get(key)
    if value is not None and not isinstance(value, bool):
        raise TokenizerError(f"{where}: field '{key}' must be true or false, got {value!r}")
    return value


class Tokenizer:
    """Byte-level BPE with DeepSeek-R1's special tokens and chat template."""

    def __init__(self, backend: BackendTokenizer, *, chat_template: str | None = CHAT_TEMPLATE,
                 bos_token: str | None = BOS, eos_token: str | None = EOS, pad_token: str | None = PAD,
                 model_max_length: int | None = None, unk_token: str | None = None, source: str = "tokenizer",
                 add_bos_token: bool | None = True) -> None:
        self.backend = backend
        self.unk_token, self.source, self.add_bos_token = unk_token, source, add_bos_token
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.model_max_length = model_max_length
        self._template = None

    # -- training --------------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1024, *, min_frequency: int = 2,
              show_progress: bool = True, length: int | None = None) -> Tokenizer:
        """Train a byte-level BPE on an iterator of texts. `vocab_size` (an upper bound: a small corpus
        may run out of merges) counts every token, special
        ones included. Digits are split one per token, which small models need for arithmetic."""
        n_fixed = len(SPECIAL_TOKENS) + len(MARKER_TOKENS) + 256
        if vocab_size < n_fixed:
            raise ValueError(f"vocab_size ({vocab_size}) must be >= {n_fixed}: 256 bytes plus "
                             f"{n_fixed - 256} special tokens")
        backend = BackendTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - len(MARKER_TOKENS), min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress)
        backend.train_from_iterator(texts, trainer=trainer, length=length)
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKER_TOKENS])
        # Documents start with BOS; the post-processor says so to `transformers` too (it ignores add_bos_token).
        backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                               special_tokens=[(BOS, backend.token_to_id(BOS))])
        return cls(backend)

    # -- ids -----------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self._id(self.pad_token)

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Text -> ids. Special tokens written in the text become their single ids."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def encode_prompt(self, text: str) -> list[int]:
        """Raw text -> the ids a model is prompted with: BOS first when tokenizer_config.json's `add_bos_token`
        says so; when it says nothing, whatever tokenizer.json's post-processor adds (Llama 3's adds
        <|begin_of_text|>, Qwen's nothing) — all that `transformers` 5 follows for byte-level tokenizers.
        `add_eos_token` is not applied: a prompt to be continued never ends its own document."""
        if self.add_bos_token is None:
            return self.backend.encode(text, add_special_tokens=True).ids
        return self.encode(text, add_bos=self.add_bos_token)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat ------------------------------------------------------------------------------------------
    def render_chat(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True,
                    **kwargs: Any) -> str:
        """Render a conversation with the chat template, exactly as `transformers` does."""
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat template")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be a dict with string 'role' and 'content', got {m!r}")
        try:
            if self._template is None:
                self._template = template_environment().from_string(self.chat_template)
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                         pad_token=self.pad_token or "", unk_token=self.unk_token or "",
                                         **kwargs)
        except TemplateError as e:  # a syntax error, or the template's own raise_exception
            raise TokenizerError(f"{self.source}: the chat template failed: {e}") from e

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True,
                            tokenize: bool = True, **kwargs: Any) -> list[int] | str:
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text) if tokenize else text

    # -- files -----------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """tokenizer.json and tokenizer_config.json, published together (written aside, then renamed)."""
        with files.replacing(path) as staging:
            self._write(staging)

    def _write(self, path: Path) -> None:
        self.backend.save(str(path / TOKENIZER_FILE))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
            "clean_up_tokenization_spaces": False, "chat_template": self.chat_template,
        }
        if self.add_bos_token is not None:  # unset: tokenizer.json's post-processor decides, for us as for transformers
            config.update(add_bos_token=bool(self.add_bos_token and self.bos_token), add_eos_token=False)
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        (path / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory {path} does not exist")
        tok_file = path / TOKENIZER_FILE
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file}: no such file (minir1 reads fast tokenizers: tokenizer.json)")
        try:
            backend = BackendTokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{tok_file}: cannot parse ({e})") from e
        config: dict[str, Any] = {}
        cfg_file = path / TOKENIZER_CONFIG_FILE
        if cfg_file.is_file():
            config = files.read_json(cfg_file, TokenizerError)
            if not isinstance(config, dict):
                raise TokenizerError(f"{cfg_file}: expected a JSON object")
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        source = str(cfg_file)
        if (path / CHAT_TEMPLATE_FILE).is_file():
            template = files.read_text(path / CHAT_TEMPLATE_FILE, TokenizerError)
            source = str(path / CHAT_TEMPLATE_FILE)
        vocab = backend.get_vocab(with_added_tokens=True)

        def special(key: str, default: str) -> str | None:
            if key in config:
                return _token_content(config[key])
            return default if default in vocab else None

        max_len = config.get("model_max_length")
        return cls(backend, chat_template=template if isinstance(template, str) else None,
                   bos_token=special("bos_token", BOS), eos_token=special("eos_token", EOS),
                   pad_token=special("pad_token", PAD), unk_token=_token_content(config.get("unk_token")),
                   model_max_length=max_len if isinstance(max_len, int) and max_len < 10**9 else None,
                   source=source, add_bos_token=_flag(config, "add_bos_token", cfg_file))
