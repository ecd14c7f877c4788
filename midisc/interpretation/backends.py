"""The models that explain and score: the bundled SmolLM2-135M-Instruct run here through transformers, or any
OpenAI-compatible chat endpoint (vLLM, llama.cpp's server, Ollama, OpenAI itself).

Both take a batch of conversations: `complete` gives each one's answer, `yes_probability` each one's
probability of answering yes (the local model reads it off its next-token distribution; an endpoint's written
answer counts 1 or 0). `label` names the model in the store; `tokens` counts what was read and written.
A key comes from the environment variable the config names, at request time, and goes into no message,
file or row.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import torch

from midisc.data import lm
from midisc.interpretation.scoring import yes_from_text

Conversation = list[dict[str, str]]


class BackendError(RuntimeError):
    """An explainer or scorer that cannot answer (unreachable, refusing, malformed); the message is one line."""


class LocalChat:
    """A chat model run here with transformers, greedy, in batches; loaded on first use."""

    def __init__(self, name: str, gguf_package: str | None = None, gguf_file: str | None = None,
                 dtype: str = "float32", batch_size: int = 8, max_new_tokens: int = 24) -> None:
        self.name, self.gguf_package, self.gguf_file, self.dtype = name, gguf_package, gguf_file, dtype
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.label = f"local:{name}"
        self.tokens = 0
        self._loaded: lm.LoadedModel | None = None

    def _model(self) -> lm.LoadedModel:
        if self._loaded is None:
            self._loaded = lm.load_model(self.name, gguf_package=self.gguf_package, gguf_file=self.gguf_file,
                                         dtype=self.dtype, device_map=None)
            tokenizer = self._loaded.tokenizer
            tokenizer.padding_side = "left"  # generation continues each row from its own last token
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
        return self._loaded

    def _text(self, conversation: Conversation) -> str:
        tokenizer = self._model().tokenizer
        if tokenizer.chat_template:
            return tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return "".join(f"{m['role'].title()}: {m['content']}\n" for m in conversation) + "Assistant:"

    def _batch(self, conversations: Sequence[Conversation]) -> dict[str, torch.Tensor]:
        tokenizer = self._model().tokenizer
        encoded = tokenizer([self._text(c) for c in conversations], return_tensors="pt", padding=True,
                            add_special_tokens=False)
        self.tokens += int(encoded["attention_mask"].sum())
        return encoded

    @torch.inference_mode()
    def complete(self, conversations: Sequence[Conversation], max_tokens: int | None = None) -> list[str]:
        loaded, answers = self._model(), []
        for first in range(0, len(conversations), self.batch_size):
            encoded = self._batch(conversations[first:first + self.batch_size])
            out = loaded.model.generate(**encoded, max_new_tokens=max_tokens or self.max_new_tokens, do_sample=False,
                                        pad_token_id=loaded.tokenizer.pad_token_id)
            new = out[:, encoded["input_ids"].shape[1]:]
            self.tokens += int((new != loaded.tokenizer.pad_token_id).sum())
            answers += loaded.tokenizer.batch_decode(new, skip_special_tokens=True)
        return answers

    @torch.inference_mode()
    def yes_probability(self, conversations: Sequence[Conversation]) -> list[float]:
        loaded, found = self._model(), []
        yes, no = (self._ids(("Yes", " Yes", "yes", " yes")), self._ids(("No", " No", "no", " no")))
        for first in range(0, len(conversations), self.batch_size):
            encoded = self._batch(conversations[first:first + self.batch_size])
            logits = loaded.model(**encoded).logits[:, -1].float()
            probs = logits.softmax(-1)
            p_yes, p_no = probs[:, yes].sum(-1), probs[:, no].sum(-1)
            found += (p_yes / (p_yes + p_no).clamp_min(1e-12)).tolist()
        return found

    def _ids(self, words: Sequence[str]) -> list[int]:
        tokenizer = self._model().tokenizer
        ids = {tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words}
        return sorted(ids)


def shown_url(url: str) -> str:
    """The endpoint as messages name it: no user, password or query (where keys sometimes travel)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class OpenAIChat:
    """An OpenAI-compatible /chat/completions endpoint: concurrent requests, retries with backoff, a timeout."""

    def __init__(self, url: str, name: str, api_key_env: str | None = "OPENAI_API_KEY", concurrency: int = 4,
                 retries: int = 4, timeout_s: float = 60.0, backoff_s: float = 0.5, max_tokens: int = 60) -> None:
        if not str(url).startswith(("http://", "https://")):
            raise BackendError(f"explainer url {url!r} must start with http:// or https:// (e.g. http://127.0.0.1:8000/v1)")
        if concurrency < 1 or retries < 0 or timeout_s <= 0:
            raise BackendError(f"concurrency={concurrency} must be >= 1, retries={retries} >= 0, "
                               f"timeout_s={timeout_s} > 0")
        self.url, self.name, self.api_key_env = url.rstrip("/"), name, api_key_env
        self.concurrency, self.retries, self.timeout_s, self.backoff_s = concurrency, retries, timeout_s, backoff_s
        self.max_tokens = max_tokens
        self.label = f"openai:{name}"
        self.tokens = 0
        self._count = threading.Lock()

    def __repr__(self) -> str:  # never the key
        return f"OpenAIChat({shown_url(self.url)!r}, {self.name!r})"

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _one(self, client: Any, conversation: Conversation, max_tokens: int) -> str:
        import httpx

        where = shown_url(self.url)
        body = {"model": self.name, "messages": conversation, "max_tokens": max_tokens, "temperature": 0}
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = client.post(f"{self.url}/chat/completions", json=body, headers=self._headers())
            except httpx.TransportError as error:
                if last:
                    raise BackendError(f"the chat endpoint {where} did not answer after {self.retries + 1} tries "
                                       f"({type(error).__name__}); is the server running there?") from None
                time.sleep(self.backoff_s * 2 ** attempt)
                continue
            if response.status_code == 429 or response.status_code >= 500:
                if last:
                    raise BackendError(f"the chat endpoint {where} answered HTTP {response.status_code} "
                                       f"{self.retries + 1} times: {response.text[:200]!r}")
                time.sleep(self.backoff_s * 2 ** attempt)
                continue
            if response.status_code in (401, 403):
                raise BackendError(f"the chat endpoint {where} refused the request (HTTP {response.status_code}): "
                                   f"set its key in ${self.api_key_env}")
            if response.status_code != 200:
                raise BackendError(f"the chat endpoint {where} answered HTTP {response.status_code}: "
                                   f"{response.text[:200]!r} (is model {self.name!r} served there?)")
            try:
                answer = response.json()
                text = answer["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise BackendError(f"the chat endpoint {where} answered something that is not an OpenAI chat "
                                   f"completion: {response.text[:200]!r}") from None
            with self._count:
                self.tokens += int((answer.get("usage") or {}).get("total_tokens") or 0)
            return text if isinstance(text, str) else ""
        raise AssertionError("unreachable")

    def complete(self, conversations: Sequence[Conversation], max_tokens: int | None = None) -> list[str]:
        import httpx

        with httpx.Client(timeout=self.timeout_s) as client, ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda c: self._one(client, c, max_tokens or self.max_tokens), conversations))

    def yes_probability(self, conversations: Sequence[Conversation]) -> list[float]:
        return [yes_from_text(answer) for answer in self.complete(conversations, max_tokens=3)]
