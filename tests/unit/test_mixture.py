"""data.train mixtures: each epoch's draw by weight or count, seeded and exact; the recipe checks of a source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sft_cli.config.recipe import load_recipe
from sft_cli.config.schema import DataConfig
from sft_cli.data.mixture import Mixture, interleave, quotas, sources
from sft_cli.data.tables import epoch_batches
from sft_cli.errors import SftError


def mix(*entries: dict) -> list:
    return sources(DataConfig(train=[{"path": f"s{i}.jsonl", **e} for i, e in enumerate(entries)]))


def test_weights_share_the_epoch_exactly_and_counts_are_kept():
    assert quotas([100, 100, 100], mix({"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2})) == [150, 90, 60]
    assert quotas([10, 1000], mix({"weight": 1}, {"weight": 1})) == [505, 505]  # the small one repeats
    # num_samples rows of its own; a source with neither keeps its size; weights share what is left
    assert quotas([50, 80, 70], mix({"num_samples": 20}, {}, {"weight": 2})) == [20, 80, 100]
    assert sum(quotas([7, 11, 13], mix({"weight": 1}, {"weight": 1}, {"weight": 1}))) == 31


def test_counts_that_leave_no_room_for_the_weighted_sources_are_one_line():
    with pytest.raises(SftError, match=r"leaving none for data.train\[1\] — lower num_samples"):
        quotas([10000, 20000], mix({"num_samples": 50000}, {"weight": 1}))


def test_sft_check_samples_each_source_and_keeps_its_keys(tmp_path):
    from sft_cli.commands.check import smoke_recipe
    from tests.conftest import write_jsonl

    for name in ("a", "b"):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"prompt": str(i), "response": str(i)} for i in range(300)])
    text = f"task: generation\ndata: {{train: [{{path: {tmp_path}/a.jsonl, num_samples: 500, format: alpaca}}, "
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text + f"{{path: {tmp_path}/b.jsonl, weight: 2}}]}}\n")
    smoke = smoke_recipe(load_recipe(recipe), tmp_path / "work", 2, "cpu", {})
    first, second = smoke.data.train
    assert first["format"] == "alpaca" and first["num_samples"] <= 300 and second["weight"] == 2
    assert Path(first["path"]).is_dir() and Path(second["path"]).is_dir() and first["path"] != second["path"]


def test_each_epoch_draws_its_quota_seeded_and_an_undersampled_source_sees_every_row_over_epochs():
    mixture = Mixture(mix({"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}), [40, 100, 300], seed=3)
    assert mixture.epoch_size == 440
    for epoch in range(3):
        drawn = mixture.epoch_indices(epoch)
        counts = np.bincount(mixture.source_of(drawn), minlength=3)
        assert counts.tolist() == mixture.quotas == [220, 132, 88]
        assert np.array_equal(drawn, Mixture(mixture.sources, [40, 100, 300], seed=3).epoch_indices(epoch))
    assert not np.array_equal(mixture.epoch_indices(0), Mixture(mixture.sources, [40, 100, 300], 4).epoch_indices(0))
    # the 300-row source gives 88 rows an epoch: different rows each epoch, all of them within four epochs
    seen = [set(mixture.epoch_indices(e)[mixture.source_of(mixture.epoch_indices(e)) == 2]) for e in range(4)]
    assert not seen[0] & seen[1] and set().union(*seen) >= set(range(140, 440))
    # the 40-row source gives 220 an epoch: whole passes over its rows (each row 5 or 6 times)
    first = np.bincount(mixture.epoch_indices(0)[mixture.source_of(mixture.epoch_indices(0)) == 0], minlength=40)
    assert first.min() >= 5 and first.max() <= 6


def test_the_batches_of_an_epoch_cover_the_drawn_rows_once():
    mixture = Mixture(mix({"weight": 3}, {"weight": 1}), [30, 30], seed=0)
    drawn = mixture.epoch_indices(1)
    batches = epoch_batches(None, len(drawn), 8, 0, 1, False, drawn)
    assert sorted(i for b in batches for i in b) == sorted(drawn.tolist())


def test_a_streamed_mixture_draws_sources_by_weight():
    streams = [iter(range(10**6)), iter(range(10**6))]
    picks = [source for source, _ in (next(g) for g in [interleave(streams, [0.75, 0.25], 0, 0)] * 4000)]
    assert abs(np.mean(np.asarray(picks) == 0) - 0.75) < 0.03


@pytest.mark.parametrize(
    "train, expected",
    [
        ("[{path: a.jsonl, wieght: 1}]", "did you mean 'data.train[0].weight'"),
        ("[{path: a.jsonl, weight: 1, num_samples: 5}]", "weight (a share of the mix) or num_samples"),
        ("[{path: a.jsonl, weight: -1}]", "'data.train[0].weight' must be a number > 0"),
        ("[{path: a.jsonl, num_samples: 0.5}]", "'data.train[0].num_samples' must be a whole number"),
        ("[{path: a.jsonl}, {weight: 1}]", "'data.train[1].path' is required"),
        ("[{path: a.jsonl, chat_template: chatml}]", "'data.train[0].chat_template' is set once for the whole mixture"),
        ("[{path: a.jsonl, format: alpacca}]", "did you mean 'alpaca'"),
        ("[{path: a.jsonl, max_duration: many}]", "'data.train[0].max_duration' has the wrong type"),
    ],
)
def test_bad_sources_are_one_line_errors_naming_the_key(tmp_path, train, expected):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"task: generation\ndata: {{train: {train}}}\n")
    with pytest.raises(SftError) as err:
        load_recipe(recipe)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_mixture_is_refused_where_it_cannot_be_honoured(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: classification\ndata: {train: [{path: a.jsonl, weight: 1}]}\n")
    with pytest.raises(SftError, match="is for tasks generation, language-modeling; task classification"):
        load_recipe(recipe)
    recipe.write_text("task: generation\ndata: {train: [{path: a.jsonl}], packing: true}\n")
    with pytest.raises(SftError, match="'data.packing' with a mixture"):
        load_recipe(recipe)
    recipe.write_text("task: language-modeling\ndata: {train: [{path: a.txt, num_samples: 9}], streaming: true}\n")
    with pytest.raises(SftError, match="a stream has no epochs"):
        load_recipe(recipe, ["schedule.max_steps=5"])
