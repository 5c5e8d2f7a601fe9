"""The causal-LM loss without full logits: equal to the plain loss and its gradients; ignored rows never projected."""

import pytest
import torch

from sft_cli.config.recipe import load_recipe
from sft_cli.model import backbone as bb
from sft_cli.model.lm_loss import CausalLMLoss, linear_cross_entropy, plain_loss
from sft_cli.tasks.registry import build_task
from tests.conftest import DOCS, REPO, read_jsonl, write_jsonl, write_recipe

# (loss rtol, gradient error / the largest gradient): fp32 agrees to rounding; bf16 keeps ~3 significant digits
TOLERANCE = {None: (1e-5, 1e-6), torch.bfloat16: (2e-3, 1e-2)}


def task_for(tmp_path, tiny_decoder, unlabeled=None, **sections):
    chat = write_jsonl(tmp_path / "chat.jsonl", read_jsonl(REPO / "data" / "stdlib-chat" / "train.jsonl")[:16])
    values = {
        "task": "generation",
        "backbone": {"name": str(tiny_decoder)},
        "data": {"train": str(chat), "chat_template": "chatml", "max_length": 96, "unlabeled": unlabeled},
        "engine": {"device": "cpu", "precision": "fp32"},
        "output": {"dir": str(tmp_path / "run")},
        **sections,
    }
    if values["task"] == "language-modeling":
        values["data"] = {"train": str(DOCS / "eval.txt"), "max_length": 48}
    task = build_task(load_recipe(write_recipe(tmp_path / "r.yaml", values)))
    task.setup(train=True)
    return task


def compare(task, batch, terms_name, dtype):
    """The task's loss (chunked) against the same task with full logits: values and every gradient."""
    assert task.chunked and isinstance(task.model, CausalLMLoss)
    network = bb.unwrap(task.model)
    results = []
    for chunked in (True, False):
        task.chunked = chunked
        model = task.model if chunked else network
        network.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            summed, _ = task.loss_terms(model, batch)[terms_name]
        summed.backward()
        results.append(
            (summed.item(), {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None})
        )
    task.chunked = True
    (ours, ours_grads), (plain, plain_grads) = results
    loss_tol, grad_tol = TOLERANCE[dtype]
    assert ours == pytest.approx(plain, rel=loss_tol)
    assert ours_grads.keys() == plain_grads.keys() and ours_grads
    for name, grad in plain_grads.items():
        assert (ours_grads[name] - grad).abs().max() <= grad_tol * grad.abs().max() + 1e-9, name


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_generation_chat_loss_equals_the_plain_loss_and_gradients(tmp_path, tiny_decoder, dtype):
    task = task_for(tmp_path, tiny_decoder)
    batch = task.collate([task.train_set[i] for i in range(4)], train=True)
    compare(task, batch, "sup", dtype)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_pretraining_loss_equals_the_plain_loss_and_gradients(tmp_path, tiny_decoder, dtype):
    task = task_for(tmp_path, tiny_decoder, task="language-modeling")
    batch = task.collate([task.train_set[i] for i in range(4)], train=True)
    compare(task, batch, "lm", dtype)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_loss_mix_lm_term_equals_the_plain_loss_and_gradients(tmp_path, tiny_decoder, dtype):
    task = task_for(tmp_path, tiny_decoder, unlabeled=str(DOCS / "eval.txt"), loss={"lm": 0.5})
    torch.manual_seed(0)
    batch = task.collate([task.train_set[i] for i in range(4)], train=True)
    assert "lm_labels" in batch
    compare(task, batch, "lm", dtype)
    compare(task, batch, "sup", dtype)


def test_ignored_positions_never_reach_the_projection(tmp_path, tiny_decoder):
    import sft_cli.model.lm_loss as lm_loss

    task = task_for(tmp_path, tiny_decoder)
    batch = task.collate([task.train_set[i] for i in range(4)], train=True)
    projected = []

    def spy(hidden, head, labels, weights, rows=None):  # what reaches the output projection
        projected.append(hidden.shape[0])
        return real(hidden, head, labels, weights, rows)

    real, lm_loss.linear_cross_entropy = lm_loss.linear_cross_entropy, spy
    try:
        task.loss_terms(task.model, batch)
    finally:
        lm_loss.linear_cross_entropy = real
    labelled = int(((batch["labels"] != -100) & (batch["label_weights"] != 0)).sum())
    assert projected == [labelled] and labelled < 0.6 * batch["labels"].numel()  # most positions never projected


def test_chunking_does_not_change_the_result():
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    head = torch.nn.Linear(16, 300)
    labels, weights = torch.randint(300, (50,)), torch.rand(50)
    one = linear_cross_entropy(hidden, head, labels, weights, rows=50)
    (grad_one,) = torch.autograd.grad(one, hidden)
    many = linear_cross_entropy(hidden, head, labels, weights, rows=7)
    (grad_many,) = torch.autograd.grad(many, hidden)
    reference = (torch.nn.functional.cross_entropy(head(hidden), labels, reduction="none") * weights).sum()
    assert one.item() == pytest.approx(reference.item(), rel=1e-5) and many.item() == pytest.approx(
        one.item(), rel=1e-5
    )
    assert torch.allclose(grad_one, grad_many, atol=1e-6)


def test_plain_loss_reference_is_the_summed_weighted_cross_entropy(tiny_decoder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_decoder)
    ids = torch.randint(500, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "labels": labels, "label_weights": torch.ones(2, 12)}
    with torch.no_grad():
        assert CausalLMLoss(model)(ids, labels, batch["label_weights"]).item() == pytest.approx(
            plain_loss(model, batch).item(), rel=1e-5
        )


def test_the_heap_is_trimmed_once_per_backward_before_the_embedding_gradient(tiny_decoder, monkeypatch):
    from transformers import AutoModelForCausalLM

    from sft_cli.model import lm_loss
    from sft_cli.model import memory as device
    from sft_cli.model.lm_loss import with_loss

    calls = []

    def trim() -> None:
        calls.append(model.get_input_embeddings().weight.grad)  # the embedding's gradient is not made yet

    trim.available = True
    monkeypatch.setattr(device, "trim_heap", trim)
    monkeypatch.setattr(lm_loss, "TRIM_FROM_BYTES", 0)  # the tiny decoder's embedding is far below the real bar
    model = AutoModelForCausalLM.from_pretrained(tiny_decoder)
    wrapped, chunked = with_loss(model, model.config.vocab_size, "none")
    assert chunked
    ids = torch.randint(model.config.vocab_size, (2, 12))
    wrapped(ids, ids).backward()
    assert calls == [None] and model.get_input_embeddings().weight.grad is not None
    with torch.no_grad():
        wrapped(ids, ids)  # evaluation: nothing to trim
    assert len(calls) == 1


def test_small_embeddings_are_not_worth_a_trim(tiny_decoder, monkeypatch):
    from transformers import AutoModelForCausalLM

    from sft_cli.model import memory as device
    from sft_cli.model.lm_loss import with_loss

    calls = []

    def trim() -> None:
        calls.append(1)

    trim.available = True
    monkeypatch.setattr(device, "trim_heap", trim)
    model = AutoModelForCausalLM.from_pretrained(tiny_decoder)
    wrapped, _ = with_loss(model, model.config.vocab_size, "none")
    ids = torch.randint(model.config.vocab_size, (2, 12))
    wrapped(ids, ids).backward()
    assert calls == []
