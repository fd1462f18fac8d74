"""Tiny models and tokenizers built in code, for tests (nothing comes from the Hugging Face hub).

The tokenizer is byte-level: every byte is one token (256 of them) plus the Qwen2 chat specials,
so any UTF-8 text round-trips and prompts from the real datasets tokenize without an unknown token.
The model is a 2-layer Qwen2 (head dim 32) of ~100k parameters: a forward pass takes milliseconds.
"""

from __future__ import annotations

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

PAD, IM_START, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# Qwen2's chat template without tools: "<|im_start|>role\ncontent<|im_end|>\n" per turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: ids 0..255 are the 256 byte symbols, then <|endoftext|> (pad), <|im_start|>,
    <|im_end|> (EOS)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: ord(c))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: one pre-token per text, then BPE without merges = one token per byte.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (PAD, IM_START, EOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,  # no truncation warnings on long test prompts
    )


def tiny_model(vocab_size: int = 259, *, seed: int = 0, tokenizer=None, num_hidden_layers: int = 2):
    """A random-init Qwen2ForCausalLM (fp32, eval mode) that is fast on CPU.

    With `tokenizer` given, its size and pad/EOS ids are used, so `generate` and `save_pretrained`
    see consistent special tokens.
    """
    pad_id = eos_id = None
    if tokenizer is not None:
        vocab_size = len(tokenizer)
        pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,  # head_dim = 32
        num_key_value_heads=1,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    # Random init gives near-uniform next-token distributions; a larger output scale makes sampling
    # peaked enough that temperature / top-k / top-p visibly change what is drawn.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    if eos_id is not None:
        model.generation_config.eos_token_id = eos_id
        model.generation_config.pad_token_id = pad_id
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# Fakes for the loop's components (tests of gdpo.sampling / gdpo.trainer without a model).


class FakeRolloutEngine:
    """Returns completions "p<prompt id>s<sample>c<call>" of 2-3 tokens; counts its calls."""

    pad_id = 0

    def __init__(self, group_size_check: int | None = None):
        self.calls = 0
        self.group_size_check = group_size_check

    def generate(self, prompt_ids: list[list[int]], n: int):
        from gdpo.rollout.types import RolloutBatch

        self.calls += 1
        rows = len(prompt_ids) * n
        lengths = torch.tensor([2 + (i % 2) for i in range(rows)])
        comp = torch.arange(1, 4).repeat(rows, 1) * (torch.arange(3)[None, :] < lengths[:, None])
        width = max(len(p) for p in prompt_ids)
        prompts = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompt_ids for _ in range(n)])
        return RolloutBatch(
            prompt_ids=prompts, prompt_mask=(prompts != 0).long(), completion_ids=comp,
            completion_mask=(comp != 0).long(), completion_lengths=lengths, truncated=lengths == 3,
            completion_texts=[f"p{prompt_ids[i // n][0]}s{i % n}c{self.calls}" for i in range(rows)],
            group_size=n, stats={"rollout/seconds": 0.5, "rollout/completion_tokens": float(lengths.sum())},
        )

    def sync_weights(self, model) -> None:
        pass


class FakeScorer:
    """A reward bank whose K rewards are ``fn(prompt_text, completion_text) -> list of K floats``."""

    def __init__(self, names: list[str], fn):
        self.names = list(names)
        self.weights = [1.0] * len(names)
        self.fn = fn
        self.calls = 0

    def score(self, prompts, completions, completion_lengths=None, columns=None):
        from gdpo.rewards.bank import RewardResult

        self.calls += 1
        matrix = torch.tensor([self.fn(p, c) for p, c in zip(prompts, completions)], dtype=torch.float32)
        zero = {n: 0 for n in self.names}
        return RewardResult(matrix, self.names, self.weights, {n: 0.01 for n in self.names}, dict(zero), dict(zero))


class FakePrompts:
    """``next()`` yields the next ``per_call`` one-token prompts: ids [k + 1], texts "q<k + 1>", k = 0, 1, ..."""

    def __init__(self, per_call: int, start: int = 0):
        self.per_call, self.start = per_call, start

    def next(self):
        from gdpo.data import PromptBatch

        ids = list(range(self.start, self.start + self.per_call))
        self.start += self.per_call
        return PromptBatch(indices=ids, prompt_ids=[[i + 1] for i in ids], prompt_texts=[f"q{i + 1}" for i in ids],
                           answers=[None] * len(ids), extras={})


def save_model_with_extra_eos(path, prompt_ids: list[int], *, seed: int = 0) -> int:
    """Save a tiny Qwen2 + its tokenizer to `path` whose generation_config.json lists, after the tokenizer's EOS,
    a second EOS id the tokenizer does not know as EOS (as Qwen2.5-Instruct's lists 151645 and 151643): the
    token greedy decoding picks first after `prompt_ids`. Returns that id; a backend that honours the
    generation config stops every greedy row of that prompt after one token."""
    tok = tiny_tokenizer()
    model = tiny_model(tokenizer=tok, seed=seed)
    with torch.no_grad():
        top = model(input_ids=torch.tensor([prompt_ids])).logits[0, -1].topk(2)
    extra = int(top.indices[0])
    if extra == tok.eos_token_id or float(top.values[0] - top.values[1]) < 0.5:
        raise ValueError("pick another prompt or seed: the greedy first token is EOS or not clear-cut")
    model.generation_config.eos_token_id = [tok.eos_token_id, extra]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return extra


# A few hundred common words, so that word_tokenizer's ids vary a little (everything else is <unk>).
_WORDS = ("the a an of to and in is it that for on with as be by this are or your you can if at from not all "
          "answer final step think reasoning output format integer number python code function write test tool "
          "call user assistant system problem solution return def assert print true false none let's within boxed")


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer that counts tokens like a real BPE on English text (about one per word or punctuation run),
    with Qwen2's chat template and specials (<|endoftext|> pad, <|im_start|>, <|im_end|> EOS): words outside a
    small vocabulary are <unk>. For tests that check prompt lengths against real limits (data.max_prompt_tokens)
    where the byte-level `tiny_tokenizer` would make every prompt ~4x too long. It does not round-trip text."""
    vocab = {"<unk>": 0}
    for w in _WORDS.split():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (PAD, IM_START, EOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token=PAD,
        eos_token=EOS,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
    )
