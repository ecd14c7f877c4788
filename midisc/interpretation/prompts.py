"""What the explainer and the scorer read. PROMPT_VERSION names these texts: change a word, bump it, so the
explanations of the old prompt are never mistaken for the new one's (they are kept apart in the store)."""

from __future__ import annotations

from collections.abc import Sequence

PROMPT_VERSION = "v1"
SYSTEM = ("You are a careful interpretability researcher. You study one neuron of a language model at a time "
          "and say in a few words what it responds to.")
MARK = "<<{}>>"
MAX_MARKED = 3  # tokens marked per window: the strongest ones


def shown(token: str) -> str:
    return token.replace("\n", "\\n")


def marked_text(tokens: Sequence[str], marked: set[int]) -> str:
    """The window as text, the tokens at `marked` wrapped in << >>."""
    return "".join(MARK.format(shown(t)) if i in marked else shown(t) for i, t in enumerate(tokens))


def strongest(values: Sequence[float], n: int = MAX_MARKED) -> set[int]:
    """Positions of the `n` largest positive values: the tokens an example marks."""
    ranked = sorted((i for i, v in enumerate(values) if v > 0), key=lambda i: -values[i])
    return set(ranked[:n])


def explanation_messages(examples: Sequence[dict]) -> list[dict[str, str]]:
    lines = [f"Example {i + 1}: {marked_text(e['tokens'], strongest(e['values']))}" for i, e in enumerate(examples)]
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Here are text excerpts where the neuron is active. The tokens where it is "
             "most active are marked like <<this>>.\n\n" + "\n".join(lines) + "\n\nWhat do the marked tokens have "
             "in common? Answer with a short phrase only, no full sentence."}]


def detection_messages(explanation: str, tokens: Sequence[str]) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"The neuron responds to: {explanation}\n\nText: {marked_text(tokens, set())}"
             "\n\nDoes the text contain something the neuron responds to? Answer Yes or No."}]


def fuzzing_messages(explanation: str, tokens: Sequence[str], marked: set[int]) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"The neuron responds to: {explanation}\n\nIn this text some tokens are marked "
             f"like <<this>>: {marked_text(tokens, marked)}\n\nAre the marked tokens what the neuron responds to? "
             "Answer Yes or No."}]


def clean_explanation(text: str) -> str:
    """The first line of a model's answer, without the preamble small models add."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    for lead in ("The marked tokens are", "The marked tokens", "They are", "Answer:", "The neuron responds to"):
        if line.lower().startswith(lead.lower()):
            line = line[len(lead):]
    return line.strip(" :.\"'*") or "(no explanation)"
