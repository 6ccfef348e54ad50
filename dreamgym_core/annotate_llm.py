"""LLM annotators of offline transitions (paper §4.1, "CoT annotation": R* written by an LLM).

The paper has a strong LLM write the reasoning trace R* of Eq. 5 for every offline transition.
This module holds the two LLM clients that satisfy ``annotate.Annotator``, with one prompt
(``annotation_prompt``) and one output cleaner (``clean_trace``):

    TransformersAnnotator a local causal LM (path or hub id), greedy ``generate`` in batches.
    OpenAIAnnotator       any OpenAI-compatible server (vLLM, ...): retries with backoff on
                          429/5xx/timeouts, a token-bucket rate limit (``TokenBucket``), a
                          one-line error at the end.

Departure from the paper: neither is the default (the offline default is ``annotate.RuleAnnotator``),
and when a model returns nothing usable after cleaning, the item gets the rule trace instead
(``annotate.rule_trace``), counted in ``fallbacks``, so a table is always fully annotated.
"""

from __future__ import annotations

import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from dreamgym_core.annotate import AnnotationError, AnnotationInput, rule_trace
from dreamgym_core.exp_format import render_delta
from dreamgym_core.state import AbstractState
from dreamgym_core.state_delta import diff

MAX_WORDS = 80
"""LLM traces are cut to this many words (the rule annotator stays under 60)."""


SYSTEM_PROMPT = ("You annotate transitions of a text game to train a world model. "
                 "Explain causes briefly and only with facts shown.")


def annotation_prompt(item: AnnotationInput) -> str:
    """The question put to an LLM annotator about one transition."""
    try:
        change = render_delta(diff(AbstractState.parse(item.state), AbstractState.parse(item.next_state),
                                   valid=item.valid, reward=item.reward, done=item.done))
    except ValueError:
        change = "(not derivable)"
    return (f"Task: {item.instruction}\n\nState:\n{item.state}\n\nAction: {item.action}\n\n"
            f"Next state:\n{item.next_state}\n\nChange:\n{change}\n\n"
            f"The action is {'valid' if item.valid else 'rejected by the game'}, the reward is "
            f"{item.reward:g} and the episode {'ends' if item.done else 'continues'}.\n"
            "In at most three sentences, explain why this action leads to this next state and this "
            "reward. Use only facts shown above. Reply with the explanation only.")


def clean_trace(text: str, max_words: int = MAX_WORDS) -> str:
    """Model output -> one paragraph: think tags handled, first paragraph, whitespace collapsed."""
    text = text or ""
    if "</think>" in text:
        inside, _, after = text.partition("</think>")
        text = after if after.strip() else inside
    text = text.replace("<think>", " ").strip()
    text = re.split(r"\n\s*\n", text, maxsplit=1)[0]
    text = re.sub(r"^(?:explanation|answer|reasoning)\s*:\s*", "", text.strip(), flags=re.I)
    words = text.split()
    return " ".join(words[:max_words])


class TransformersAnnotator:
    """Greedy traces from a local causal LM (``transformers`` generate, left-padded batches)."""

    def __init__(self, model_path: str, max_new_tokens: int = 96, batch_size: int = 8,
                 device: str = "cpu", trust_remote_code: bool = False):
        self.model_path = model_path
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.device = device
        self.trust_remote_code = trust_remote_code
        self.name = f"transformers:{model_path}"
        self.fallbacks = 0
        """Items whose model output was empty after cleaning and got the rule trace instead."""
        self._model = self._tok = None

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=self.trust_remote_code)
        tok.padding_side, tok.truncation_side = "left", "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        # fp32: bf16 matmuls on this class of CPU are two orders of magnitude slower (DESIGN.md).
        dtype = torch.float32 if self.device == "cpu" else "auto"
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype,
                                                     trust_remote_code=self.trust_remote_code)
        self._model, self._tok = model.to(self.device).eval(), tok

    def _prompt(self, item: AnnotationInput) -> str:
        text = annotation_prompt(item)
        if getattr(self._tok, "chat_template", None):
            messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]
            return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{text}\nExplanation:"

    def _generate(self, prompts: list[str]) -> list[str]:
        import torch

        limit = getattr(self._model.config, "max_position_embeddings", None)
        max_len = max(8, limit - self.max_new_tokens) if limit else None
        enc = self._tok(prompts, return_tensors="pt", padding=True, truncation=max_len is not None,
                        max_length=max_len).to(self.device)
        with torch.no_grad():
            out = self._model.generate(**enc, do_sample=False, max_new_tokens=self.max_new_tokens,
                                       pad_token_id=self._tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        return self._tok.batch_decode(new, skip_special_tokens=True)

    def annotate(self, items: list[AnnotationInput]) -> list[str]:
        self._load()
        out = []
        for i in range(0, len(items), self.batch_size):
            chunk = items[i:i + self.batch_size]
            for item, raw in zip(chunk, self._generate([self._prompt(it) for it in chunk]), strict=True):
                trace = clean_trace(raw)
                if not trace:
                    self.fallbacks += 1
                    trace = rule_trace(item)
                out.append(trace)
        return out


class TokenBucket:
    """At most ``rate`` acquisitions per second on average, bursts up to ``burst``; thread-safe.

    Each caller reserves a token (the count may go negative) and sleeps outside the lock for the
    time the reservation needs, so waiting callers queue in arrival order.
    """

    def __init__(self, rate: float, burst: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if rate <= 0 or burst < 1:
            raise ValueError(f"TokenBucket: rate must be > 0 and burst >= 1, got rate={rate}, burst={burst}")
        self.rate, self.burst, self._clock, self._sleep = rate, burst, clock, sleep
        self._tokens, self._last = burst, clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token, sleeping as needed; returns the seconds waited."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate) - 1
            self._last = now
            wait = max(0.0, -self._tokens / self.rate)
        if wait:
            self._sleep(wait)
        return wait


def _one_line(text: str, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


class OpenAIAnnotator:
    """Traces from any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, TGI, llama.cpp...)."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", max_retries: int = 3,
                 requests_per_second: float | None = None, timeout: float = 30.0, max_tokens: int = 160,
                 concurrency: int = 1, backoff: float = 0.5, max_backoff: float = 8.0):
        import httpx

        if max_retries < 0 or concurrency < 1:
            raise ValueError("OpenAIAnnotator: max_retries must be >= 0 and concurrency >= 1")
        root = base_url.rstrip("/")
        root = root[:-3] if root.endswith("/v1") else root
        self.url = f"{root}/v1/chat/completions"
        self.model = model
        self.name = f"openai:{model}"
        self.max_retries, self.timeout, self.max_tokens = max_retries, timeout, max_tokens
        self.concurrency, self.backoff, self.max_backoff = concurrency, backoff, max_backoff
        key = os.environ.get(api_key_env, "")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._bucket = TokenBucket(requests_per_second, burst=max(1.0, requests_per_second)) \
            if requests_per_second else None
        self._client = httpx.Client(timeout=timeout)
        self._count_lock = threading.Lock()
        self.requests = 0
        """HTTP attempts made (including retried ones)."""
        self.retries = 0
        self.fallbacks = 0

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "OpenAIAnnotator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _count(self, name: str) -> None:
        with self._count_lock:
            setattr(self, name, getattr(self, name) + 1)

    def _complete(self, prompt: str) -> str:
        import httpx

        payload = {"model": self.model, "temperature": 0.0, "max_tokens": self.max_tokens,
                   "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]}
        last = ""
        for attempt in range(self.max_retries + 1):
            if self._bucket is not None:
                self._bucket.acquire()
            self._count("requests")
            delay = min(self.max_backoff, self.backoff * 2 ** attempt)
            try:
                r = self._client.post(self.url, json=payload, headers=self._headers)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last = f"{type(exc).__name__}: {_one_line(exc) or 'no detail'}"
            else:
                if r.status_code == 200:
                    try:
                        return r.json()["choices"][0]["message"]["content"] or ""
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        raise AnnotationError(f"OpenAIAnnotator: POST {self.url}: malformed response "
                                              f"({type(exc).__name__}): {_one_line(r.text)}") from None
                if r.status_code != 429 and r.status_code < 500:
                    raise AnnotationError(f"OpenAIAnnotator: POST {self.url}: HTTP {r.status_code} "
                                          f"(not retried): {_one_line(r.text)}")
                last = f"HTTP {r.status_code}: {_one_line(r.text, 120)}"
                retry_after = r.headers.get("retry-after", "")
                if retry_after.replace(".", "", 1).isdigit():
                    delay = min(self.max_backoff, float(retry_after))
            if attempt < self.max_retries:
                self._count("retries")
                time.sleep(delay)
        raise AnnotationError(f"OpenAIAnnotator: POST {self.url} failed after {self.max_retries + 1} "
                              f"attempts; last error: {last}")

    def _annotate_one(self, item: AnnotationInput) -> str:
        trace = clean_trace(self._complete(annotation_prompt(item)))
        if not trace:
            self._count("fallbacks")
            trace = rule_trace(item)
        return trace

    def annotate(self, items: list[AnnotationInput]) -> list[str]:
        if self.concurrency == 1:
            return [self._annotate_one(it) for it in items]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._annotate_one, items))


__all__ = ["OpenAIAnnotator", "TokenBucket", "TransformersAnnotator", "annotation_prompt", "clean_trace"]
