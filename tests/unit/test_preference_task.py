"""task: preference on a tiny random-init Llama: which tokens are scored, the shared-prompt layout, the reference
without a second model, and what reaches the loss."""

import copy
import json
from pathlib import Path

import pytest
import torch

from sft_cli.config.recipe import load_recipe
from sft_cli.errors import SftError
from sft_cli.tasks.preference import ROWS, SHARED
from sft_cli.tasks.registry import build_task
from tests.conftest import read_jsonl, write_jsonl, write_recipe

PREFS = Path(__file__).resolve().parents[2] / "data" / "stdlib-prefs"


def preference_recipe(tmp: Path, decoder: Path, rows: list[dict], **sections) -> Path:
    train = write_jsonl(tmp / "train.jsonl", rows)
    values = {
        "name": "pref",
        "task": "preference",
        "backbone": {"name": str(decoder)},
        "data": {"train": str(train), "eval": str(train), "chat_template": "chatml", "max_length": 96},
        "loss": {"preference": "dpo", "beta": 0.5},
        "optim": {"lr": 3e-3},
        "schedule": {"epochs": 1, "batch_size": 4, "warmup": 0.0},
        "engine": {"device": "cpu", "precision": "fp32", "seed": 0},
        "output": {"dir": str(tmp / "run")},
    }
    for key, value in sections.items():
        values[key] = {**values.get(key, {}), **value}
    return write_recipe(tmp / "recipe.yaml", values)


def setup_task(tmp: Path, decoder: Path, rows: list[dict], **sections):
    torch.manual_seed(0)  # as the training command seeds before setup (new chat-token embeddings are drawn)
    task = build_task(load_recipe(preference_recipe(tmp, decoder, rows, **sections)))
    task.setup()
    return task


@pytest.fixture(scope="module")
def pairs() -> list[dict]:
    return read_jsonl(PREFS / "train.jsonl")[:8]


@pytest.fixture(scope="module")
def task(tmp_path_factory, tiny_decoder, pairs):
    return setup_task(tmp_path_factory.mktemp("pref"), tiny_decoder, pairs)


def test_only_the_two_replies_are_scored_each_from_the_shared_prompt(task, pairs):
    tokenizer = task.tokenizer
    row = task.train_set[0]
    prompt = pairs[0]["prompt"]
    full = task.chat.prompt_ids(prompt)  # the generation prompt, as inference renders it; its end when cut
    assert row["prompt_ids"] == full[-len(row["prompt_ids"]) :]
    longest = max(len(row["chosen_ids"]), len(row["rejected_ids"]))
    assert len(row["prompt_ids"]) == len(full) or len(row["prompt_ids"]) + longest == 96
    for side in ("chosen", "rejected"):
        reply = pairs[0][side][0]["content"]
        assert tokenizer.decode(row[f"{side}_ids"]) == reply + "<|im_end|>"  # the reply and its end-of-turn only
    batch = task.collate([task.train_set[i] for i in range(3)], train=True)
    expected = [t for i in range(3) for s in ("chosen", "rejected") for t in task.train_set[i][f"{s}_ids"]]
    assert batch["score_targets"].tolist() == expected
    flat = batch["input_ids"].reshape(-1)
    rows = batch["score_index"] // batch["input_ids"].shape[1]
    # shared prompt: a reply's first token is predicted from the prompt's last token, the others from the previous
    first = task.train_set[0]
    predictors = flat[batch["score_index"][rows == 0]].tolist()
    prompt_last = first["prompt_ids"][-1]
    assert predictors == [prompt_last, *first["chosen_ids"][:-1], prompt_last, *first["rejected_ids"][:-1]]


def test_shared_prompt_layout_scores_exactly_as_two_rows(task):
    assert task.layout == SHARED
    rows = [task.train_set[i] for i in range(4)]
    with torch.no_grad():
        apart = task._logps(task.scorer, task._collate(rows, ROWS))
        packed = task._logps(task.scorer, task._collate(rows, SHARED))
    assert torch.allclose(apart.chosen, packed.chosen, atol=1e-4)
    assert torch.allclose(apart.rejected, packed.rejected, atol=1e-4)
    assert packed.chosen_tokens.tolist() == [len(r["chosen_ids"]) for r in rows]


def test_precomputed_reference_equals_the_model_scored_on_the_fly(task):
    batch = task.collate([task.train_set[i] for i in range(4)], train=True)
    task.scorer.eval()
    with torch.no_grad():
        live = task._logps(task.scorer, batch)
    assert torch.allclose(batch["ref_logps"][:, 0], live.chosen, atol=1e-4)
    assert torch.allclose(batch["ref_logps"][:, 1], live.rejected, atol=1e-4)
    terms = task.loss_terms(task.scorer, batch)  # at the start the policy is the reference: DPO's loss is log 2
    assert float(terms["sup"][0]) / 4 == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-4)


def test_adapters_off_reference_equals_a_frozen_copy(tmp_path, tiny_decoder, pairs):
    task = setup_task(
        tmp_path,
        tiny_decoder,
        pairs,
        freeze={"policy": "lora", "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        loss={"reference": "adapters-off"},
    )
    frozen = copy.deepcopy(task.scorer)
    for name, param in task.scorer.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)  # as if trained: the adapters change the outputs
    batch = task.collate([task.train_set[i] for i in range(4)], train=True)
    assert "ref_logps" not in batch  # nothing precomputed: the reference comes from the live model
    task.scorer.eval()
    with torch.no_grad():
        off = task._reference(batch)
        base = task._logps(frozen, batch)
        on = task._logps(task.scorer, batch)
    assert torch.allclose(off.chosen, base.chosen, atol=1e-4) and torch.allclose(off.rejected, base.rejected, atol=1e-4)
    assert not torch.allclose(on.chosen, off.chosen, atol=1e-3)
    trainable = [n for n, p in task.scorer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable)  # + new chat tokens


def test_beta_and_the_sft_term_reach_the_loss(task):
    batch = task.collate([task.train_set[i] for i in range(4)], train=True)
    task.scorer.eval()
    policy = task._logps(task.scorer, batch)
    shift = torch.tensor([[1.5, -0.5]] * 4)  # a reference the policy beats by 2 nats per pair
    batch = {**batch, "ref_logps": torch.stack([policy.chosen, policy.rejected], 1).detach() - shift}
    loss = task.recipe.loss
    for beta in (0.1, 1.0):
        loss.beta = beta
        summed, count = task.loss_terms(task.scorer, batch)["sup"]
        expected = -torch.nn.functional.logsigmoid(torch.tensor(beta * 2.0)) * 4
        assert float(summed) == pytest.approx(float(expected), rel=1e-4) and int(count) == 4
    assert "sft" not in task.loss_terms(task.scorer, batch)
    loss.sft_weight = 0.5
    try:
        nll, tokens = task.loss_terms(task.scorer, batch)["sft"]
        assert float(nll) == pytest.approx(-float(policy.chosen.sum()), rel=1e-5)
        assert int(tokens) == int(batch["pair_tokens"][:, 0].sum())
        assert task.loss_weights() == {"sft": 0.5}
    finally:
        loss.sft_weight, loss.beta = None, 0.5
    loss.preference = "orpo"
    try:
        assert task.loss_weights() == {"sft": 1.0}  # ORPO's own NLL term
    finally:
        loss.preference = "dpo"


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"prompt": "Which module?", "chosen": "os", "rejected": "os"},
            "row 2: the 'chosen' and 'rejected' completions",
        ),
        ({"chosen": "the os module", "rejected": "sys"}, "row 2: 'chosen' and 'rejected' share no prompt"),
        ({"prompt": "Which module?", "chosen": "os", "rejected": None}, "row 2: 'rejected' is empty"),
    ],
)
def test_a_bad_pair_names_file_and_row(task, row, message):
    import dataclasses

    import datasets

    from sft_cli.data.tables import SkipCounter
    from sft_cli.tasks.preference_data import PairEncoder, encode_pairs

    good = {"prompt": "Which module?", "chosen": "os", "rejected": "sys"}
    plain = dataclasses.replace(task.recipe.data, chat_template=None)
    encoder = PairEncoder(task.tokenizer, plain, None)
    with pytest.raises(SftError, match=message) as caught:
        encode_pairs(datasets.Dataset.from_list([good, row]), encoder, "data.train", "train.jsonl", SkipCounter())
    assert "data.train: train.jsonl row 2" in str(caught.value) and "data.skip_invalid" in str(caught.value)
    skipped = SkipCounter()
    encoder.data = dataclasses.replace(plain, skip_invalid=True)
    kept = encode_pairs(datasets.Dataset.from_list([good, row, good]), encoder, "data.train", "train.jsonl", skipped)
    assert len(kept) == 2 and skipped.describe("data.train") == "1 invalid pair"


def test_plain_pairs_use_the_format_string_and_eos(tmp_path, tiny_decoder):
    rows = [{"prompt": "Which module has path?", "chosen": " os", "rejected": " sys"}] * 2
    task = setup_task(tmp_path, tiny_decoder, rows, data={"chat_template": None, "template": "Q: {prompt}\nA:"})
    assert task.chat is None
    row, tokenizer = task.train_set[0], task.tokenizer
    assert tokenizer.decode(row["prompt_ids"]) == "Q: Which module has path?\nA:"
    assert row["chosen_ids"][-1] == row["rejected_ids"][-1] == tokenizer.eos_token_id


def test_missing_rejected_column_is_one_line(tmp_path, tiny_decoder):
    with pytest.raises(SftError, match="data.rejected_field"):
        setup_task(tmp_path, tiny_decoder, [{"prompt": "a", "chosen": "b", "other": "c"}])


def test_recipe_refuses_adapters_off_without_lora(tmp_path, tiny_decoder, pairs):
    path = preference_recipe(tmp_path, tiny_decoder, pairs, loss={"reference": "adapters-off"})
    with pytest.raises(SftError, match="freeze.policy: lora"):
        load_recipe(path)
    values = json.loads(json.dumps(__import__("yaml").safe_load(path.read_text())))
    values["loss"]["preference"] = "dpp"
    with pytest.raises(SftError, match="did you mean 'dpo'"):
        load_recipe(write_recipe(tmp_path / "typo.yaml", values))
    values["loss"] = {"preference": "dpo"}
    values["data"]["packing"] = True
    with pytest.raises(SftError, match="'data.packing' is generation's"):
        load_recipe(write_recipe(tmp_path / "packing.yaml", values))


def test_the_reference_is_read_back_from_the_data_cache_on_a_second_start(tmp_path, tiny_decoder, pairs, monkeypatch):
    from sft_cli.tasks.preference import PreferenceTask

    recipe = preference_recipe(tmp_path, tiny_decoder, pairs)

    def start() -> PreferenceTask:
        torch.manual_seed(0)
        task = build_task(load_recipe(recipe))
        task.setup()
        return task

    first = start()
    scored = []
    original = PreferenceTask._logps
    monkeypatch.setattr(
        PreferenceTask, "_logps", lambda self, model, batch: scored.append(1) or original(self, model, batch)
    )
    again = start()  # a resumed run starts from the same weights and data: the same cache key
    assert len(scored) == 2  # the start-up layout check only: no reference pass over the data
    assert again.train_set["ref_logps"] == first.train_set["ref_logps"]
