"""Non-IID partitions, the held-out validation split and the partition report (data.py), on the
offline alpaca-gpt4 sample; and the ConfigErrors for bad partitioning settings."""

import json
from collections import Counter
from dataclasses import replace

import pytest
from transformers import AutoTokenizer

from flowertune_nlp import data
from flowertune_nlp.config import AppConfig, ConfigError, DatasetSettings, build_config


@pytest.fixture(scope="module")
def rows(alpaca_sample):
    return json.loads(alpaca_sample.read_text())


@pytest.fixture(scope="module")
def with_ids(tmp_path_factory, rows):
    """The sample with an `id` per row (it holds 14 duplicate rows) and a `topic` column."""
    path = tmp_path_factory.mktemp("alpaca") / "alpaca_ids.jsonl"
    path.write_text("".join(json.dumps({**r, "id": i, "topic": ["a", "b", "c"][i % 3]}) + "\n"
                            for i, r in enumerate(rows)))
    return path


def settings(name, **kwargs) -> DatasetSettings:
    return DatasetSettings(name=str(name), **{"num_partitions": 20, **kwargs})


def ids_of(dataset_settings, seed=7) -> list[list[int]]:
    return [list(data.load_partition(dataset_settings, pid, seed)["id"])
            for pid in range(dataset_settings.num_partitions)]


def test_default_iid_partitions_are_the_ones_of_before(alpaca_sample):
    """partitioner = iid and no validation rows: flwr-datasets' IidPartitioner on the seeded
    shuffle with no preprocessor, as the app built it before these keys existed."""
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import IidPartitioner

    before = FederatedDataset(dataset="json", data_files=[str(alpaca_sample)], seed=7,
                              partitioners={"train": IidPartitioner(num_partitions=20)})
    now = settings(alpaca_sample)
    assert data._prepare(now) is None
    for pid in range(20):
        assert data.load_partition(now, pid, 7).to_list() == before.load_partition(
            pid, "train").to_list()


def test_task_type_rule():
    cases = {
        "Write a short poem about the sea.": "creative",
        "Given a sentence, rewrite it in the passive voice.": "rewrite",
        "What is the capital of France?": "question",
        "Describe the water cycle.": "explain",
        "Classify the following animals as mammals or reptiles.": "classify",
        "List five fruits.": "list",
        "Calculate the area of a circle of radius 3.": "math",
        "Write a Python function that reverses a string.": "code",
        "Entertain me with something funny!": "other",
    }
    assert {text: data.task_type(text) for text in cases} == cases
    assert set(data.TASK_TYPES) == {"code", *data.TASK_KEYWORDS, "other"}


def test_dirichlet_partitions_cover_the_data_with_skewed_label_mixes(with_ids, rows):
    dirichlet = settings(with_ids, partitioner="dirichlet", dirichlet_alpha=0.3)
    parts = ids_of(dirichlet)
    assert sorted(i for part in parts for i in part) == list(range(len(rows)))
    assert all(parts)
    assert ids_of(dirichlet) == parts  # seeded: the same again
    assert ids_of(dirichlet, seed=8) != parts
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] > 2 * sizes[0]  # not 50 each like IID
    # the label mix differs between partitions far more than IID shares do
    labels = [data.task_type(r["instruction"]) for r in rows]
    shares = [Counter(labels[i] for i in part)["creative"] / len(part) for part in parts]
    assert max(shares) - min(shares) > 0.4


def test_pathological_partitions_hold_few_labels(with_ids):
    pathological = settings(with_ids, partitioner="pathological", classes_per_partition=2)
    for pid in range(20):
        part = data.load_partition(pathological, pid, 7)
        assert 1 <= len(set(part[data.DERIVED_LABEL])) <= 2
    by_topic = replace(pathological, partition_by="topic", classes_per_partition=1,
                       num_partitions=6)
    assert all(len(set(data.load_partition(by_topic, pid, 7)["topic"])) == 1
               for pid in range(6))


@pytest.mark.parametrize("partitioner", ["linear", "exponential"])
def test_size_skew(with_ids, rows, partitioner):
    skewed = settings(with_ids, partitioner=partitioner, num_partitions=4)
    parts = ids_of(skewed)
    sizes = [len(p) for p in parts]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1] / 3
    assert sorted(i for part in parts for i in part) == list(range(len(rows)))


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_held_out_rows_are_in_no_partition(with_ids, rows, tiny_model_dir, partitioner):
    held = settings(with_ids, partitioner=partitioner, validation_size=100)
    validation = data.load_validation_rows(held, 7)
    held_ids = list(validation["id"])
    parts = ids_of(held)
    assert len(validation) == 100 and sum(map(len, parts)) == len(rows) - 100
    assert not set(held_ids) & {i for part in parts for i in part}
    assert sorted(held_ids + [i for p in parts for i in p]) == list(range(len(rows)))
    fraction = replace(held, validation_size=0.1)
    assert list(data.load_validation_rows(fraction, 7)["id"]) == held_ids  # seeded
    assert list(data.load_validation_rows(fraction, 8)["id"]) != held_ids
    assert data.load_validation_rows(replace(held, validation_size=0.0), 7) is None

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = replace(AppConfig(seed=7, dataset=held),
                     train=replace(AppConfig().train, seq_length=256, train_eos=False))
    tokenised = data.load_validation(config, tokenizer)
    assert len(tokenised.dataset) + tokenised.dropped == 100
    whole = 0  # examples that kept their EOS (the others were truncated at 256 tokens)
    for example in tokenised.dataset:
        labels = data.masked_labels(example)
        assert labels[0] == -100 and sum(example["completion_mask"]) > 0  # prompt masked
        if example["input_ids"][-1] == tokenizer.eos_token_id:
            whole += 1
            assert labels[-1] == -100 and labels[-2] != -100  # train-eos false: EOS masked
    assert whole > 10
    assert data.load_validation(AppConfig(dataset=settings(with_ids)), tokenizer) is None


def test_partition_report(with_ids, rows):
    config = build_config({"static.dataset.name": str(with_ids), "seed": 7,
                           "static.dataset.partitioner": "pathological",
                           "static.dataset.validation-size": 50})
    report = data.partition_report(config)
    json.dumps(report)  # goes into the run folder as JSON
    assert (report["training_rows"], report["validation_rows"]) == (len(rows) - 50, 50)
    assert sum(report["validation_labels"].values()) == 50
    parts = report["partitions"]
    assert [p["partition"] for p in parts] == list(range(20))
    assert all(sum(p["labels"].values()) == p["size"] > 0 for p in parts)
    assert all(len(p["labels"]) <= 2 for p in parts)
    assert sum(p["size"] for p in parts) + report["unassigned_rows"] == report["training_rows"]
    assert set(report["labels"]) <= set(data.TASK_TYPES)
    iid = data.partition_report(build_config({"static.dataset.name": str(with_ids),
                                              "static.dataset.partition-by": "topic"}))
    assert [p["size"] for p in iid["partitions"]] == [50] * 20
    assert set(iid["labels"]) == {"a", "b", "c"} and iid["label"] == "topic"


@pytest.mark.parametrize(
    ("overrides", "key", "value", "fix"),
    [
        ({"static.dataset.validation-size": 1000}, "static.dataset.validation-size", 1000,
         "give fewer than 1000 rows"),
        ({"static.dataset.validation-size": 0.9999}, "static.dataset.validation-size", 0.9999,
         "leaves no training rows"),
        ({"static.dataset.partitioner": "exponential"}, "static.dataset.partitioner",
         "exponential", "lower num-partitions"),
        ({"static.dataset.partitioner": "dirichlet", "static.dataset.dirichlet-alpha": 0.005},
         "static.dataset.dirichlet-alpha", 0.005, "raise the alpha"),
        ({"static.dataset.partitioner": "pathological",
          "static.dataset.classes-per-partition": 12},
         "static.dataset.classes-per-partition", 12, "give at most 9"),
        ({"static.dataset.partition-by": "category"}, "static.dataset.partition-by",
         "category", "name one of them"),
        ({"static.dataset.partitioner": "dirichlet", "static.dataset.partition-by": "label"},
         "static.dataset.partition-by", "label", "name one of them"),
        ({"static.dataset.num-partitions": 1001}, "static.dataset.num-partitions", 1001,
         "give at most 1000"),
    ],
)
def test_bad_partitioning_fails_before_training_naming_key_value_and_fix(
        alpaca_sample, overrides, key, value, fix):
    config = build_config({"static.dataset.name": str(alpaca_sample), **overrides})
    with pytest.raises(ConfigError) as info:
        data.partition_report(config)  # what the server builds before round 1
    message = str(info.value)
    assert f"'{key}' = {value!r}" in message and fix in message
    with pytest.raises(ConfigError, match=key):  # and a client loading its partition
        data.load_partition(config.dataset, 0, config.seed)


def test_validation_size_counts():
    assert [data.validation_count(v, 1000) for v in (0, 0.1, 100, 1.0, 0.0006)] == [
        0, 100, 100, 1, 1]
    with pytest.raises(ConfigError, match="validation-size' = 0.0004 .* is no row"):
        data.validation_count(0.0004, 1000)
