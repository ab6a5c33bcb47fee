"""Turning a problem into the model's input, and the model's output back into a whole response.

`chat`: the tokenizer's chat template (DeepSeek-R1's), whose generation prompt already opens the
thinking with "<think>\\n" — so the response to score is that opening plus the generated text.
`r1-zero`: DeepSeek-R1-Zero's plain-text template for a base model (R1 Table 1), which asks for the
<think>/<answer> format in words; the model writes the opening tag itself.
"""

from __future__ import annotations

from minir1.reasoning import opened_reasoning
from minir1.tokenizer import THINK, Tokenizer

TEMPLATES = ("chat", "r1-zero")

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {question}. Assistant:"
)


def build_prompt(tokenizer: Tokenizer, question: str, template: str = "chat") -> tuple[list[int], str]:
    """-> (prompt ids, the part of the response the prompt already wrote, e.g. "<think>\\n")."""
    if template == "chat":
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        return ids, opened_reasoning(tokenizer, ids)
    if template == "r1-zero":
        return tokenizer.encode_prompt(R1_ZERO_TEMPLATE.format(question=question)), ""
    raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")


def r1_response(solution: str, answer: str) -> str:
    """A worked solution in R1's output format (the assistant's whole response)."""
    return f"{THINK}\n{solution}\n</think>\n<answer>{answer}</answer>"
