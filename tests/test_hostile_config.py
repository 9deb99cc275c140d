"""Hostile geometry: every config.json value is checked once, where the config is parsed.

A bad value (wrong type, out of range, widths that disagree with each other or with the tensors)
is refused before any work with one line naming config.json and the key, exit status 2, and
nothing written. (Issue 14, class 3.)
"""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from lowmem_bonsai.cli import app
from lowmem_bonsai.pipeline import work_dir

from .conftest import DELETE, edit_json, refused

# key changes -> words the one line must hold (besides the config.json path)
CASES = {
    "negative width": (dict(intermediate_size=-96), "'intermediate_size' is -96, expected a positive integer"),
    "zero hidden": (dict(hidden_size=0), "'hidden_size' is 0, expected a positive integer"),
    "float heads": (dict(num_attention_heads=4.0), "'num_attention_heads' is 4.0, expected a positive integer"),
    "bool layers": (dict(num_hidden_layers=True), "'num_hidden_layers' is True, expected a positive integer"),
    "string head_dim": (dict(head_dim="16"), "'head_dim' is '16', expected a positive integer"),
    "odd head_dim": (dict(head_dim=15), "'head_dim' is 15, expected an even number"),
    "zero kv heads": (dict(num_key_value_heads=0), "'num_key_value_heads' is 0"),
    "kv heads do not divide": (dict(num_key_value_heads=3), "num_attention_heads=4 is not a multiple of "
                               "num_key_value_heads=3"),
    "more kv heads than heads": (dict(num_key_value_heads=8), "'num_key_value_heads' is 8"),
    "heads do not divide hidden": (dict(num_attention_heads=3, num_key_value_heads=1, head_dim=DELETE),
                                   "hidden_size=64 is not a multiple of num_attention_heads=3"),
    "absurd layer count": (dict(num_hidden_layers=10**12), "'num_hidden_layers' is 1000000000000"),
    "missing vocab": (dict(vocab_size=DELETE), "key 'vocab_size' is missing"),
    "negative eps": (dict(rms_norm_eps=-1e-5), "'rms_norm_eps' is -1e-05, expected a positive finite"),
    "nan eps": (dict(rms_norm_eps=math.nan), "'rms_norm_eps' is nan"),
    "string theta": (dict(rope_theta="10000"), "'rope_theta' is '10000', expected a positive finite"),
    "infinite theta": (dict(rope_theta=math.inf), "'rope_theta' is inf"),
    "string tie": (dict(tie_word_embeddings="yes"), "'tie_word_embeddings' is 'yes', expected true or false"),
    "list rope_scaling": (dict(rope_scaling=[]), "'rope_scaling' is [], expected an object or null"),
    "zero rope factor": (dict(rope_scaling={"rope_type": "linear", "factor": 0}), "'factor' is 0"),
    "architectures a string": (dict(architectures="LlamaForCausalLM"), "'architectures' is 'LlamaForCausalLM'"),
    "numeric model_type": (dict(model_type=7), "'model_type' is 7, expected a string"),
    "zero context": (dict(max_position_embeddings=0), "'max_position_embeddings' is 0"),
    # the per-layer lists of a pruned checkpoint
    "per-layer list too short": (dict(num_attention_heads_per_layer=[4], num_key_value_heads_per_layer=[2, 2],
                                      intermediate_size_per_layer=[96, 96]),
                                 "'num_attention_heads_per_layer' must be a list of 2 integers"),
    "per-layer list missing": (dict(num_attention_heads_per_layer=[4, 4]),
                               "'num_key_value_heads_per_layer' must be a list of 2"),
    "per-layer bool": (dict(num_attention_heads_per_layer=[4, 4], num_key_value_heads_per_layer=[2, 2],
                            intermediate_size_per_layer=[96, True]),
                       "'intermediate_size_per_layer'[1] is True, expected an integer >= 0"),
    "per-layer negative": (dict(num_attention_heads_per_layer=[4, 4], num_key_value_heads_per_layer=[2, 2],
                                intermediate_size_per_layer=[96, -96]),
                           "'intermediate_size_per_layer'[1] is -96, expected an integer >= 0"),
    "per-layer heads without kv heads": (dict(num_attention_heads_per_layer=[4, 4],
                                              num_key_value_heads_per_layer=[2, 0],
                                              intermediate_size_per_layer=[96, 96]),
                                         "layer 1 has 4 query heads for 0 KV heads"),
    "per-layer heads do not divide": (dict(num_attention_heads_per_layer=[4, 3],
                                           num_key_value_heads_per_layer=[2, 2],
                                           intermediate_size_per_layer=[96, 96]),
                                      "layer 1 has 3 query heads for 2 KV heads"),
}

# config changes that parse but disagree with the tensors -> words naming the tensor
TENSOR_CASES = {
    "more layers than tensors": (dict(num_hidden_layers=3), "tensor 'model.layers.2.input_layernorm.weight' "
                                 "is missing from the checkpoint"),
    "fewer layers than tensors": (dict(num_hidden_layers=1), "holds 'model.layers.1."),
    "width disagrees": (dict(intermediate_size=128), "config.json implies [128, 64]"),
    "per-layer width disagrees": (dict(num_attention_heads_per_layer=[4, 4], num_key_value_heads_per_layer=[2, 2],
                                       intermediate_size_per_layer=[96, 64]),
                                  "tensor 'model.layers.1.mlp.gate_proj.weight' has shape [96, 64] but "
                                  "config.json implies [64, 64]"),
    "per-layer heads disagree": (dict(num_attention_heads_per_layer=[4, 2], num_key_value_heads_per_layer=[2, 2],
                                      intermediate_size_per_layer=[96, 96]),
                                 "tensor 'model.layers.1.self_attn.q_proj.weight' has shape [64, 64] but "
                                 "config.json implies [32, 64]"),
    "vocab disagrees": (dict(vocab_size=300), "tensor 'model.embed_tokens.weight' has shape [211, 64] but "
                        "config.json implies [300, 64]"),
}


def _prune(model, out, calib):
    return CliRunner().invoke(app, ["prune", str(model), "--out", str(out), "--calib", str(calib),
                                    "--profile", "quick", "--sparsity", "0.3"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_value_is_refused_naming_the_key(tmp_path, tiny_llama, sample_text, case):
    changes, words = CASES[case]
    edit_json(tiny_llama / "config.json", **changes)
    out = tmp_path / "out"
    refused(_prune(tiny_llama, out, sample_text), f"{tiny_llama / 'config.json'}: ", words)
    assert not out.exists() and not work_dir(out).exists()


@pytest.mark.parametrize("case", sorted(TENSOR_CASES))
def test_config_that_disagrees_with_the_tensors_is_refused_before_work(tmp_path, tiny_llama, sample_text,
                                                                       case):
    changes, words = TENSOR_CASES[case]
    edit_json(tiny_llama / "config.json", **changes)
    out = tmp_path / "out"
    refused(_prune(tiny_llama, out, sample_text), str(tiny_llama), words)
    assert not out.exists() and not work_dir(out).exists()


@pytest.mark.parametrize("command", ["eval", "export-gguf", "estimate"])
def test_every_command_reads_config_through_the_same_checks(tmp_path, tiny_llama, sample_text, command):
    edit_json(tiny_llama / "config.json", intermediate_size=-96)
    args = {"eval": ["--data", str(sample_text), "--seq-len", "16"],
            "export-gguf": ["--out", str(tmp_path / "m.gguf")], "estimate": []}[command]
    res = CliRunner().invoke(app, [command, str(tiny_llama), *args])
    refused(res, "'intermediate_size' is -96")
    assert not (tmp_path / "m.gguf").exists()
