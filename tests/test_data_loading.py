"""Loading and validating AlpacaFarm-format data: every source, every malformed input."""

from __future__ import annotations

import json

import pytest

from prefgym.cli import main
from prefgym.data import load_records
from prefgym.errors import DataError

RECORDS = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Reverse the word.", "input": "cat", "output": "tac"},
    {"instruction": "Name a color.", "output": "red"},  # no input field, as in AlpacaEval files
]


def test_json_and_jsonl_load_the_same_records(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(RECORDS), encoding="utf-8")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + "\n", encoding="utf-8")
    from_json = load_records(tmp_path / "a.json")
    from_jsonl = load_records(str(tmp_path / "a.jsonl"))
    assert from_json == from_jsonl
    assert [r["instruction"] for r in from_json] == [r["instruction"] for r in RECORDS]
    assert from_json[2]["input"] == ""  # missing input filled with ""
    assert from_json[1]["input"] == "cat"
    assert "input" not in RECORDS[2]  # the caller's records are not modified


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    datasets.Dataset.from_list(RECORDS[:2]).save_to_disk(str(tmp_path / "single"))
    assert load_records(tmp_path / "single") == RECORDS[:2]

    dd = datasets.DatasetDict({"sft": datasets.Dataset.from_list(RECORDS[:2]),
                               "val": datasets.Dataset.from_list([RECORDS[1]])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert [r["output"] for r in load_records(tmp_path / "dict", split="val")] == ["tac"]
    with pytest.raises(DataError, match="sft, val"):
        load_records(tmp_path / "dict")
    with pytest.raises(DataError, match="not 'train'"):
        load_records(tmp_path / "dict", split="train")


def test_folder_of_split_files(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sft.json").write_text(json.dumps(RECORDS), encoding="utf-8")
    assert len(load_records(tmp_path, split="sft")) == 3
    with pytest.raises(DataError, match="no val.json"):
        load_records(tmp_path, split="val")
    with pytest.raises(DataError, match="name the split"):
        load_records(tmp_path)


def test_hub_name_goes_through_datasets_load_dataset(tmp_path, monkeypatch):
    import datasets

    # A dataset saved locally stands in for the Hub: nothing is downloaded.
    datasets.DatasetDict({"sft": datasets.Dataset.from_list(RECORDS[:2])}).save_to_disk(str(tmp_path / "hub"))
    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if split not in ("sft",):
            raise ValueError(f"Unknown split {split}")
        return datasets.load_from_disk(str(tmp_path / "hub"))[split]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = load_records("tatsu-lab/alpaca_farm:alpaca_instructions", split="sft")
    assert calls == [("tatsu-lab/alpaca_farm", "alpaca_instructions", "sft")]
    assert records == RECORDS[:2]
    assert load_records("tatsu-lab/alpaca_farm", split="sft", config="alpaca_instructions") == RECORDS[:2]
    with pytest.raises(DataError, match="tatsu-lab/alpaca_farm.*Unknown split nope"):
        load_records("tatsu-lab/alpaca_farm:alpaca_instructions", split="nope")
    with pytest.raises(DataError, match="name the split"):
        load_records("tatsu-lab/alpaca_farm")


# (file name, bytes, expected pieces of the message)
MALFORMED = {
    "missing_field": ("m.json", json.dumps([RECORDS[0], {"instruction": "x"}]).encode(),
                      ["m.json", "row 1", "field 'output'", "missing required field"]),
    "wrong_type_output": ("w.json", json.dumps([{"instruction": "x", "output": 3}]).encode(),
                          ["w.json", "row 0", "field 'output'", "expected a string, got int"]),
    "null_instruction": ("n.jsonl", (json.dumps(RECORDS[0]) + "\n" + json.dumps({"instruction": None, "output": "a"})).encode(),
                         ["n.jsonl", "row 1", "field 'instruction'", "got null"]),
    "wrong_type_input": ("i.json", json.dumps([{"instruction": "x", "input": ["a"], "output": "y"}]).encode(),
                         ["i.json", "row 0", "field 'input'", "got list"]),
    "preference_text": ("p.json", json.dumps([{"instruction": "x", "output": "y", "preference": "1"}]).encode(),
                        ["p.json", "row 0", "field 'preference'", "expected a number"]),
    "preference_out_of_range": ("p7.json", json.dumps([{"instruction": "x", "output": "y", "preference": 7}]).encode(),
                                ["p7.json", "row 0", "field 'preference'", "got 7", "1.5 or 0 for a tie"]),
    "preference_bool": ("pb.json", json.dumps([{"instruction": "x", "output": "y", "preference": True}]).encode(),
                        ["pb.json", "row 0", "field 'preference'", "expected a number, got bool"]),
    "outputs_not_list": ("o.json", json.dumps([{"instruction": "x", "output": "y", "outputs": "y"}]).encode(),
                         ["o.json", "field 'outputs'", "list of strings"]),
    "empty_instruction": ("e.json", json.dumps([RECORDS[0], RECORDS[1], {"instruction": "  \n", "output": "a"}]).encode(),
                          ["e.json", "row 2", "field 'instruction'", "empty instruction"]),
    "non_utf8": ("u.json", '[{"instruction": "caf\u00e9", "output": "a"}]'.encode("latin-1"),
                 ["u.json", "not valid UTF-8", "byte %d" % len(b'[{"instruction": "caf')]),
    "truncated_json": ("t.json", json.dumps(RECORDS).encode()[:-1],  # the closing ] never written
                       ["t.json", "invalid JSON", "truncated"]),
    "truncated_mid_string": ("s.json", json.dumps(RECORDS).encode()[:-20],
                             ["s.json", "invalid JSON", "Unterminated string"]),
    "bad_jsonl_line": ("b.jsonl", (json.dumps(RECORDS[0]) + "\n{\"instruction\": \"x\", \n").encode(),
                       ["b.jsonl", "row 1", "line 2"]),
    "row_not_object": ("r.json", b'[{"instruction": "x", "output": "y"}, "just text"]',
                       ["r.json", "row 1", "expected an object, got str"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_gets_a_clear_error_and_exit_code_2(case, tmp_path, capsys):
    name, content, expected = MALFORMED[case]
    path = tmp_path / name
    path.write_bytes(content)

    with pytest.raises(DataError) as info:
        load_records(path)
    for piece in expected:
        assert piece in str(info.value)

    assert main(["data", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    for piece in expected:
        assert piece in err


def test_validate_cli_accepts_good_data_and_honours_require(tmp_path, capsys):
    path = tmp_path / "good.json"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    assert main(["data", "validate", str(path)]) == 0
    assert "ok: 3 records" in capsys.readouterr().out
    assert main(["data", "validate", str(path), "--require", "instruction,output_1"]) == 2
    assert "row 0, field 'output_1'" in capsys.readouterr().err


def test_missing_file_is_a_data_error(tmp_path, capsys):
    with pytest.raises(DataError, match="file not found"):
        load_records(tmp_path / "nope.json")
    assert main(["data", "validate", str(tmp_path / "nope.jsonl")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_real_alpaca_eval_files_validate(alpaca_eval_dir):
    ref = load_records(alpaca_eval_dir / "eval_set_reference_text_davinci_003.json")
    assert len(ref) == 805 and all(r["input"] == "" for r in ref)
    ann = load_records(alpaca_eval_dir / "alpaca-7b" / "annotations_alpaca_eval_gpt4.json",
                       required=("instruction", "output_1", "output_2", "preference"))
    assert {r["preference"] for r in ann} <= {0, 1, 2, 0.0, 1.0, 2.0, 1.5, None}
