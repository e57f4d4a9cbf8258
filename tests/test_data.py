import json

import pytest
from datasets import Dataset
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

from flowertune_nlp.config import DatasetSettings
from flowertune_nlp.data import (
    chat_prompt,
    examples_for_round,
    format_prompt,
    load_node_data,
    load_partition,
    masked_labels,
    tokenize_example,
    tokenize_partition,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_prompt_keeps_input_field_when_present():
    with_input = format_prompt("Translate.", "Bonjour", keep_input=True)
    assert "### Input:\nBonjour\n\n### Response:\n" in with_input
    assert with_input.endswith("### Response:\n")
    dropped = format_prompt("Translate.", "Bonjour", keep_input=False)
    assert "Bonjour" not in dropped and dropped.endswith("### Response:\n")
    assert format_prompt("Say hi.", "", keep_input=True) == format_prompt("Say hi.", None, True)


def test_chat_template_prompt_needs_a_template(tokenizer, alpaca_sample):
    with pytest.raises(ValueError, match="prompt-template"):
        chat_prompt(tokenizer, "Say hi.", None, keep_input=True)
    templated = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    templated.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}"
                               "</s>\n{% endfor %}<s>assistant\n")
    prompt = chat_prompt(templated, "Translate.", "Bonjour", keep_input=True)
    assert prompt == "<s>user\nTranslate.\n\nBonjour</s>\n<s>assistant"
    rows = Dataset.from_list([{"instruction": "Say hi.", "input": "", "output": "Hi."}])
    example = tokenize_partition(rows, templated, 64, True, template="chat").dataset[0]
    prompt_ids = templated(chat_prompt(templated, "Say hi.", "", True),
                           add_special_tokens=False)["input_ids"]
    assert example["input_ids"][:len(prompt_ids)] == prompt_ids  # no extra special tokens
    assert example["completion_mask"].index(1) == len(prompt_ids)


@pytest.mark.parametrize("train_eos", [True, False])
def test_labels_are_masked_exactly_outside_response_and_eos(tokenizer, tiny_model_dir,
                                                            train_eos, tmp_path):
    prompt = format_prompt("Name a colour.", None, keep_input=True)
    example = tokenize_example(tokenizer, prompt, "Blue is a colour.", max_length=256,
                               train_eos=train_eos)
    prompt_len = len(tokenizer(prompt)["input_ids"])
    response_ids = tokenizer("Blue is a colour.", add_special_tokens=False)["input_ids"]
    assert example["input_ids"][-1] == tokenizer.eos_token_id  # the EOS is input either way
    # Labels as TRL's SFT trainer builds them from our completion mask.
    from transformers import AutoModelForCausalLM

    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=SFTConfig(output_dir=str(tmp_path), max_length=256, completion_only_loss=True,
                       report_to="none", use_cpu=True, bf16=False),
        train_dataset=Dataset.from_list([example]),
        processing_class=tokenizer,
    )
    labels = trainer.train_dataset[0]["labels"]
    assert labels[:prompt_len] == [-100] * prompt_len
    eos_label = tokenizer.eos_token_id if train_eos else -100
    assert labels[prompt_len:] == [*response_ids, eos_label]
    assert masked_labels(example) == labels  # what the server's validation loss scores


def test_train_eos_false_keeps_a_truncated_response_whole(tokenizer):
    prompt = format_prompt("Name a colour.", None, keep_input=True)
    prompt_len = len(tokenizer(prompt)["input_ids"])
    full = tokenize_example(tokenizer, prompt, "Blue is a colour.", 256, train_eos=False)
    cut = tokenize_example(tokenizer, prompt, "Blue is a colour.", prompt_len + 2,
                           train_eos=False)  # truncation removed the EOS: nothing to unmask
    assert cut["completion_mask"] == full["completion_mask"][:prompt_len + 2]
    assert sum(cut["completion_mask"]) == 2
    rows = Dataset.from_list([{"instruction": "Say hi.", "input": "", "output": "Hi."}])
    for train_eos in (True, False):
        part = tokenize_partition(rows, tokenizer, 256, True, train_eos=train_eos)
        assert part.dataset[0]["completion_mask"][-1] == int(train_eos)


def test_truncated_away_response_is_dropped_and_counted(tokenizer):
    rows = Dataset.from_list([
        {"instruction": "word " * 300, "input": "", "output": "long prompt"},
        {"instruction": "Short.", "input": "", "output": "ok"},
        {"instruction": "", "input": "", "output": "no instruction"},
        {"instruction": "No output.", "input": "", "output": "  "},
    ])
    partition = tokenize_partition(rows, tokenizer, max_length=192, keep_input=True)
    assert (partition.dropped_truncated, partition.dropped_empty, len(partition.dataset)) == (
        1, 2, 1)
    assert all(sum(m) > 0 for m in partition.dataset["completion_mask"])


def test_twenty_iid_partitions_are_disjoint_and_cover_the_data(alpaca_sample):
    rows = json.loads(alpaca_sample.read_text())
    seen = []
    for pid in range(20):
        settings = DatasetSettings(name=str(alpaca_sample), num_partitions=20)
        part = load_partition(settings, pid, seed=7)
        assert 45 <= len(part) <= 55
        seen += [(r["instruction"], r["input"], r["output"]) for r in part]
    assert len(seen) == len(rows)
    assert sorted(seen) == sorted((r["instruction"], r["input"], r["output"]) for r in rows)


def test_each_round_sees_a_different_order(tokenizer, alpaca_sample):
    rows = load_partition(DatasetSettings(name=str(alpaca_sample), num_partitions=20), 3, seed=7)
    partition = tokenize_partition(rows, tokenizer, max_length=256, keep_input=True)
    first = examples_for_round(partition, 8, seed=7, server_round=1, partition_id=3)
    second = examples_for_round(partition, 8, seed=7, server_round=2, partition_id=3)
    again = examples_for_round(partition, 8, seed=7, server_round=1, partition_id=3)
    assert first["input_ids"] != second["input_ids"]
    assert first["input_ids"] == again["input_ids"]
    repeated = examples_for_round(partition, 3 * len(partition.dataset), 7, 1, 3)
    assert len(repeated) == 3 * len(partition.dataset)


def test_node_data_is_read_or_refused_naming_the_file(tmp_path):
    rows = [{"instruction": "Say hi.", "input": "", "output": "Hi."}] * 3
    good = tmp_path / "site.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_node_data(str(good))) == 3
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps(rows))
    assert load_node_data(str(folder))["output"] == ["Hi."] * 3

    (tmp_path / "broken.jsonl").write_text('{"instruction": "x", "output": \n')
    (tmp_path / "other.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    (tmp_path / "notes.txt").write_text("hello")
    for name, problem in (("missing.jsonl", "does not exist on this node"),
                          ("broken.jsonl", "cannot be read as json"),
                          ("other.jsonl", "no instruction, output column"),
                          ("notes.txt", "expected one .json/.jsonl/.parquet file")):
        with pytest.raises(ValueError, match=problem) as err:
            load_node_data(str(tmp_path / name))
        assert "--node-config data-path" in str(err.value) and name in str(err.value)
