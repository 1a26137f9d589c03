"""The model learns where documents and assistant turns end: EOS positions carry labels in the batches the cpt
and sft stages train on, also when the tokenizer has no pad token and pads with its EOS, and with packing.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/trainer/test_eos.py -q
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kubetune_trainer import modeling, tiny
from kubetune_trainer.stages import cpt

from .stage_helpers import build, make_job


@pytest.fixture(scope="module")
def eos_padded_model(tmp_path_factory) -> Path:
    """The tiny model with its pad token removed, like Llama/Mistral checkpoints: load_tokenizer must then
    pad with EOS (it has no unk token either)."""
    from transformers import AutoTokenizer

    src = tiny.cached_model()
    dest = tmp_path_factory.mktemp("no-pad-model")
    for f in src.iterdir():
        if not f.name.startswith("tokenizer") and f.name != "special_tokens_map.json":
            shutil.copy(f, dest / f.name)
    tok = AutoTokenizer.from_pretrained(src)
    tok.pad_token = None
    tok.save_pretrained(dest)
    return dest


def _tokenizer(path: Path):
    tok = modeling.load_tokenizer(path, make_job("sft", fmt="chat").spec)
    assert tok.pad_token_id == tok.eos_token_id, "the fixture must exercise pad == eos"
    return tok


def _labelled_eos(batch, eos: int) -> list[int]:
    """Per row: how many EOS tokens the loss sees (label == EOS at a real, unpadded position)."""
    ids, labels = batch["input_ids"], batch["labels"]
    real = batch["attention_mask"].bool() if "attention_mask" in batch else ids.new_ones(ids.shape).bool()
    return [int(((ids[r] == eos) & (labels[r] == eos) & real[r]).sum()) for r in range(ids.shape[0])]


def _texts(n: int) -> list[dict]:
    return [{"text": t} for t in _domain(n)]


def _domain(n: int) -> list[str]:
    import random

    rng = random.Random(0)
    # Documents of different lengths, so that unpacked batches need padding.
    return [" ".join(tiny.domain_sentence(rng) for _ in range(1 + i % 3)) for i in range(n)]


def test_cpt_unpacked_batches_label_every_document_end_and_mask_only_padding(eos_padded_model):
    import datasets

    tok = _tokenizer(eos_padded_model)
    ds = datasets.Dataset.from_list(_texts(6))
    features = list(cpt.tokenize_texts(ds, tok, max_length=128, packing=False))
    batch = cpt.collator(tok)(features)
    assert batch["attention_mask"].min() == 0, "rows of different lengths: the batch must contain padding"
    assert _labelled_eos(batch, tok.eos_token_id) == [1] * 6  # each document's own EOS
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == -100).all()
    assert (batch["labels"][~pad] == batch["input_ids"][~pad]).all()


def test_cpt_packed_blocks_label_the_eos_between_documents(eos_padded_model):
    import datasets

    tok = _tokenizer(eos_padded_model)
    ds = datasets.Dataset.from_list(_texts(40))
    blocks = list(cpt.tokenize_texts(ds, tok, max_length=48, packing=True))
    batch = cpt.collator(tok)(blocks)
    eos_in_blocks = int((batch["input_ids"] == tok.eos_token_id).sum())
    assert eos_in_blocks >= 20  # the packed stream still holds the documents' ends ...
    assert sum(_labelled_eos(batch, tok.eos_token_id)) == eos_in_blocks  # ... and every one is a target
    assert (batch["labels"] != -100).all()  # packed blocks have no padding at all


@pytest.mark.parametrize("fmt,packing", [("chat", False), ("chat", True), ("prompt_completion", False)])
def test_sft_batches_label_the_eos_that_ends_each_answer(tmp_path, eos_padded_model, fmt, packing):
    _, ctx, trainer = build("sft", "lora", tmp_path, model_path=eos_padded_model, fmt=fmt, n_train=8,
                            training={"packing": packing, "batchSize": 4})
    eos = ctx.tokenizer.eos_token_id
    batch = next(iter(trainer.get_train_dataloader()))
    counts = _labelled_eos(batch, eos)
    if packing:  # padding-free: one row holding several examples, one answer (and one EOS) each
        assert len(counts) == 1 and counts[0] == int((batch["position_ids"] == 0).sum())
    else:
        assert counts == [1] * len(counts)
    # Only the answers train: no label on the prompt side (fewer labelled tokens than real ones).
    assert int((batch["labels"] != -100).sum()) < int(batch["input_ids"].numel())
