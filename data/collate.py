"""
Turning samples into model inputs: the chat prompt with the image placeholder expanded to the
model's visual-token count, labels that are -100 everywhere but the answer, and batching
(right padding for training, left padding for generation).

One example, as token positions:
    [system + user header] [visual x Nv] [question + assistant header] [answer + end]
    labels: -100 ...          -100 ...        -100 ...                  answer ids, end id
"""
from dataclasses import dataclass

import torch
from PIL import Image

from data.dataset import DataError, load_image

IMAGE = "<image>"
QUESTION = "<question>"  # where the question goes in the rendered template


@dataclass
class Encoded:
    input_ids: list        # token ids; 0 at visual positions (overwritten by the model)
    image_mask: list       # 1 at the Nv visual positions
    labels: list           # -100 except the answer tokens and the end-of-turn token


def encode_example(tok, system: str, question: str, answer: str | None, n_visual: int,
                   max_len: int | None = None) -> Encoded:
    """The model's own chat format with the image before the question. answer=None encodes a
    generation prompt (no labels). Truncation rule: an over-long example loses tokens from the
    end of the question, never the chat markup or the answer; an example whose answer, image
    and markup alone exceed max_len is an error that says so."""
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": f"{IMAGE}\n{QUESTION}"}]
    before, rest = tok.render_chat(messages, add_generation_prompt=True).split(IMAGE, 1)
    between, after = rest.split(QUESTION, 1)
    head = tok.encode(before, allow_special=True)
    query = tok.encode(between + question)
    tail = tok.encode(after, allow_special=True)
    reply = [] if answer is None else tok.encode(answer) + [tok.stop_ids[0]]
    fixed = len(head) + n_visual + len(tail) + len(reply)
    if max_len is not None and fixed + len(query) > max_len:
        if fixed > max_len:
            raise ValueError(f"answer ({len(reply)} tokens), image ({n_visual}) and chat markup "
                             f"do not fit in max_len={max_len}")
        query = query[:max_len - fixed]
    ids = head + [0] * n_visual + query + tail + reply
    image_mask = [0] * len(head) + [1] * n_visual + [0] * (len(query) + len(tail) + len(reply))
    labels = [-100] * (len(ids) - len(reply)) + reply
    return Encoded(ids, image_mask, labels)


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


def vlm_batch(parts, pixels, images, questions, answers=None, max_len=None, row_ids=None) -> dict:
    """One batch for a VLM (vlm.Parts: model, tok, wordpiece), on the CPU: left-padded
    generation prompts, or, given answers, right-padded prompt + answer rows with labels on the
    answers (training, scoring). pixels: an ImageCache. CROME's Q-Former also reads each
    question as its instruction. An example that cannot fit max_len is a DataError naming its
    row (row_ids, else its position)."""
    model, tok = parts.model, parts.tok
    answers = answers or [None] * len(questions)
    encoded = []
    for i, (question, answer) in enumerate(zip(questions, answers)):
        try:
            encoded.append(encode_example(tok, model.cfg.system_prompt, question, answer,
                                          model.n_visual, max_len))
        except ValueError as e:
            row = row_ids[i] if row_ids else f"row {i}"
            raise DataError(f"sample {row}: {e}; raise --max-len or drop the row") from None
    batch = pad_batch(encoded, left=answers[0] is None)
    batch["pixels"] = pixels(images)
    if parts.wordpiece is not None:
        batch["instr_ids"], batch["instr_mask"] = parts.wordpiece(
            list(questions), max_length=model.cfg.max_instruction_len)
    return batch


class ImageCache:
    """Preprocessed pixels per image path, decoded once (small datasets fit in memory). PIL
    images passed in directly are processed each time and not cached."""

    def __init__(self, processor):
        self.processor, self.cache = processor, {}

    def __call__(self, images) -> torch.Tensor:
        out = []
        for img in images:
            if isinstance(img, Image.Image):
                out.append(self.processor([img])[0])
                continue
            if img not in self.cache:
                self.cache[img] = self.processor([load_image(img)])[0]
            out.append(self.cache[img])
        return torch.stack(out)  # (B, 3, H, W)
