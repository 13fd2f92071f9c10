"""
Answering questions with a loaded VLM (vlm.Parts), in batches: greedy KV-cached generation, the
first answer token's logits over option letters, and the log-probability of given answers.
Every method takes optional histories: per question the earlier (question, answer) turns of its
conversation, given as they are (teacher-forced). An image None is a text-only question.
eval.py and training's validation both answer through it.
"""
import math

import torch

from data.collate import ImageCache, to_device, vlm_batch
from evaluation.scoring import MC_LETTERS


class Answerer:
    """Batched answering with a loaded model (vlm.Parts, e.g. from vlm.load_run): greedy
    KV-cached generation, and multiple choice by letter or option likelihood. Prompts are built
    as in training (data.collate.vlm_batch, left padding for generation)."""

    def __init__(self, parts, bf16=False, batch_size=32, max_len=None, max_new_tokens=16):
        self.parts, self.bf16, self.batch_size = parts, bf16, batch_size
        self.max_len, self.max_new_tokens = max_len, max_new_tokens
        self.device = next(parts.model.parameters()).device
        self.pixels = ImageCache(parts.processor)  # paths (cached) or PIL images -> (B, 3, H, W)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def batch(self, images, questions, answers=None, histories=None) -> dict:
        """One batch on the model's device (data.collate.vlm_batch): generation prompts, or,
        given answers, prompt + answer rows with labels on the answers (to score them; the
        histories' answers are not labelled)."""
        batch = vlm_batch(self.parts, self.pixels, images, questions, answers, self.max_len,
                          histories=histories)
        return to_device(batch, self.device)

    def chunks(self, *columns):
        for i in range(0, len(columns[0]), self.batch_size):
            yield [c[i:i + self.batch_size] for c in columns]

    @torch.no_grad()
    def generate(self, images, questions, histories=None) -> list[str]:
        out = []
        for imgs, qs, hs in self.chunks(images, questions, histories or [[]] * len(questions)):
            with self.autocast():
                ids = self.parts.model.generate(self.batch(imgs, qs, histories=hs),
                                                self.max_new_tokens,
                                                stop_ids=self.parts.tok.stop_ids)
            out += [self.parts.tok.decode(row).strip() for row in ids]
        return out

    def letter_ids(self, n: int) -> list[int]:
        ids = [self.parts.tok.encode(letter) for letter in MC_LETTERS[:n]]
        if any(len(i) != 1 for i in ids):
            raise ValueError(f"option letters are not single tokens for this tokenizer: {ids}")
        return [i[0] for i in ids]

    @torch.no_grad()
    def first_token_logits(self, batch) -> torch.Tensor:
        """Logits of the first answer token, from one prefill -> (B, V)."""
        model = self.parts.model
        last = torch.zeros_like(batch["attn_mask"], dtype=torch.bool)
        last[:, -1] = True
        return model.run_llm(model.embed(batch), batch["image_mask"].long(),
                             attn_mask=batch["attn_mask"], logits_at=last).float()

    def choose_letters(self, images, questions, n_options, histories=None) -> list[str]:
        """Multiple choice by letter likelihood: per row, the option letter among the first
        n_options whose token the model scores highest as the first answer token."""
        ids = self.letter_ids(max(n_options))
        out = []
        for imgs, qs, ns, hs in self.chunks(images, questions, list(n_options),
                                            histories or [[]] * len(questions)):
            with self.autocast():
                first = self.first_token_logits(self.batch(imgs, qs, histories=hs))  # (B, V)
            logits = first[:, ids]                                                # (B, L)
            n = torch.tensor(ns, device=logits.device)[:, None]                  # (B, 1)
            allowed = torch.arange(len(ids), device=logits.device) < n           # (B, L)
            best = logits.masked_fill(~allowed, -math.inf).argmax(-1)            # (B,)
            out += [MC_LETTERS[i] for i in best.tolist()]
        return out


    @torch.no_grad()
    def answer_logprobs(self, images, questions, answers, histories=None) -> list[float]:
        """Summed log-probability of each answer (its tokens and the end-of-turn token) as the
        model's reply to its question about its image."""
        model, out = self.parts.model, []
        for imgs, qs, ans, hs in self.chunks(images, questions, answers,
                                             histories or [[]] * len(questions)):
            batch = self.batch(imgs, qs, ans, hs)
            labels = batch["labels"]                                         # (B, T)
            at = torch.zeros_like(labels, dtype=torch.bool)
            at[:, :-1] = labels[:, 1:] != -100            # position t predicts token t+1
            with self.autocast():
                logits = model.run_llm(model.embed(batch), batch["image_mask"].long(),
                                       logits_at=at).float()                # (N, V)
            targets = labels[:, 1:][at[:, :-1]]                              # (N,)
            logp = logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]  # (N,)
            rows = at.nonzero()[:, 0]                                        # (N,)
            out += torch.zeros(len(qs), device=logp.device).index_add_(0, rows, logp).tolist()
        return out

    def choose_options(self, images, stems, options, histories=None) -> list[str]:
        """Multiple choice by option likelihood: per row, the letter of the option text the
        model finds most likely as its answer to the bare question (no option list)."""
        histories = histories or [[]] * len(stems)
        flat = [(img, stem, opt, history) for img, stem, opts, history
                in zip(images, stems, options, histories) for opt in opts]
        scores = self.answer_logprobs(*map(list, zip(*flat)))
        out, start = [], 0
        for opts in options:
            row = scores[start:start + len(opts)]
            out.append(MC_LETTERS[row.index(max(row))])
            start += len(opts)
        return out
