"""How a prompt is shown to a causal LM: through its chat template when it has one, so that fine-tuning and
generation see exactly the same text."""
from __future__ import annotations


def format_prompt(tokenizer, prompt: str) -> str:
    """The text a causal LM sees before its answer (chat template with a generation prompt, or `prompt` + newline)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt + "\n"
