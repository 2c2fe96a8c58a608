"""Batches of prompts of different lengths: each prompt gets the logits it gets alone, whether
the batch is padded on the left or the right."""

import pytest
import torch
from conftest import make_model

from lens.tokenizer import Tokenizer

PROMPTS = ["Hello world", "The quick brown fox jumps over", "a"]


@pytest.fixture(scope="module")
def model():
    m = make_model(d_vocab=50257, n_ctx=32, d_model=16, n_heads=2)
    m.tokenizer = Tokenizer.gpt2()
    return m


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_prompt_alone(model, side):
    tokens, mask = model.to_tokens_with_mask(PROMPTS, padding_side=side)
    with torch.no_grad():
        batched = model(tokens, attention_mask=mask)
        materialised, cache = model.run_with_cache(tokens, attention_mask=mask)
        for i, prompt in enumerate(PROMPTS):
            alone = model(prompt)[0]
            real = mask[i].bool()
            torch.testing.assert_close(batched[i][real], alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(materialised[i][real], alone, atol=1e-5, rtol=1e-5)
            pattern = cache["pattern", 0][i][:, real][:, :, real]  # real queries attend to real keys only
            torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))


def test_strings_are_padded_and_masked_by_forward(model):
    with torch.no_grad():
        logits = model(PROMPTS)
        loss = model(PROMPTS, return_type="loss")
    tokens, mask = model.to_tokens_with_mask(PROMPTS)
    torch.testing.assert_close(logits, model(tokens, attention_mask=mask))
    torch.testing.assert_close(loss, model(tokens, attention_mask=mask, return_type="loss"))
    assert torch.isfinite(loss)


def test_loss_ignores_padding(model):
    tokens, mask = model.to_tokens_with_mask(PROMPTS, padding_side="left")
    with torch.no_grad():
        per_token = model(tokens, attention_mask=mask, return_type="loss", loss_per_token=True)
        loss = model(tokens, attention_mask=mask, return_type="loss")
    # the real predictions: made at a real token, of a real token (a left pad's guess at the
    # first token is not one)
    real = mask.bool()
    torch.testing.assert_close(loss, per_token[real[:, 1:] & real[:, :-1]].mean())


def test_mask_of_the_wrong_shape(model):
    tokens, mask = model.to_tokens_with_mask(PROMPTS)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(tokens, attention_mask=mask[:, :-1])
