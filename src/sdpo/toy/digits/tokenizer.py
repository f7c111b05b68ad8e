"""The word-level tokenizer of the digit prompts, shared by both worlds (the moving one adds its words)."""

from __future__ import annotations

from typing import Any

from sdpo.toy.digits.data import DIGIT_WORDS, NUM_CLASSES, PROMPT_TEMPLATE

PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)


def vocabulary() -> list[str]:
    """The tokenizer's words: special tokens, the words of the digit prompt template and the ten numerals."""
    template_words = PROMPT_TEMPLATE.replace("{digit}", "").split()
    words = [*SPECIAL_TOKENS, *template_words, *(str(d) for d in range(NUM_CLASSES))]
    return list(dict.fromkeys(words))


def build_tokenizer(max_length: int, extra_words: tuple[str, ...] = ()) -> Any:
    """A word-level fast tokenizer: lower-cased, whitespace split, [BOS] ... [EOS], padded with [PAD].

    Digit words are rewritten to numerals before the split ("seven" -> "7"), so the model, trained
    on numerals only, understands every prompt ``parse_digit`` accepts. ``extra_words`` (a world's
    own words, e.g. the motion directions) are added as whole-word tokens after the base vocabulary.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    core.normalizer = normalizers.Sequence(
        [
            normalizers.Lowercase(),
            *(normalizers.Replace(Regex(rf"\b{word}\b"), str(d)) for d, word in enumerate(DIGIT_WORDS)),
        ]
    )
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN]), (EOS_TOKEN, vocab[EOS_TOKEN])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=max_length,
    )
    if extra_words:
        tokenizer.add_tokens([AddedToken(word, single_word=True) for word in extra_words])
    return tokenizer
