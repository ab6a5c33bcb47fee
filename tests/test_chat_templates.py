"""Checkpoints' own tokenizers and chat templates: tokenizers built here with the `tokenizers` library, given
(a) a ChatML template as Qwen's, (b) a Llama-3-style header template, (c) an R1-Distill-style template whose
generation prompt opens "<think>\\n" — our ids equal `AutoTokenizer.apply_chat_template`'s."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from minir1 import Tokenizer
from minir1.reasoning import opened_reasoning
from minir1.tokenizer import TokenizerError

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
    "+ '<|eot_id|>' %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# As DeepSeek-R1-Distill's: system prompt first, earlier answers lose their reasoning, and the generation
# prompt opens the thinking.
R1_DISTILL = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{%- endif %}{%- if message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)
TOOLS_JSON = "{{ messages | tojson }}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
STRICT = ("{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
          "{{ raise_exception('a system message must come first') }}{% endif %}{{ m['content'] }}{% endfor %}")

TEMPLATES = {
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|im_end|>"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>"),
    "r1-distill": (R1_DISTILL, ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                                "<think>", "</think>"], "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "tojson": (TOOLS_JSON, ["<|im_start|>", "<|im_end|>"], None, "<|im_end|>"),
}
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "Answer briefly, with ümlauts and 数学."},
     {"role": "user", "content": "What is 2 + 3?"},
     {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n5"},
     {"role": "user", "content": "  And 4 + 4?  "}],
]


def checkpoint_tokenizer(path: Path, template: str, specials: list[str], bos: str | None, eos: str) -> Path:
    """tokenizer.json (byte-level BPE with the template's special tokens) + tokenizer_config.json, as a
    checkpoint on the Hub ships them."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["What is 2 + 3? And 4 + 4? add them Answer briefly, with ümlauts and 数学. assistant system user"] * 50
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                            show_progress=False))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "chat_template": template,
        "add_bos_token": False, "clean_up_tokenization_spaces": False}, ensure_ascii=False))
    return path


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_ids_equal_transformers(name, generation_prompt, tmp_path):
    from transformers import AutoTokenizer
    path = checkpoint_tokenizer(tmp_path / name, *TEMPLATES[name])
    ours, theirs = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    for conversation in CONVERSATIONS:
        expected = theirs.apply_chat_template(conversation, add_generation_prompt=generation_prompt, tokenize=True)
        expected = expected if isinstance(expected, list) else expected["input_ids"]  # transformers 5: a BatchEncoding
        assert ours.apply_chat_template(conversation, add_generation_prompt=generation_prompt) == list(expected)
        assert ours.apply_chat_template(conversation, add_generation_prompt=generation_prompt, tokenize=False) == \
            theirs.apply_chat_template(conversation, add_generation_prompt=generation_prompt, tokenize=False)


def test_the_r1_distill_generation_prompt_opens_the_reasoning(tmp_path):
    tok = Tokenizer.from_pretrained(checkpoint_tokenizer(tmp_path, *TEMPLATES["r1-distill"]))
    ids = tok.apply_chat_template(CONVERSATIONS[1])
    assert opened_reasoning(tok, ids) == "<think>\n"
    assert "add them" not in tok.decode(ids)  # earlier answers lose their reasoning, as the template says
    chatml = Tokenizer.from_pretrained(checkpoint_tokenizer(tmp_path / "c", *TEMPLATES["chatml"]))
    assert opened_reasoning(chatml, chatml.apply_chat_template(CONVERSATIONS[0])) == ""


def test_a_template_that_raises_is_a_clear_error_naming_the_file(tmp_path):
    path = checkpoint_tokenizer(tmp_path, STRICT, ["<s>"], None, "<s>")
    tok = Tokenizer.from_pretrained(path)
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: the chat template failed: a system message "
                                             r"must come first"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}])


def _with_bos_config(path: Path, bos: str, add_bos_token: bool | None, post_processor: bool) -> Path:
    """The llama3 tokenizer with its tokenizer.json post-processor (Llama 3's adds BOS) and tokenizer_config's
    add_bos_token set as asked (None: the key is absent)."""
    from tokenizers import processors
    backend = Backend.from_file(str(path / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]) \
        if post_processor else None
    backend.save(str(path / "tokenizer.json"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("add_bos_token")
    if add_bos_token is not None:
        config["add_bos_token"] = add_bos_token
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return path


@pytest.mark.parametrize(("add_bos_token", "post_processor", "bos_first"),
                         [(None, True, True), (None, False, False), (True, False, True), (False, True, False),
                          (True, True, True)])
def test_raw_prompts_get_bos_exactly_as_transformers_gives_it(add_bos_token, post_processor, bos_first, tmp_path):
    """`generate --raw`, /v1/completions and the R1-Zero template encode raw text with tokenizer_config's
    add_bos_token when given, else as tokenizer.json's post-processor says — which is all that transformers 5
    follows for byte-level tokenizers, so the two agree except where the field contradicts the post-processor."""
    from transformers import AutoTokenizer
    bos = "<|begin_of_text|>"
    path = _with_bos_config(checkpoint_tokenizer(tmp_path / "t", *TEMPLATES["llama3"]), bos, add_bos_token,
                            post_processor)
    ours, theirs = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    text = "What is 2 + 3? 数学"
    ids = ours.encode_prompt(text)
    if add_bos_token is None or add_bos_token == post_processor:
        assert ids == theirs(text)["input_ids"]
    assert (ids[0] == ours.bos_id) == bos_first and ids.count(ours.bos_id) == int(bos_first)
    ours.save_pretrained(tmp_path / "again")  # our save keeps the behaviour, for us and for transformers
    assert Tokenizer.from_pretrained(tmp_path / "again").encode_prompt(text) == ids
    if add_bos_token is None or add_bos_token == post_processor:
        assert AutoTokenizer.from_pretrained(tmp_path / "again")(text)["input_ids"] == ids


def test_minir1s_own_tokenizer_prompts_start_with_bos_for_transformers_too(tmp_path):
    from transformers import AutoTokenizer

    from minir1.tasks import get_task
    from minir1.train.pretrain import train_tokenizer
    tok = train_tokenizer(get_task("arithmetic:digits=1,mul_digits=0"), 320, 0, show_progress=False)
    tok.save_pretrained(tmp_path)
    ids = Tokenizer.from_pretrained(tmp_path).encode_prompt("Question: 3 + 4")
    assert ids[0] == tok.bos_id and ids[1:] == tok.encode("Question: 3 + 4")
    assert AutoTokenizer.from_pretrained(tmp_path)("Question: 3 + 4")["input_ids"] == ids
