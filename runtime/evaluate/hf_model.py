"""A Hugging Face causal language model behind the scorers' interface: batched log-likelihoods,
batched greedy generation, and summed token losses for perplexity."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import jinja2
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from dapc.errors import DapcError
from runtime.evaluate.common import Prompt
from runtime.evaluate.model_dirs import model_dir

# Default number of token positions (rows x padded length) in one forward pass.
DEFAULT_BATCH_TOKENS = 16384

_WEIGHT_SUFFIXES = (".safetensors", ".bin")


class HFModel:
    """A model directory loaded with `AutoModelForCausalLM` and `AutoTokenizer`, in eval mode.

    `device` defaults to CUDA when available, else CPU; `dtype` to bfloat16 on CUDA and float32 on
    CPU; `batch_tokens` bounds the padded tokens of one forward pass; `chat` (default: whether the
    tokenizer has a chat template) picks the chat form of generation prompts.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        chat: bool | None = None,
    ):
        self.path = model_dir(path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype).to(self.device).eval()
        self.max_length = int(self.model.config.max_position_embeddings)
        self.batch_tokens = batch_tokens
        self.chat = self.tokenizer.chat_template is not None if chat is None else chat
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    @property
    def revision(self) -> str:
        """The Hub commit when the directory is an HF-cache snapshot, else "sha256:" of
        config.json and the weight files (names and bytes, in name order)."""
        if self.path.parent.name == "snapshots":
            return self.path.name
        digest = hashlib.sha256()
        for file in sorted(self.path.iterdir()):
            if file.name == "config.json" or file.suffix in _WEIGHT_SUFFIXES:
                digest.update(file.name.encode())
                with file.open("rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        digest.update(block)
        return "sha256:" + digest.hexdigest()

    @torch.inference_mode()
    def loglik(self, contexts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        """Sum of log-probabilities (nats) of each continuation's tokens after its context.

        Tokenized as lm-eval does (`_encode_pair`: trailing spaces move to the continuation, the
        continuation is what `encode(context + continuation)` adds to `encode(context)`, and the
        pair is left-truncated to the model's context). Requests that feed the model the same
        tokens (the options of one question, when each is one token) share one row; rows are
        batched longest first, left-padded, and only the scored positions get logits.
        """
        rows: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for index, (context, continuation) in enumerate(zip(contexts, continuations, strict=True)):
            context_ids, continuation_ids = self._encode_pair(context, continuation)
            whole = (context_ids + continuation_ids)[-(self.max_length + 1) :]
            rows.setdefault(tuple(whole[:-1]), []).append((index, continuation_ids))
        results = [0.0] * len(contexts)
        for batch in self._batches(sorted(rows, key=len, reverse=True), extra_tokens=0):
            keep = max(len(ids) for row in batch for _, ids in rows[row])
            input_ids, mask = self._left_pad(batch)
            logits = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                logits_to_keep=keep,
            ).logits
            logprobs = logits.float().log_softmax(-1)
            for b, row in enumerate(batch):
                for index, ids in rows[row]:
                    targets = torch.tensor(ids, device=self.device)[:, None]
                    results[index] = float(logprobs[b, keep - len(ids) :].gather(-1, targets).sum())
        return results

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[str]:
        """Greedy completions (text after the prompt, special tokens dropped), stopping at EOS or
        after `max_new_tokens` tokens; prompts are left-truncated to leave room for them."""
        room = self.max_length - max_new_tokens
        if room <= 0:
            raise DapcError(
                f"max_new_tokens {max_new_tokens} leaves no room for the prompt in the model's "
                f"{self.max_length}-token context; pass a smaller max_new_tokens",
                str(self.path),
            )
        encoded = [tuple(self.encode_prompt(p)[-room:]) for p in prompts]
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad_id,
            eos_token_id=self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id,
        )
        by_length = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
        texts = [""] * len(encoded)
        start = 0
        for batch in self._batches([encoded[i] for i in by_length], extra_tokens=max_new_tokens):
            input_ids, mask = self._left_pad(batch)
            output = self.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
            new_tokens = output[:, input_ids.shape[1] :]
            for offset, tokens in enumerate(new_tokens):
                texts[by_length[start + offset]] = self.tokenizer.decode(tokens, skip_special_tokens=True)
            start += len(batch)
        return texts

    @torch.inference_mode()
    def token_nll(self, windows: Sequence[Sequence[int]]) -> tuple[float, int]:
        """Summed negative log-likelihood (nats) of every token after the first of each window,
        and how many tokens that is. Windows longer than the model's context are refused."""
        rows = [tuple(w) for w in windows if len(w) > 1]
        longest = max((len(r) for r in rows), default=0)
        if longest > self.max_length:
            raise DapcError(
                f"a perplexity window of {longest} tokens is longer than the model's {self.max_length}-token context",
                str(self.path),
            )
        total_nats, total_tokens = 0.0, 0
        for batch in self._batches(sorted(rows, key=len, reverse=True), extra_tokens=0):
            input_ids, mask = self._left_pad(batch)
            logits = self.model(
                input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
            ).logits
            for b, row in enumerate(batch):
                predicted = logits[b, -len(row) : -1].float()
                targets = input_ids[b, -len(row) + 1 :]
                total_nats += float(torch.nn.functional.cross_entropy(predicted, targets, reduction="sum"))
                total_tokens += len(row) - 1
        return total_nats, total_tokens

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` with the tokenizer's default special tokens (a leading BOS for
        Llama-style tokenizers), as one document of a perplexity stream."""
        return self.tokenizer.encode(text)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        whole = self.tokenizer.encode(context + continuation)
        context_ids = self.tokenizer.encode(context)
        return context_ids, whole[len(context_ids) :]

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a generation prompt as the model sees it: `prompt.chat` through the chat
        template (system turn folded into the first user turn when the template refuses it), or
        `prompt.plain` with the tokenizer's default special tokens."""
        if not self.chat:
            return self.tokenizer.encode(prompt.plain)
        try:
            text = self.tokenizer.apply_chat_template(list(prompt.chat), tokenize=False, add_generation_prompt=True)
        except jinja2.TemplateError:
            # Templates without a system role (Mistral v1, Gemma) raise; fold it into the first turn.
            system, first, *rest = prompt.chat
            merged = {"role": first["role"], "content": f"{system['content']}\n\n{first['content']}"}
            text = self.tokenizer.apply_chat_template([merged, *rest], tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _batches(self, rows: Sequence[tuple[int, ...]], extra_tokens: int) -> Iterator[list[tuple[int, ...]]]:
        """Consecutive runs of `rows` (sorted longest first) whose padded size, rows x (first
        length + extra_tokens), stays within `batch_tokens`; at least one row each."""
        batch: list[tuple[int, ...]] = []
        for row in rows:
            if batch and (len(batch) + 1) * (len(batch[0]) + extra_tokens) > self.batch_tokens:
                yield batch
                batch = []
            batch.append(row)
        if batch:
            yield batch

    def _left_pad(self, rows: Sequence[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            input_ids[b, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[b, width - len(row) :] = 1
        return input_ids.to(self.device), mask.to(self.device)
