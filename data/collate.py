"""
Turning samples into model inputs: the chat conversation with the image placeholder expanded to
the model's visual-token count, labels that are -100 everywhere but the answers, and batching
(right padding for training, left padding for generation).

One example, as token positions (a text-only row has no visual positions):
    [system + user header] [visual x Nv] [question + assistant header] [answer + end]
    labels: -100 ...          -100 ...        -100 ...                  answer ids, end id
A multi-turn conversation continues with [user header + question + assistant header]
[answer + end] for each later turn, every answer labelled (the prompts and markup -100), as
LLaVA supervises every assistant turn.
"""
import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

from data.dataset import DataError, load_image

IMAGE = "<image>"
QUESTION = "<question>"  # where each question goes in the rendered template
ANSWER = "<answer>"      # where each earlier answer goes


@dataclass
class Encoded:
    input_ids: list        # token ids; 0 at visual positions (overwritten by the model)
    image_mask: list       # 1 at the Nv visual positions
    labels: list           # -100 except the answers' tokens and their end-of-turn tokens


def encode_example(tok, system: str, question: str, answer: str | None, n_visual: int,
                   max_len: int | None = None) -> Encoded:
    """One turn (see encode_conversation): answer=None encodes a generation prompt."""
    return encode_conversation(tok, system, [(question, answer)], n_visual, max_len)


def encode_conversation(tok, system: str, turns: list, n_visual: int, max_len: int | None = None,
                        label_history: bool = True) -> Encoded:
    """The model's own chat format for turns [(question, answer), ...] with the image (n_visual
    positions; 0 for a text-only row) before the first question. The last answer None encodes a
    generation prompt. Every answer (its tokens and the end-of-turn token) is labelled, or with
    label_history=False only the last one (scoring an answer given the earlier turns).
    Truncation rule: an over-long first turn loses tokens from the end of its question, never
    the chat markup or the answer (a first turn whose answer, image and markup alone exceed
    max_len is an error that says so); later turns that do not fit are dropped whole in
    training, while a generation prompt or a scored last answer must fit whole (an error
    otherwise)."""
    head, segments = chat_segments(tok, system, turns, n_visual > 0)
    whole = turns[-1][1] is None or not label_history
    segments = fit(segments, math.inf if max_len is None else max_len, len(head), n_visual, whole)
    ids = head + [0] * n_visual
    labels = [-100] * len(ids)
    for k, (prompt, reply) in enumerate(segments):
        labelled = label_history or k == len(turns) - 1
        ids += prompt + reply
        labels += [-100] * len(prompt) + (reply if labelled else [-100] * len(reply))
    image_mask = [0] * len(head) + [1] * n_visual
    return Encoded(ids, image_mask + [0] * (len(ids) - len(image_mask)), labels)


def chat_segments(tok, system: str, turns: list, image: bool) -> tuple[list, list]:
    """(head ids, one (markup, question, header, reply) id lists per turn), from the template
    rendered once with placeholders (every answer one, so each turn's closing text is known) and
    cut at them. markup: the end of the previous turn and the user header (none for the first
    turn, whose markup between the image and the question is encoded with the question);
    question: plain text, never special tokens; header: the assistant header; reply: the answer,
    the template's text up to the end-of-turn token (Llama-2's " "), and that token's id (none
    for a generation prompt). Spaces the template puts before a question or an answer go with
    it, as a space belongs to the word after it (SentencePiece's "▁word", GPT-2's " word"), and
    pieces that continue text are encoded as continuing (no SentencePiece "▁" in front), so a
    text-only conversation gets the ids of its whole rendered text."""
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": f"{IMAGE}\n{QUESTION}" if image else QUESTION}]
    for _ in turns[1:]:
        messages += [{"role": "assistant", "content": ANSWER}, {"role": "user", "content": QUESTION}]
    text = tok.render_chat(messages + [{"role": "assistant", "content": ANSWER}],
                           add_generation_prompt=False)
    before, rest = text.split(IMAGE if image else QUESTION, 1)
    between, lead = "", ""
    if image:
        between, rest = rest.split(QUESTION, 1)
    else:
        before, lead = split_spaces(before)
    pieces = re.split(f"{QUESTION}|{ANSWER}", rest)      # header, after answer, header, ...
    end_of_turn = tok.decode([tok.stop_ids[0]])
    closings = [after.partition(end_of_turn) if end_of_turn in after else ("", "", after)
                for after in pieces[1::2]]               # (reply text, end of turn, markup)
    segments, markup = [], ""
    for k, ((question, answer), header, (tail, _, next_markup)) in enumerate(
            zip(turns, pieces[0::2], closings)):
        header, answer_lead = split_spaces(header)
        first = tok.encode(between + question) if image and k == 0 else \
            tok.encode(lead + question, continuing=True)
        segments.append((tok.encode(markup, allow_special=True), first,
                         tok.encode(header, allow_special=True, continuing=True),
                         [] if answer is None else
                         tok.encode(answer_lead + answer + tail, continuing=True) + [tok.stop_ids[0]]))
        markup, lead = split_spaces(next_markup)
    return tok.encode(before, allow_special=True), segments


def split_spaces(text: str) -> tuple[str, str]:
    """(text without its trailing spaces, those spaces)."""
    kept = text.rstrip(" ")
    return kept, text[len(kept):]


def fit(segments: list, max_len: int, n_head: int, n_visual: int,
        whole: bool) -> list[tuple[list, list]]:
    """(prompt, reply) id lists per turn within max_len, by encode_conversation's truncation
    rule (whole: no later turn may be dropped); n_head and n_visual tokens come before the first
    turn."""
    (markup, question, header, reply), *later = segments
    fixed = n_head + n_visual + len(markup) + len(header) + len(reply)
    if fixed + len(question) > max_len:
        if fixed > max_len:
            raise ValueError(f"answer ({len(reply)} tokens), image ({n_visual}) and chat markup "
                             f"do not fit in max_len={max_len}")
        question = question[:max_len - fixed]
    out = [(markup + question + header, reply)]
    used = fixed + len(question)
    for markup, question, header, reply in later:
        size = len(markup) + len(question) + len(header) + len(reply)
        if used + size > max_len:
            if whole:
                raise ValueError(f"the earlier turns and the question ({used + size} tokens) do "
                                 f"not fit in max_len={max_len}")
            break
        out.append((markup + question + header, reply))
        used += size
    return out


def pad_batch(examples: list[Encoded], left: bool = False) -> dict:
    """Stack examples into (B, T) tensors. Right padding (training) needs no attention mask:
    pads sit after every real token and carry label -100. Left padding (generation) returns
    attn_mask so positions and attention skip the pads."""
    T = max(len(e.input_ids) for e in examples)

    def pad(seq, value):
        fill = [value] * (T - len(seq))
        return fill + seq if left else seq + fill

    out = {"input_ids": torch.tensor([pad(e.input_ids, 0) for e in examples]),
           "image_mask": torch.tensor([pad(e.image_mask, 0) for e in examples], dtype=torch.bool),
           "labels": torch.tensor([pad(e.labels, -100) for e in examples])}
    if left:
        out["attn_mask"] = torch.tensor([pad([1] * len(e.input_ids), 0) for e in examples])
    return out


def vlm_batch(parts, pixels, images, questions, answers=None, max_len=None, row_ids=None,
              histories=None, label_history=False) -> dict:
    """One batch for a VLM (vlm.Parts: model, tok, wordpiece), on the CPU: left-padded
    generation prompts, or, given answers, right-padded prompt + answer rows with labels on the
    answers (training, scoring). histories: per row the (question, answer) turns before its
    question (teacher-forced), labelled too when label_history (training). An image None is a
    text-only row: no visual tokens. pixels: an ImageCache; "pixels" holds the image rows'
    alone, in order, and is absent when no row has an image. CROME's Q-Former reads each image
    row's first question as its instruction (ours for multi-turn rows: one instruction per
    image). An example that cannot fit max_len is a DataError naming its row (row_ids, else its
    position)."""
    model, tok = parts.model, parts.tok
    answers = answers or [None] * len(questions)
    histories = histories or [[]] * len(questions)
    encoded = []
    for i, (image, question, answer, history) in enumerate(zip(images, questions, answers,
                                                                histories)):
        n_visual = 0 if image is None else model.n_visual
        try:
            encoded.append(encode_conversation(tok, model.cfg.system_prompt,
                                               list(history) + [(question, answer)], n_visual,
                                               max_len, label_history))
        except ValueError as e:
            row = row_ids[i] if row_ids else f"row {i}"
            raise DataError(f"sample {row}: {e}; raise --max-len or drop the row") from None
    batch = pad_batch(encoded, left=answers[0] is None)
    with_image = [i for i, image in enumerate(images) if image is not None]
    if with_image:
        batch["pixels"] = pixels([images[i] for i in with_image])
    if with_image and parts.wordpiece is not None:
        first = [histories[i][0][0] if histories[i] else questions[i] for i in with_image]
        batch["instr_ids"], batch["instr_mask"] = parts.wordpiece(
            first, max_length=model.cfg.max_instruction_len)
    if answers[0] is not None:
        batch["shared_prefix"] = shared_prefix(batch)
    return batch


def shared_prefix(batch) -> int:
    """How many leading positions of a right-padded batch every row shares (same token, not an
    image position, no logit needed there): the chat template's opening, e.g. ChatML's
    "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n" (8 tokens of SmolLM2's 37 here).
    VLM.forward computes it once when nothing trainable touches it."""
    ids, labels = batch["input_ids"], batch["labels"]                       # (B, T)
    T = ids.shape[1]
    same = (ids == ids[:1]).all(0) & ~batch["image_mask"].any(0) & (labels == -100).all(0)
    n = int(same.long().cumprod(0).sum())
    if n < T and bool((labels[:, n] != -100).any()):
        n -= 1      # position n-1 predicts the answer token n: its logit is needed
    return max(0, min(n, T - 1))     # at least one position left to run


def to_device(batch: dict, device) -> dict:
    """A batch's tensors moved to device; its other values (counts) as they are."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


class ImageCache:
    """Preprocessed pixels per image path, decoded once (small datasets fit in memory). PIL
    images passed in directly are processed each time and not cached. Given a view (training
    augmentation: decoded image -> another image, e.g. image_processor.turned with its rng),
    each image is a new view of the decoded image, processed each time."""

    def __init__(self, processor):
        self.processor, self.cache, self.decoded = processor, {}, {}

    def __call__(self, images, view: Callable[[Image.Image], Image.Image] | None = None) -> torch.Tensor:
        out = []
        for img in images:
            if view is not None:
                out.append(self.processor([view(self.decode(img))])[0])
            elif isinstance(img, Image.Image):
                out.append(self.processor([img])[0])
            else:
                if img not in self.cache:
                    self.cache[img] = self.processor([load_image(img)])[0]
                out.append(self.cache[img])
        return torch.stack(out)  # (B, 3, H, W)

    def decode(self, img) -> Image.Image:
        """A path's decoded image, kept for the next random view; a PIL image as it is."""
        if isinstance(img, Image.Image):
            return img
        if img not in self.decoded:
            self.decoded[img] = load_image(img)
        return self.decoded[img]
