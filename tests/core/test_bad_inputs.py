"""Issue 15: a corpus of bad inputs across every sub-command.

Each case is ``(id, argv, files, expected)``: the files are written into a fresh folder
(``{tmp}``), the command runs in-process, and it must

* exit with code 2,
* print exactly one line on stderr, without a traceback (and none on stdout),
* name the field, flag or file that is wrong (``expected`` is a substring of that line),
* leave everything that existed before byte-for-byte as it was: the earlier run directory
  (given as ``--out``, often with ``--overwrite``, or copied and given as ``--resume``), the
  shared inputs beside it, and the case's own folder (no half-written output is left).

Placeholders in argv, file contents and ``expected``: ``{env}`` the shared folder of inputs,
``{run}`` the earlier run directory in it, ``{model}`` a tiny model folder in it, ``{tmp}``
the case's folder. Every case fails before training (and ``serve``/``proxy``/``flower``
before opening a port or a connection), so the whole corpus runs in well under a minute.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from mira.cli import main

INF, NAN = float("inf"), float("nan")

TINY: dict[str, Any] = {
    "seed": 0,
    "model": {"path": "{model}"},
    "lora": {"r": 4, "alpha": 8},
    "data": {"source": "synthetic", "tasks": ["add", "sub", "upper", "lower"], "max_per_task": 24, "max_length": 80},
    "partition": {"name": "by_task", "test_size": 6},
    "federation": {"rounds": 1, "local_steps": 2, "batch_size": 4, "lr": 0.01},
    "algorithm": {"name": "mira"},
    "eval": {"every": 1, "batch_size": 16},
    "plots": False,
}


def cfg(**sections: Any) -> str:
    """The tiny config as YAML, each section updated (or replaced, when not a mapping)."""
    raw = copy.deepcopy(TINY)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update(value)
        else:
            raw[key] = value
    return yaml.safe_dump(raw, sort_keys=False)


def json_data(path: str, **data: Any) -> str:
    return cfg(data={"source": "json", "path": path, "tasks": None, **data},
               partition={"name": "iid", "num_clients": 2, "test_size": 1})


COPY_RUN = object()  # files value: a copy of the earlier run directory


def zoo(**extra: Any) -> str:
    raw = {"members": [{"path": "{model}"}], "validation": {"path": "{env}/good.jsonl"}, **extra}
    return yaml.safe_dump(raw, sort_keys=False)


def recipe(**extra: Any) -> str:
    raw = {"merge_method": "linear", "models": ["{model}", "{model}"], **extra}
    return yaml.safe_dump(raw, sort_keys=False)


@dataclass
class Case:
    id: str
    argv: list[str]
    expected: str
    files: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str | None] = field(default_factory=dict)

    def param(self):
        return pytest.param(self, id=self.id)


KEY = {"MIRA_API_KEY": "test-key"}
REFINE = ["--model", "{model}", "--embedder", "hashing", "--out", "{run}/refined.jsonl", "-q"]
TRAIN = ["proxy", "train", "--proxy", "{model}", "--out", "{tmp}/adapter", "-q"]
GENERATE = ["proxy", "generate", "--server", "http://127.0.0.1:9", "--proxy", "{model}", "--adapter", "{tmp}",
            "--prompt", "hi"]
RUN_OVER = ["--out", "{run}", "--overwrite", "-q"]  # a bad input must not touch the run it would replace

CASES = [
    # -- mira run: the config file itself ------------------------------------------------------
    Case("run/config-missing", ["run", "{tmp}/none.yaml", *RUN_OVER], "config file not found"),
    Case("run/config-is-a-folder", ["run", "{tmp}", *RUN_OVER], "{tmp}"),
    Case("run/config-not-utf8", ["run", "{tmp}/c.yaml", *RUN_OVER], "{tmp}/c.yaml",
         {"c.yaml": b"federation:\n  lr: 0.1  # caf\xe9\n"}),
    Case("run/config-binary", ["run", "{tmp}/c.yaml", *RUN_OVER], "{tmp}/c.yaml",
         {"c.yaml": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe"}),
    Case("run/config-malformed-yaml", ["run", "{tmp}/c.yaml", *RUN_OVER], "{tmp}/c.yaml:2",
         {"c.yaml": "federation:\n  rounds: [1, 2\n"}),
    Case("run/config-a-list", ["run", "{tmp}/c.yaml", *RUN_OVER], "{tmp}/c.yaml", {"c.yaml": "- 1\n- 2\n"}),
    Case("run/unknown-field", ["run", "{tmp}/c.yaml", *RUN_OVER], "lora.rank: unknown field",
         {"c.yaml": cfg(lora={"rank": 4})}),
    Case("run/unknown-section", ["run", "{tmp}/c.yaml", *RUN_OVER], "optimizer: unknown field",
         {"c.yaml": cfg(optimizer={"name": "adam"})}),
    # numbers
    Case("run/lr-inf", ["run", "{tmp}/c.yaml", *RUN_OVER], "federation.lr", {"c.yaml": cfg(federation={"lr": INF})}),
    Case("run/lr-nan", ["run", "{tmp}/c.yaml", *RUN_OVER], "federation.lr", {"c.yaml": cfg(federation={"lr": NAN})}),
    Case("run/lr-string-inf", ["run", "{tmp}/c.yaml", *RUN_OVER], "federation.lr",
         {"c.yaml": cfg(federation={"lr": "inf"})}),
    Case("run/lr-negative", ["run", "{tmp}/c.yaml", *RUN_OVER], "federation.lr",
         {"c.yaml": cfg(federation={"lr": -0.1})}),
    Case("run/weight-decay-inf", ["run", "{tmp}/c.yaml", *RUN_OVER], "federation.weight_decay",
         {"c.yaml": cfg(federation={"weight_decay": INF})}),
    Case("run/grad-clip-inf", ["run", "{tmp}/c.yaml", *RUN_OVER], "federation.grad_clip",
         {"c.yaml": cfg(federation={"grad_clip": INF})}),
    Case("run/local-epochs-inf", ["run", "{tmp}/c.yaml", *RUN_OVER], "federation.local_epochs",
         {"c.yaml": cfg(federation={"local_epochs": INF})}),
    Case("run/lora-alpha-nan", ["run", "{tmp}/c.yaml", *RUN_OVER], "lora.alpha", {"c.yaml": cfg(lora={"alpha": NAN})}),
    Case("run/partition-alpha-inf", ["run", "{tmp}/c.yaml", *RUN_OVER], "partition.alpha",
         {"c.yaml": cfg(partition={"name": "dirichlet", "num_clients": 2, "alpha": INF})}),
    Case("run/algorithm-param-inf", ["run", "{tmp}/c.yaml", *RUN_OVER], "algorithm.mu",
         {"c.yaml": cfg(algorithm={"name": "fedprox", "mu": INF})}),
    Case("run/algorithm-param-string-inf", ["run", "{tmp}/c.yaml", *RUN_OVER], "algorithm.mu",
         {"c.yaml": cfg(algorithm={"name": "fedprox", "mu": "inf"})}),
    Case("run/algorithm-param-nan", ["run", "{tmp}/c.yaml", *RUN_OVER], "algorithm.lambda",
         {"c.yaml": cfg(algorithm={"name": "mira", "lambda": NAN})}),
    Case("run/algorithm-unknown", ["run", "{tmp}/c.yaml", *RUN_OVER], "algorithm.name",
         {"c.yaml": cfg(algorithm={"name": "fedsgd"})}),
    Case("run/algorithm-option-unknown", ["run", "{tmp}/c.yaml", *RUN_OVER], "algorithm.muu",
         {"c.yaml": cfg(algorithm={"name": "fedprox", "muu": 0.1})}),
    # strict types
    Case("run/rounds-true", ["run", "{tmp}/c.yaml", *RUN_OVER], "federation.rounds",
         {"c.yaml": cfg(federation={"rounds": True})}),
    Case("run/rounds-string", ["run", "{tmp}/c.yaml", *RUN_OVER], "federation.rounds",
         {"c.yaml": cfg(federation={"rounds": "3"})}),
    Case("run/rounds-float", ["run", "{tmp}/c.yaml", *RUN_OVER], "federation.rounds",
         {"c.yaml": cfg(federation={"rounds": 2.0})}),
    Case("run/rounds-zero", ["run", "{tmp}/c.yaml", *RUN_OVER], "federation.rounds",
         {"c.yaml": cfg(federation={"rounds": 0})}),
    Case("run/lora-r-false", ["run", "{tmp}/c.yaml", *RUN_OVER], "lora.r", {"c.yaml": cfg(lora={"r": False})}),
    Case("run/fraction-string", ["run", "{tmp}/c.yaml", *RUN_OVER], "federation.fraction",
         {"c.yaml": cfg(federation={"fraction": "0.5"})}),
    Case("run/plots-yes-string", ["run", "{tmp}/c.yaml", *RUN_OVER], "plots", {"c.yaml": cfg(plots="yes")}),
    Case("run/checkpointing-int", ["run", "{tmp}/c.yaml", *RUN_OVER], "train.gradient_checkpointing",
         {"c.yaml": cfg(train={"gradient_checkpointing": 1})}),
    Case("run/tasks-a-string", ["run", "{tmp}/c.yaml", *RUN_OVER], "data.tasks",
         {"c.yaml": cfg(data={"tasks": "add"})}),
    Case("run/seed-float", ["run", "{tmp}/c.yaml", *RUN_OVER], "seed", {"c.yaml": cfg(seed=1.5)}),
    Case("run/dtype-unknown", ["run", "{tmp}/c.yaml", *RUN_OVER], "model.dtype",
         {"c.yaml": cfg(model={"path": "{model}", "dtype": "float8"})}),
    Case("run/env-variable-unset", ["run", "{tmp}/c.yaml", *RUN_OVER], "model.path: environment variable",
         {"c.yaml": cfg(model={"path": "${MIRA_NOPE_UNSET}/m"})}, env={"MIRA_NOPE_UNSET": None}),
    # --set
    Case("run/set-no-equals", ["run", "{tmp}/c.yaml", "--set", "federation.rounds", *RUN_OVER], "--set",
         {"c.yaml": cfg()}),
    Case("run/set-into-a-value", ["run", "{tmp}/c.yaml", "--set", "model.path.x=1", *RUN_OVER], "--set",
         {"c.yaml": cfg()}),
    Case("run/set-lr-inf", ["run", "{tmp}/c.yaml", "--set", "federation.lr=.inf", *RUN_OVER], "federation.lr",
         {"c.yaml": cfg()}),
    Case("run/set-rounds-true", ["run", "{tmp}/c.yaml", "--set", "federation.rounds=true", *RUN_OVER],
         "federation.rounds", {"c.yaml": cfg()}),
    # broken model folders
    Case("run/model-missing", ["run", "{tmp}/c.yaml", *RUN_OVER], "model.path: model folder not found",
         {"c.yaml": cfg(model={"path": "{tmp}/nope"})}),
    Case("run/model-zero-byte-weights", ["run", "{tmp}/c.yaml", *RUN_OVER], "{env}/zero_weights",
         {"c.yaml": cfg(model={"path": "{env}/zero_weights"})}),
    Case("run/model-truncated-weights", ["run", "{tmp}/c.yaml", *RUN_OVER], "{env}/trunc_weights",
         {"c.yaml": cfg(model={"path": "{env}/trunc_weights"})}),
    Case("run/model-no-tokenizer", ["run", "{tmp}/c.yaml", *RUN_OVER], "{env}/no_tokenizer",
         {"c.yaml": cfg(model={"path": "{env}/no_tokenizer"})}),
    Case("run/model-config-not-json", ["run", "{tmp}/c.yaml", *RUN_OVER], "{env}/bad_config_json",
         {"c.yaml": cfg(model={"path": "{env}/bad_config_json"})}),
    Case("run/model-path-a-file", ["run", "{tmp}/c.yaml", *RUN_OVER], "model.path",
         {"c.yaml": cfg(model={"path": "{model}/config.json"})}),
    Case("run/model-device-unknown", ["run", "{tmp}/c.yaml", *RUN_OVER], "model.device",
         {"c.yaml": cfg(model={"path": "{model}", "device": "tpu9"})}),
    Case("run/model-device-empty", ["run", "{tmp}/c.yaml", *RUN_OVER], "model.device",
         {"c.yaml": cfg(model={"path": "{model}", "device": ""})}),
    # data files that are not what they claim
    Case("run/data-missing", ["run", "{tmp}/c.yaml", *RUN_OVER], "data.path", {"c.yaml": json_data("{tmp}/no.jsonl")}),
    Case("run/data-a-folder-dolly", ["run", "{tmp}/c.yaml", *RUN_OVER], "{env}/datadir",
         {"c.yaml": cfg(data={"source": "dolly", "path": "{env}/datadir", "tasks": None})}),
    Case("run/data-a-folder-gsm8k", ["run", "{tmp}/c.yaml", *RUN_OVER], "{env}/datadir",
         {"c.yaml": cfg(data={"source": "gsm8k", "path": "{env}/datadir", "tasks": None})}),
    Case("run/data-folder-without-json", ["run", "{tmp}/c.yaml", *RUN_OVER], "{env}/datadir",
         {"c.yaml": json_data("{env}/datadir")}),
    Case("run/data-not-utf8", ["run", "{tmp}/c.yaml", *RUN_OVER], "{env}/latin1.jsonl:2",
         {"c.yaml": json_data("{env}/latin1.jsonl")}),
    Case("run/data-binary", ["run", "{tmp}/c.yaml", *RUN_OVER], "{model}/model.safetensors",
         {"c.yaml": json_data("{model}/model.safetensors")}),
    Case("run/data-field-empty-list", ["run", "{tmp}/c.yaml", *RUN_OVER], "{env}/emptylist.jsonl:1",
         {"c.yaml": json_data("{env}/emptylist.jsonl")}),
    Case("run/data-list-of-numbers", ["run", "{tmp}/c.yaml", *RUN_OVER], "{env}/ints.json",
         {"c.yaml": json_data("{env}/ints.json")}),
    Case("run/data-json-list-malformed", ["run", "{tmp}/c.yaml", *RUN_OVER], "{tmp}/d.json:3",
         {"c.yaml": json_data("{tmp}/d.json"),
          "d.json": '[{"instruction": "a", "output": "b"},\n {"instruction": "c", "output": "d"},\n {"output": ]\n'}),
    Case("run/data-malformed-line", ["run", "{tmp}/c.yaml", *RUN_OVER], "{tmp}/d.jsonl:2",
         {"c.yaml": json_data("{tmp}/d.jsonl"),
          "d.jsonl": '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": }\n'}),
    Case("run/data-ni-not-utf8", ["run", "{tmp}/c.yaml", *RUN_OVER], "{env}/ni/task_latin1.json",
         {"c.yaml": cfg(data={"source": "natural_instructions", "path": "{env}/ni", "tasks": None})}),
    Case("run/data-source-unknown", ["run", "{tmp}/c.yaml", *RUN_OVER], "data.source",
         {"c.yaml": cfg(data={"source": "parquet"})}),
    # --out and --resume
    Case("run/out-a-file", ["run", "{tmp}/c.yaml", "--out", "{env}/afile.txt", "-q"], "--out",
         {"c.yaml": cfg()}),
    Case("run/out-a-file-overwrite", ["run", "{tmp}/c.yaml", "--out", "{env}/afile.txt", "--overwrite", "-q"],
         "--out", {"c.yaml": cfg()}),
    Case("run/out-used", ["run", "{tmp}/c.yaml", "--out", "{run}", "-q"], "--out", {"c.yaml": cfg()}),
    Case("run/resume-not-a-run", ["run", "--resume", "{tmp}", "-q"], "--resume"),
    Case("run/resume-a-file", ["run", "--resume", "{env}/afile.txt", "-q"], "--resume"),
    Case("run/resume-with-overwrite", ["run", "--resume", "{run}", "--overwrite", "-q"], "--overwrite"),
    Case("run/resume-empty-checkpoint", ["run", "--resume", "{tmp}/r", "-q"], "{tmp}/r/checkpoint.pt",
         {"r": COPY_RUN, "r/checkpoint.pt": b""}),
    Case("run/resume-garbage-checkpoint", ["run", "--resume", "{tmp}/r", "-q"], "{tmp}/r/checkpoint.pt",
         {"r": COPY_RUN, "r/checkpoint.pt": b"not a checkpoint at all\n"}),
    Case("run/resume-truncated-checkpoint", ["run", "--resume", "{tmp}/r", "-q"], "{tmp}/r/checkpoint.pt",
         {"r": COPY_RUN, "r/checkpoint.pt": lambda old: old[:300]}),
    Case("run/resume-config-not-utf8", ["run", "--resume", "{tmp}/r", "-q"], "{tmp}/r/config.yaml",
         {"r": COPY_RUN, "r/config.yaml": b"seed: 0 # \xff\xfe\n"}),
    # -- mira compare -------------------------------------------------------------------------
    Case("compare/algorithms-empty", ["compare", "{env}/cfg.yaml", "-a", "", *RUN_OVER], "--algorithms"),
    Case("compare/algorithms-commas", ["compare", "{env}/cfg.yaml", "-a", " , ", *RUN_OVER], "--algorithms"),
    Case("compare/seeds-empty", ["compare", "{env}/cfg.yaml", "-a", "local", "--seeds", "", *RUN_OVER], "--seeds"),
    Case("compare/seeds-commas", ["compare", "{env}/cfg.yaml", "-a", "local", "--seeds", ",", *RUN_OVER], "--seeds"),
    Case("compare/seeds-not-numbers", ["compare", "{env}/cfg.yaml", "-a", "local", "--seeds", "a,b", *RUN_OVER],
         "--seeds"),
    Case("compare/seed-twice", ["compare", "{env}/cfg.yaml", "-a", "local", "--seeds", "1,1", *RUN_OVER], "--seeds"),
    Case("compare/algorithm-unknown", ["compare", "{env}/cfg.yaml", "-a", "local,fedsgd", *RUN_OVER], "fedsgd"),
    Case("compare/option-inf", ["compare", "{env}/cfg.yaml", "-a", "fedprox:mu=.inf", *RUN_OVER], "algorithm.mu"),
    Case("compare/option-not-key-value", ["compare", "{env}/cfg.yaml", "-a", "fedprox:mu", *RUN_OVER], "--algorithms"),
    Case("compare/baseline-unknown", ["compare", "{env}/cfg.yaml", "-a", "local", "--baseline", "zzz", *RUN_OVER],
         "--baseline"),
    Case("compare/out-a-file", ["compare", "{env}/cfg.yaml", "-a", "local", "--out", "{env}/afile.txt", "-q"], "--out"),
    Case("compare/config-not-utf8", ["compare", "{tmp}/c.yaml", "-a", "local", *RUN_OVER], "{tmp}/c.yaml",
         {"c.yaml": b"seed: 0 # \xff\n"}),
    Case("compare/resume-garbage", ["compare", "--resume", "{tmp}/c", "-q"], "--resume",
         {"c/comparison.json": "{ not json"}),
    Case("compare/resume-not-utf8", ["compare", "--resume", "{tmp}/c", "-q"], "--resume",
         {"c/comparison.json": b"\xff\xfe\x00"}),
    # -- mira tune ----------------------------------------------------------------------------
    Case("tune/seeds-empty", ["tune", "{env}/cfg.yaml", "--grid", "algorithm.lambda=[0.5,1]", "--seeds", "",
                              *RUN_OVER], "--seeds"),
    Case("tune/grid-no-equals", ["tune", "{env}/cfg.yaml", "--grid", "algorithm.lambda", *RUN_OVER], "--grid"),
    Case("tune/grid-empty-list", ["tune", "{env}/cfg.yaml", "--grid", "algorithm.lambda=[]", *RUN_OVER], "--grid"),
    Case("tune/grid-inf", ["tune", "{env}/cfg.yaml", "--grid", "algorithm.lambda=[0.5,.inf]", *RUN_OVER], "lambda"),
    Case("tune/grid-rounds-true", ["tune", "{env}/cfg.yaml", "--grid", "federation.rounds=[1,true]", *RUN_OVER],
         "federation.rounds"),
    Case("tune/out-a-file", ["tune", "{env}/cfg.yaml", "--grid", "algorithm.lambda=[0.5,1]", "--out",
                             "{env}/afile.txt", "-q"], "--out"),
    # -- mira merge ---------------------------------------------------------------------------
    Case("merge/recipe-missing", ["merge", "{tmp}/none.yaml", *RUN_OVER], "{tmp}/none.yaml"),
    Case("merge/recipe-not-utf8", ["merge", "{tmp}/r.yaml", *RUN_OVER], "{tmp}/r.yaml",
         {"r.yaml": b"merge_method: linear # \xff\n"}),
    Case("merge/recipe-malformed-yaml", ["merge", "{tmp}/r.yaml", *RUN_OVER], "{tmp}/r.yaml",
         {"r.yaml": "models: [a, b\n"}),
    Case("merge/method-unknown", ["merge", "{tmp}/r.yaml", *RUN_OVER], "merge_method",
         {"r.yaml": recipe(merge_method="average")}),
    Case("merge/models-empty", ["merge", "{tmp}/r.yaml", *RUN_OVER], "models", {"r.yaml": recipe(models=[])}),
    Case("merge/weight-nan", ["merge", "{tmp}/r.yaml", *RUN_OVER], "models[0].parameters.weight",
         {"r.yaml": recipe(models=[{"model": "{model}", "parameters": {"weight": NAN}}, "{model}"])}),
    Case("merge/weight-true", ["merge", "{tmp}/r.yaml", *RUN_OVER], "models[0].parameters.weight",
         {"r.yaml": recipe(models=[{"model": "{model}", "parameters": {"weight": True}}, "{model}"])}),
    Case("merge/lambda-inf", ["merge", "{tmp}/r.yaml", *RUN_OVER], "parameters.lambda",
         {"r.yaml": recipe(merge_method="task_arithmetic", base_model="{model}", parameters={"lambda": INF})}),
    Case("merge/shapes-differ", ["merge", "{tmp}/r.yaml", *RUN_OVER], "{env}/wide_model",
         {"r.yaml": recipe(models=["{model}", "{env}/wide_model"])}),
    Case("merge/heads-differ", ["merge", "{tmp}/r.yaml", *RUN_OVER], "num_attention_heads",
         {"r.yaml": recipe(models=["{model}", "{env}/heads_model"])}),
    Case("merge/zero-byte-weights", ["merge", "{tmp}/r.yaml", *RUN_OVER], "models[1].model",
         {"r.yaml": recipe(models=["{model}", "{env}/zero_weights"])}),
    Case("merge/out-a-file", ["merge", "{tmp}/r.yaml", "--out", "{env}/afile.txt", "--overwrite", "-q"],
         "{env}/afile.txt", {"r.yaml": recipe()}),
    Case("merge/out-is-an-input", ["merge", "{tmp}/r.yaml", "--out", "{model}", "--overwrite", "-q"],
         "{model}", {"r.yaml": recipe()}),
    Case("merge/shard-size-zero", ["merge", "{tmp}/r.yaml", "--shard-size", "0", *RUN_OVER], "--shard-size",
         {"r.yaml": recipe()}),
    Case("merge/shard-size-nan", ["merge", "{tmp}/r.yaml", "--shard-size", "nan", *RUN_OVER], "--shard-size",
         {"r.yaml": recipe()}),
    # -- mira glue ----------------------------------------------------------------------------
    Case("glue/zoo-missing", ["glue", "{tmp}/none.yaml", *RUN_OVER], "{tmp}/none.yaml"),
    Case("glue/zoo-not-utf8", ["glue", "{tmp}/z.yaml", *RUN_OVER], "{tmp}/z.yaml", {"z.yaml": b"members: # \xff\n"}),
    Case("glue/zoo-empty", ["glue", "{tmp}/z.yaml", *RUN_OVER], "validation", {"z.yaml": ""}),
    Case("glue/no-members", ["glue", "{tmp}/z.yaml", *RUN_OVER], "members", {"z.yaml": zoo(members=[])}),
    Case("glue/member-missing", ["glue", "{tmp}/z.yaml", *RUN_OVER], "members[0].path",
         {"z.yaml": zoo(members=[{"path": "{tmp}/nope"}])}),
    Case("glue/member-zero-byte-weights", ["glue", "{tmp}/z.yaml", *RUN_OVER], "members[0]",
         {"z.yaml": zoo(members=[{"path": "{env}/zero_weights"}])}),
    Case("glue/temperature-inf", ["glue", "{tmp}/z.yaml", *RUN_OVER], "mixture.temperature",
         {"z.yaml": zoo(mixture={"temperature": INF})}),
    Case("glue/budget-true", ["glue", "{tmp}/z.yaml", *RUN_OVER], "strategy.budget",
         {"z.yaml": zoo(strategy={"budget": True})}),
    Case("glue/out-a-file", ["glue", "{tmp}/z.yaml", "--out", "{env}/afile.txt", "--overwrite", "-q"],
         "{env}/afile.txt", {"z.yaml": zoo()}),
    # -- mira refine --------------------------------------------------------------------------
    Case("refine/data-missing", ["refine", "{tmp}/none.jsonl", *REFINE], "DATA"),
    Case("refine/data-not-utf8", ["refine", "{env}/latin1.jsonl", *REFINE], "{env}/latin1.jsonl:2"),
    Case("refine/data-a-folder-dolly", ["refine", "{env}/datadir", "--source", "dolly", *REFINE], "{env}/datadir"),
    Case("refine/data-field-empty-list", ["refine", "{env}/emptylist.jsonl", *REFINE], "{env}/emptylist.jsonl:1"),
    Case("refine/val-data-not-utf8", ["refine", "{env}/good.jsonl", "--val-data", "{env}/latin1.jsonl", *REFINE],
         "{env}/latin1.jsonl:2"),
    Case("refine/budget-word", ["refine", "{env}/good.jsonl", "--budget", "half", *REFINE], "--budget"),
    Case("refine/budget-zero", ["refine", "{env}/good.jsonl", "--budget", "0", *REFINE], "--budget"),
    Case("refine/beta-nan", ["refine", "{env}/good.jsonl", "--beta", "nan", *REFINE], "--beta"),
    Case("refine/tolerance-inf", ["refine", "{env}/good.jsonl", "--tolerance", "inf", *REFINE], "--tolerance"),
    Case("refine/val-fraction-nan", ["refine", "{env}/good.jsonl", "--val-fraction", "nan", *REFINE],
         "--val-fraction"),
    Case("refine/strategy-unknown", ["refine", "{env}/good.jsonl", "--strategy", "best", *REFINE], "--strategy"),
    Case("refine/out-a-folder", ["refine", "{env}/good.jsonl", "--model", "{model}", "--embedder", "hashing",
                                 "--out", "{run}", "-q"], "--out"),
    Case("refine/model-zero-byte-weights", ["refine", "{env}/good.jsonl", *REFINE[2:], "--model",
                                            "{env}/zero_weights"], "{env}/zero_weights"),
    # -- mira serve (must fail before binding a port) -----------------------------------------
    Case("serve/model-missing", ["serve", "{tmp}/nope"], "MODEL_DIR", env=KEY),
    Case("serve/model-zero-byte-weights", ["serve", "{env}/zero_weights"], "{env}/zero_weights", env=KEY),
    Case("serve/model-truncated-weights", ["serve", "{env}/trunc_weights"], "{env}/trunc_weights", env=KEY),
    Case("serve/model-no-tokenizer", ["serve", "{env}/no_tokenizer"], "{env}/no_tokenizer", env=KEY),
    Case("serve/no-api-key", ["serve", "{model}"], "--api-key-env", env={"MIRA_API_KEY": None}),
    Case("serve/port-out-of-range", ["serve", "{model}", "--port", "70000"], "--port", env=KEY),
    Case("serve/dtype-unknown", ["serve", "{model}", "--dtype", "float8"], "--dtype", env=KEY),
    Case("serve/max-batch-zero", ["serve", "{model}", "--max-batch", "0"], "--max-batch", env=KEY),
    # -- mira proxy ---------------------------------------------------------------------------
    Case("proxy/train-proxy-missing", ["proxy", "train", "--proxy", "{tmp}/nope", "--out", "{tmp}/a", "--source",
                                       "synthetic", "--max-records", "8", "-q"], "--proxy"),
    Case("proxy/train-data-not-utf8", [*TRAIN, "--data", "{env}/latin1.jsonl"], "{env}/latin1.jsonl:2"),
    Case("proxy/train-data-a-folder", [*TRAIN, "--source", "dolly", "--data", "{env}/datadir"], "{env}/datadir"),
    Case("proxy/train-lr-nan", [*TRAIN, "--data", "{env}/good.jsonl", "--lr", "nan"], "--lr"),
    Case("proxy/train-max-records-zero", [*TRAIN, "--data", "{env}/good.jsonl", "--max-records", "0"],
         "--max-records"),
    Case("proxy/train-out-a-file", ["proxy", "train", "--proxy", "{model}", "--out", "{env}/afile.txt", "--data",
                                    "{env}/good.jsonl", "-q"], "--out"),
    Case("proxy/generate-no-api-key", GENERATE, "--api-key-env", env={"MIRA_API_KEY": None}),
    Case("proxy/generate-encoding", [*GENERATE, "--encoding", "hex"], "--encoding", env=KEY),
    Case("proxy/generate-alpha-nan", [*GENERATE, "--alpha", "nan"], "--alpha", env=KEY),
    Case("proxy/generate-proxy-zero-byte-weights", [*GENERATE[:5], "{env}/zero_weights", *GENERATE[6:]],
         "{env}/zero_weights", env=KEY),
    Case("proxy/build-models-source-missing", ["proxy", "build-models", "--source", "{tmp}/nope", "--stories",
                                               "{tmp}/s.txt", "--dolly", "{env}/good.jsonl", "--out", "{tmp}/b"],
         "--source"),
    # -- mira flower (must fail before starting or contacting anything) -----------------------
    Case("flower/run-no-tls", ["flower", "run", "{env}/cfg.yaml"], "--root-cert"),
    Case("flower/run-lr-inf", ["flower", "run", "{tmp}/c.yaml", "--insecure"], "federation.lr",
         {"c.yaml": cfg(federation={"lr": INF})}),
    Case("flower/run-config-not-utf8", ["flower", "run", "{tmp}/c.yaml", "--insecure"], "{tmp}/c.yaml",
         {"c.yaml": b"seed: 0 # \xff\n"}),
    Case("flower/run-resume-without-run-dir", ["flower", "run", "--insecure", "--resume"], "--resume"),
    Case("flower/run-resume-run-dir-without-config", ["flower", "run", "--insecure", "--resume", "{tmp}"], "--resume"),
    Case("flower/run-round-timeout-nan", ["flower", "run", "{env}/cfg.yaml", "--insecure", "--round-timeout", "nan"],
         "--round-timeout"),
    Case("flower/app-rounds-true", ["flower", "app", "{tmp}/c.yaml", "--app-dir", "{tmp}/app"], "federation.rounds",
         {"c.yaml": cfg(federation={"rounds": True})}),
    Case("flower/local-device-unknown", ["flower", "local", "{tmp}/c.yaml", "--out", "{tmp}/o"], "model.device",
         {"c.yaml": cfg(model={"path": "{model}", "device": "tpu9"})}),
    Case("flower/supernode-partition", ["flower", "supernode", "--partition-id", "3", "--num-partitions", "2",
                                        "--insecure", "--dry-run"], "--partition-id"),
    Case("flower/supernode-key-missing", ["flower", "supernode", "--partition-id", "0", "--num-partitions", "2",
                                          "--root-cert", "{env}/afile.txt", "--key", "{tmp}/nokey", "--dry-run"],
         "--key"),
    Case("flower/superlink-certs-missing", ["flower", "superlink", "--certs", "{tmp}/nocerts", "--dry-run"],
         "--certs"),
    Case("flower/certs-out-a-file", ["flower", "certs", "--out", "{env}/afile.txt"], "--out"),
    # -- mira data inspect --------------------------------------------------------------------
    Case("data/config-not-utf8", ["data", "inspect", "{tmp}/c.yaml"], "{tmp}/c.yaml", {"c.yaml": b"seed: 0 # \xff\n"}),
    Case("data/data-not-utf8", ["data", "inspect", "{tmp}/c.yaml"], "{env}/latin1.jsonl:2",
         {"c.yaml": json_data("{env}/latin1.jsonl")}),
    Case("data/field-empty-list", ["data", "inspect", "{tmp}/c.yaml"], "{env}/emptylist.jsonl:1",
         {"c.yaml": json_data("{env}/emptylist.jsonl")}),
    Case("data/model-no-tokenizer", ["data", "inspect", "{tmp}/c.yaml"], "{env}/no_tokenizer",
         {"c.yaml": cfg(model={"path": "{env}/no_tokenizer"})}),
    Case("data/examples-negative", ["data", "inspect", "{env}/cfg.yaml", "-n", "-1"], "--examples"),
    Case("data/max-length-true", ["data", "inspect", "{env}/cfg.yaml", "--set", "data.max_length=true"],
         "data.max_length"),
    # -- mira models get ----------------------------------------------------------------------
    Case("models/get-unknown", ["models", "get", "no-such-model"], "no-such-model"),
    Case("models/get-empty", ["models", "get", ""], "ALIAS"),
    Case("models/get-bad-source", ["models", "get", "smollm2-135m-instruct"], "MIRA_MODEL_SOURCE",
         env={"MIRA_MODEL_SOURCE": "ftp"}),
]


# -- the shared inputs, built once --------------------------------------------------------------


def _write(path: Path, content: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if callable(content):
        content = content(path.read_bytes())
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


def _fill(text: str, ctx: dict[str, str]) -> str:
    for key, value in ctx.items():
        text = text.replace("{" + key + "}", value)
    return text


@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    cache = tmp_path_factory.mktemp("bad_inputs_cache")
    old_cache = os.environ.get("MIRA_CACHE")
    os.environ["MIRA_CACHE"] = str(cache)
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)
    ctx = {"env": str(root), "model": str(model), "run": str(root / "run")}
    weights = (model / "model.safetensors").read_bytes()
    for name, data in (("zero_weights", b""), ("trunc_weights", weights[: len(weights) // 2])):
        shutil.copytree(model, root / name)
        (root / name / "model.safetensors").write_bytes(data)
    (root / "no_tokenizer").mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        if (model / name).exists():
            shutil.copy(model / name, root / "no_tokenizer" / name)
    shutil.copytree(model, root / "bad_config_json")
    (root / "bad_config_json" / "config.json").write_text("{not json")
    from transformers import AutoTokenizer

    from mira.models.demo import build_model

    wide = build_model(len(AutoTokenizer.from_pretrained(model)), hidden=48, layers=2, seed=1)
    wide.save_pretrained(root / "wide_model")
    # the same tensor names and shapes as {model}, but 8 heads of 4 instead of 4 heads of 8: a merge is noise
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((model / "config.json").read_text())
    same_shapes = LlamaConfig(**{**config, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 4})
    LlamaForCausalLM(same_shapes).save_pretrained(root / "heads_model")
    good = [{"instruction": f"say {w}", "output": f"{w} {w}", "task": t} for t in ("a", "b") for w in
            ("one", "two", "three", "four", "five", "six")]
    (root / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
    (root / "latin1.jsonl").write_bytes(b'{"instruction": "a", "output": "b"}\n'
                                        b'{"instruction": "caf\xe9", "output": "b"}\n')
    (root / "emptylist.jsonl").write_text('{"instruction": [], "output": "x"}\n')
    (root / "ints.json").write_text("[1, 2]\n")
    (root / "datadir").mkdir()
    (root / "datadir" / "readme.txt").write_text("not data\n")
    (root / "ni").mkdir()
    (root / "ni" / "task_latin1.json").write_bytes(b'{"Definition": "caf\xe9", "Instances": []}')
    (root / "afile.txt").write_text("precious\n")
    (root / "cfg.yaml").write_text(_fill(cfg(), ctx))
    assert main(["run", str(root / "cfg.yaml"), "--out", ctx["run"], "-q"]) == 0
    assert (root / "run" / "checkpoint.pt").exists()
    pristine = tmp_path_factory.mktemp("bad_inputs_pristine") / "env"
    shutil.copytree(root, pristine, symlinks=True)
    yield {**ctx, "pristine": str(pristine)}
    if old_cache is None:
        os.environ.pop("MIRA_CACHE", None)
    else:
        os.environ["MIRA_CACHE"] = old_cache


def _snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` (hidden ones too), files by content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        out[key] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


def _no_side_effects(monkeypatch):
    """A case that got past validation would open a port, exec Flower or contact a SuperLink: fail loudly."""
    import uvicorn

    def refuse(*args, **kwargs):
        raise AssertionError("a bad input got as far as starting a server or a process")

    monkeypatch.setattr(uvicorn, "run", refuse)
    monkeypatch.setattr(os, "execve", refuse)
    monkeypatch.setattr("mira.federated.flower.bundle.submit", refuse)
    monkeypatch.setattr("mira.federated.flower.launch.LocalFederation.start_superlink", refuse)


def test_the_corpus_is_large_and_distinct():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)
    assert len({(tuple(c.argv), repr(sorted(c.files.items(), key=str))) for c in CASES}) == len(CASES)
    commands = {c.argv[0] if c.argv[0] not in ("data", "models", "proxy") else " ".join(c.argv[:2]) for c in CASES}
    for needed in ("run", "compare", "tune", "merge", "glue", "refine", "serve", "flower", "data inspect",
                   "models get"):
        assert needed in commands, needed
    assert any(c.argv[0] == "proxy" for c in CASES)


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_bad_input(case: Case, env, tmp_path, capsys, monkeypatch):
    ctx = {**env, "tmp": str(tmp_path)}
    for rel, content in case.files.items():
        if content is COPY_RUN:
            shutil.copytree(env["run"], tmp_path / rel)
        else:
            _write(tmp_path / rel, content if isinstance(content, bytes) or callable(content) else _fill(content, ctx))
    monkeypatch.delenv("MIRA_API_KEY", raising=False)
    for name, value in case.env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    _no_side_effects(monkeypatch)
    root = Path(env["env"])
    before = _snapshot(root), _snapshot(tmp_path)
    capsys.readouterr()

    try:
        code = main([_fill(a, ctx) for a in case.argv])
    finally:
        after = _snapshot(root)
        if after != before[0]:  # put the shared inputs back, so that one failure does not spread to other cases
            shutil.rmtree(root)
            shutil.copytree(env["pristine"], root, symlinks=True)

    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert "Traceback" not in err and "Traceback" not in out, err
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    expected = _fill(case.expected, ctx)
    assert expected in lines[0], f"{expected!r} not named in: {lines[0]}"
    assert (after, _snapshot(tmp_path)) == before, "an earlier result or input changed"


# -- the boundary itself --------------------------------------------------------------------------


def _zero_byte_safetensors(tmp_path):
    from safetensors import safe_open

    (tmp_path / "w.safetensors").write_bytes(b"")
    try:
        safe_open(str(tmp_path / "w.safetensors"), framework="pt")
    except Exception as e:  # SafetensorError
        return e
    raise AssertionError("safetensors opened an empty file")


def _validation_error():
    from mira.config import FederationConfig

    try:
        FederationConfig.model_validate({"rounds": "many"})
    except Exception as e:  # pydantic's ValidationError
        return e
    raise AssertionError


@pytest.mark.parametrize("make,named", [
    (lambda tmp: FileNotFoundError(2, "No such file or directory", "/no/such/file.jsonl"), "/no/such/file.jsonl"),
    (lambda tmp: IsADirectoryError(21, "Is a directory", "/some/folder"), "/some/folder: Is a directory"),
    (lambda tmp: UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "not UTF-8 text"),
    (lambda tmp: _validation_error(), "rounds: Input should be a valid integer"),
    (_zero_byte_safetensors, "unreadable safetensors file"),
    (lambda tmp: yaml.YAMLError("bad yaml"), "malformed YAML"),
    (lambda tmp: json.JSONDecodeError("Expecting value", "{", 1), "malformed JSON at line 1"),
], ids=["not-found", "a-folder", "decode", "pydantic", "safetensors", "yaml", "json"])
def test_expected_failures_that_reach_the_boundary_are_one_line_exit_2(tmp_path, capsys, monkeypatch, make, named):
    """A reader that let an OS, decoding, validation or file-format error through still gives one line, exit 2."""
    error = make(tmp_path)

    def reader(path, overrides=()):
        raise error

    monkeypatch.setattr("mira.config.load_config", reader)
    monkeypatch.setenv("MIRA_CACHE", str(tmp_path / "cache"))
    code = main(["run", "--out", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: ") and named in err, err
    assert not (tmp_path / "cache" / "crash").exists() and not (tmp_path / "o").exists()


def test_an_eof_error_is_not_reported_as_ctrl_c(tmp_path, capsys, monkeypatch):
    """click turns an ``EOFError`` into an abort; the boundary reports it as the error it is (exit 1, not 130)."""
    def reader(path, overrides=()):
        raise EOFError("ran out of input")

    monkeypatch.setattr("mira.config.load_config", reader)
    monkeypatch.setenv("MIRA_CACHE", str(tmp_path / "cache"))
    code = main(["run", "--out", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "aborted" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: internal error: EOFError: ran out of input (traceback saved to ")
    assert len(list((tmp_path / "cache" / "crash").iterdir())) == 1


def test_ctrl_c_is_still_aborted(tmp_path, capsys, monkeypatch):
    def reader(path, overrides=()):
        raise KeyboardInterrupt

    monkeypatch.setattr("mira.config.load_config", reader)
    assert main(["run", "--out", str(tmp_path / "o"), "-q"]) == 130
    assert capsys.readouterr().err.strip() == "aborted"


def test_commands_are_registered_once(capsys):
    import mira.cli

    main(["models", "list"])
    main(["models", "list"])
    capsys.readouterr()
    names = [c.name or c.callback.__name__ for c in mira.cli.app.registered_commands]
    assert len(names) == len(set(names)), "each main() call added the commands again"


# -- numbers and types: YAML ints stay valid floats, the empty config says so -----------------------


def test_yaml_ints_are_valid_floats_and_defaults_apply(tiny_model_dir, tmp_path):
    from mira.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(_fill(cfg(federation={"lr": 1, "fraction": 1, "grad_clip": 2}, lora={"r": 4, "alpha": 8}),
                          {"model": str(tiny_model_dir)}))
    c, _ = load_config(path, ["algorithm.lambda=1", "partition.test_fraction=0.5"])
    assert c.federation.lr == 1.0 and isinstance(c.federation.lr, float) and c.lora.alpha == 8.0
    assert c.algorithm.params()["lambda"] == 1
    # PyYAML reads 3e-4 as a string (YAML 1.1); mira's reader makes it the float it is (YAML 1.2)
    path.write_text(path.read_text().replace("lr: 1", "lr: 3e-4"))
    c, _ = load_config(path, ["federation.weight_decay=1e-2"])
    assert c.federation.lr == 3e-4 and c.federation.weight_decay == 0.01


def test_an_empty_config_runs_the_defaults_and_says_so(tmp_path, caplog):
    from mira.config import RunConfig, load_config

    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here yet\n")
    with caplog.at_level("WARNING", logger="mira"):
        c, raw = load_config(path)
    assert raw == {} and c == RunConfig()
    assert f"{path} is empty: every field takes its default value" in caplog.text
