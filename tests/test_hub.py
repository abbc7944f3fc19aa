"""Publishing to the Hub: cards from hub_cards/ (metadata valid for huggingface_hub, snippets that run), Hub-ready
folders that load as remote code, uploads through huggingface_hub against a local fake of the Hub's HTTP API, and
evaluation with lm-eval on the shipped offline task."""

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results
from transformers import AutoModelForCausalLM, AutoTokenizer

from fake_hub import FakeHub
from isolation import run_without_package
from modeling_mobilemoe import MobileMoEConfig, MobileMoEForCausalLM, MobileMoEQATConfig
from modeling_mobilemoe.cli import build_parser, main
from modeling_mobilemoe.hub.evaluation import task_manager
from modeling_mobilemoe.hub import (
    LOCAL_TASK,
    LOCAL_TASKS_DIR,
    PAPER_GROUP,
    TEMPLATES_DIR,
    assemble_folder,
    evaluate,
    load_results,
    publish,
    render_card,
    validate_card,
)
from modeling_mobilemoe.quantization import convert_to_int4
from modeling_mobilemoe.tokenizer_training import shipped_tokenizer_path


REPOSITORY = Path(__file__).resolve().parents[1]


def _cli(*args, env=None, cwd=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "modeling_mobilemoe.cli", *args],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout,
    )  # fmt: skip


def _stage_summary(folder: Path, stage: str) -> None:
    summary = {"stage": stage, "steps": 12, "train_loss": 3.21, "seconds": 4.0,
               "before": {"heldout_loss": 7.6}, "after": {"heldout_loss": 3.1}}  # fmt: skip
    (folder / "stage_summary.json").write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A tiny model as the training runner leaves it: weights, tokenizer, remote code, a midtrain stage summary."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base")
    model = MobileMoEForCausalLM(MobileMoEConfig.from_preset("tiny", num_hidden_layers=2))
    for block in model.moe_blocks():  # a selection bias that changes which experts win, as trained models have
        block.expert_bias.normal_(0, 0.3)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(shipped_tokenizer_path()).save_pretrained(folder)
    _stage_summary(folder, "midtrain")
    (folder / "training_args.bin").write_bytes(b"not for the Hub")  # what Trainer leaves next to a model
    return folder


@pytest.fixture(scope="module")
def qat_folder(base_folder, tmp_path_factory):
    """The tiny model after QAT: packed INT4 weights plus its quantization_config (no stage summary)."""
    folder = tmp_path_factory.mktemp("qat")
    model = AutoModelForCausalLM.from_pretrained(base_folder, quantization_config=MobileMoEQATConfig())
    convert_to_int4(model).save_pretrained(folder)
    AutoTokenizer.from_pretrained(base_folder).save_pretrained(folder)
    return folder


def _lm_eval_like_results(value: float = 0.375) -> dict:
    """The layout of lm-eval's results JSON (what `mobilemoe eval` and `lm_eval --output_path` write)."""
    return {
        "results": {
            "hellaswag": {"alias": "hellaswag", "acc,none": value, "acc_stderr,none": 0.0048,
                          "acc_norm,none": 0.61, "acc_norm_stderr,none": 0.0049},
            "nq_open": {"alias": "nq_open", "exact_match,remove_whitespace": 0.11,
                        "exact_match_stderr,remove_whitespace": "N/A"},
        },
        "n-shot": {"hellaswag": 0, "nq_open": 5},
        "n-samples": {"hellaswag": {"original": 10042, "effective": 10042}, "nq_open": {"original": 3610, "effective": 3610}},
        "configs": {"hellaswag": {"dataset_path": "Rowan/hellaswag", "validation_split": "validation"},
                    "nq_open": {"dataset_path": "nq_open", "validation_split": "validation"}},
        "lm_eval_version": "0.4.13",
    }  # fmt: skip


def _code_blocks(card: str) -> list[tuple[str, str]]:
    return re.findall(r"```(\w+)\n(.*?)```", card, flags=re.S)


# ---------------------------------------------------------------------------------------------------------------------
# Cards


@pytest.mark.parametrize("size", ["S", "M", "L"])
def test_published_cards_fill_the_architecture_and_keep_the_paper_apart(size, tmp_path):
    MobileMoEConfig.from_preset(size).save_pretrained(tmp_path)  # a config is enough to render a card
    config = MobileMoEConfig.from_pretrained(tmp_path)
    active = f"{config.num_active_parameters() / 1e6:.1f}M"
    for variant in ("Base", "SFT", "QAT"):
        card = render_card(tmp_path, variant=variant)
        text = str(card)
        data = validate_card(card)
        assert data.model_name == f"MobileMoE-{size}-{variant}"
        assert f"| layers | {config.num_hidden_layers} |" in text and f"| hidden size | {config.hidden_size} |" in text
        assert f"| active / total parameters | {active} / {config.num_parameters() / 1e9:.2f}B |" in text
        assert f"{config.int4_weight_bytes() / 2**30:.2f} GiB" in text
        assert "60 routed (top-4" in text
        # Base has no base model; SFT was trained from Base and QAT from SFT, the published repos.
        expected_base = {"Base": None, "SFT": f"facebook/MobileMoE-{size}-Base", "QAT": f"facebook/MobileMoE-{size}-SFT"}
        assert data.base_model == expected_base[variant]
        assert "allenai/olmo-mix-1124" in data.datasets
        assert data.license == "other" and data.license_link == f"https://huggingface.co/facebook/MobileMoE-{size}-{variant}"
        assert ("int4" in data.tags) == (variant == "QAT") and "custom_code" in data.tags
        # The paper's numbers are there, labelled, and not in the model-index (nothing was measured).
        assert "### Reported in the paper (not measured on this checkpoint)" in text
        assert {"S": "58.9", "M": "55.4", "L": "59.8"}[size] in text
        assert "model-index" not in data.to_dict() and "Not evaluated yet" in text
        assert ("2.3-2.8 average points" in " ".join(text.split())) == (variant == "QAT")


def test_every_template_is_rendered_and_shares_the_layout():
    templates = sorted(path.name for path in TEMPLATES_DIR.glob("MobileMoE-*.md"))
    expected = sorted(f"MobileMoE-{s}-{v}.md" for s in ("S", "M", "L", "custom") for v in ("Base", "SFT", "QAT"))
    assert templates == expected
    for name in templates:
        source = (TEMPLATES_DIR / name).read_text()
        assert '{% extends "_partials/card.md" %}' in source, name
        assert len(source.splitlines()) < 15, f"{name}: shared parts belong in _partials/, included"


def test_custom_card_from_a_trained_folder_with_results(base_folder, tmp_path):
    results_path = tmp_path / "eval.json"
    results_path.write_text(json.dumps(_lm_eval_like_results()))
    card = render_card(base_folder, results=results_path, repo_id="alice/tiny-base")
    text = str(card)
    data = validate_card(card)
    assert data.model_name == "tiny-base" and data.base_model is None
    assert "not one of Meta's releases" in " ".join(text.split()) and "Reported in the paper" not in text
    assert "| midtrain | 12 | 3.210 | heldout_loss 7.600 -> 3.100 | 4 s |" in text  # its stage_summary.json
    assert "| hellaswag | acc | 0.3750 | 0.0048 | 0 | 10042 |" in text
    assert "| nq_open | exact_match (remove_whitespace) | 0.1100 |  | 5 | 3610 |" in text

    # The YAML header, read back the way the Hub reads it, has the fields and a model-index that parses.
    card.save(tmp_path / "README.md")
    metadata = metadata_load(tmp_path / "README.md")
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-generation"
    assert {"mobilemoe", "mixture-of-experts", "custom_code"} <= set(metadata["tags"])
    name, results = model_index_to_eval_results(metadata["model-index"])
    assert name == "tiny-base"
    by_metric = {(r.dataset_name, r.metric_type): r for r in results}
    assert by_metric[("hellaswag", "acc")].metric_value == 0.375
    assert by_metric[("hellaswag", "acc")].dataset_type == "Rowan/hellaswag"
    assert by_metric[("nq_open", "exact_match")].dataset_args == {"num_few_shot": 5}
    assert ModelCard.load(tmp_path / "README.md").data.eval_results[0].metric_value == 0.375


def test_qat_folder_is_detected_and_its_card_says_int4(qat_folder):
    card = render_card(qat_folder, repo_id="alice/tiny-qat")
    assert "int4" in card.data.tags and "conversational" in card.data.tags
    assert "packed INT4" in str(card) and "### More QAT" in str(card)


@pytest.mark.parametrize(
    "results, message",
    [
        ({"hellaswag": {"acc,none": 0.5}}, "results: expected lm-eval's results JSON"),
        ({"results": {"hellaswag": [0.5]}}, "results.results.hellaswag: expected an object of metrics"),
        ({"results": {"hellaswag": {"acc,none": "high"}}}, "results.results.hellaswag.acc,none: expected a number"),
        ({"results": {"hellaswag": {"alias": "hellaswag"}}}, "results.results.hellaswag: no metric"),
        ({"results": {"hellaswag": {"acc,none": 0.5}}, "n-shot": [0]}, "results.n-shot: expected an object"),
    ],
)
def test_results_of_the_wrong_shape_name_the_field(results, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_results(results)


def test_bad_card_and_publish_inputs_name_the_field(base_folder, tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    cases = [
        (lambda: render_card(tmp_path / "missing", variant="Base"), "model: no model folder"),
        (lambda: render_card(base_folder, results=tmp_path / "nope.json"), "results: no file at"),
        (lambda: render_card(base_folder, results=tmp_path / "broken.json"), "results: .* is not JSON"),
        (lambda: render_card(base_folder, size="XL"), "size: 'XL' is not one of"),
        (lambda: render_card(base_folder, size="S"), "size: the model is not MobileMoE-S's shape: num_hidden_layers 2"),
        (lambda: render_card(base_folder, variant="Chat"), "variant: 'Chat' is not one of"),
        (lambda: render_card(base_folder, repo_id="alice/bad name"), "repo_id: "),
        (lambda: render_card(base_folder, repo_id="no-namespace"), "repo_id: 'no-namespace' must be `namespace/name`"),
        (lambda: render_card(base_folder, base_model="a/b/c"), "base_model: "),
        (lambda: publish(base_folder, "alice/x", dry_run=tmp_path / "out", export=["tflite"]), "export: 'tflite'"),
        (lambda: publish(base_folder, "alice/x", dry_run=base_folder), "dry_run: the output folder"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    no_stage = tmp_path / "plain"
    MobileMoEConfig.from_preset("tiny").save_pretrained(no_stage)
    with pytest.raises(ValueError, match="variant: can't tell whether"):
        render_card(no_stage)
    with pytest.raises(ValueError, match="model: .* has no safetensors weights"):
        publish(no_stage, "alice/x", dry_run=tmp_path / "out", variant="Base")
    assert not (tmp_path / "out").exists()  # nothing written before the checks pass


@pytest.mark.slow
def test_card_snippets_run_on_a_local_folder(base_folder, qat_folder, tmp_path, monkeypatch):
    """Every ```python block of the Base and QAT cards runs with the folder in place of the repository id (the
    trust_remote_code one where the package can't be imported; a block both cards share runs once, on the Base
    folder); ```bash blocks hold only the listed commands that need the network or minutes, and the `mobilemoe`
    ones parse."""
    monkeypatch.chdir(tmp_path)
    shell, ran, remote = [], set(), []
    for folder, variant in ((base_folder, "Base"), (qat_folder, "QAT")):
        repo_id = f"alice/tiny-{variant.lower()}"
        blocks = _code_blocks(str(render_card(folder, repo_id=repo_id, variant=variant)))
        python = [code for lang, code in blocks if lang == "python"]
        assert len(python) == {"Base": 6, "QAT": 5}[variant]
        for code in python:
            if code.replace(repo_id, "MODEL") in ran:
                continue
            ran.add(code.replace(repo_id, "MODEL"))
            code = code.replace(repo_id, str(folder))
            if "trust_remote_code=True" in code:
                assert "modeling_mobilemoe" not in code
                remote.append(code)
                continue
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"<{variant} card snippet>", "exec"), {"__name__": "__main__"})
            assert out.getvalue().strip() or "print(" not in code, f"the snippet printed nothing:\n{code}"
        shell += [line for lang, code in blocks if lang == "bash" for line in code.splitlines() if line.strip()]
        assert sum(lang == "bibtex" for lang, _ in blocks) == 1
    assert len(ran) == 9  # the export and evaluation blocks are the same in both cards
    # The trust_remote_code blocks (a base model's and a chat model's), in one interpreter without the package.
    run_all = "import json\nfor code in json.loads(sys.argv[1]):\n    exec(code, {'__name__': '__main__'})\n    print('<end>')"
    printed = run_without_package(run_all, json.dumps(remote), cwd=tmp_path).stdout.split("<end>")
    assert len(remote) == 2 and all(text.strip() for text in printed[:2]), printed

    # What the snippets made: an SFT checkpoint, packed INT4 folders, an ONNX export.
    assert (tmp_path / "mobilemoe-sft" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "mobilemoe-int4" / "config.json").read_text())["quantization"]["format"]
    assert (tmp_path / "mobilemoe-onnx" / "model.onnx").is_file()

    not_run = {
        "pip install": "network", "hf auth": "network", "hf download": "network",
        "mobilemoe export": "ExecuTorch lowering takes minutes (tests/test_export.py runs it)",
        "mobilemoe eval": "the paper's benchmarks download their data", "lm_eval --model": "same, through lm-eval's CLI",
    }  # fmt: skip
    for line in shell:
        command = line.split("#")[0].strip()
        assert any(command.startswith(prefix) for prefix in not_run), f"unexpected shell command in a card: {line}"
        if command.startswith("mobilemoe"):
            build_parser().parse_args(shlex.split(command)[1:])  # a real command line (exits on a bad one)
    assert "--tasks mobilemoe_paper_base" in " ".join(shell)


# ---------------------------------------------------------------------------------------------------------------------
# Publishing


LOAD_WITHOUT_PACKAGE = textwrap.dedent(
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = sys.argv[1]
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    input_ids = tokenizer(["A cow has four legs and", "The day after Monday is"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.save(model(**input_ids).logits, folder + "/../remote_logits.pt")
        generated = model.generate(**input_ids, max_new_tokens=6, do_sample=False)
    torch.save(generated, folder + "/../remote_generated.pt")
    print(type(tokenizer).__name__, type(model).__name__)
    """
)


@pytest.mark.slow
def test_dry_run_folder_loads_as_remote_code_and_matches(base_folder, tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["publish", "--model", str(base_folder), "--repo-id", "alice/tiny-base", "--dry-run", str(out),
                 "--export", "onnx"]) == 0  # fmt: skip
    assert "nothing uploaded" in capsys.readouterr().out
    files = sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file())
    for name in ("README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "configuration_mobilemoe.py", "modeling_mobilemoe.py",
                 "tokenization_mobilemoe.py", "onnx/model.onnx", "onnx/export_config.json"):  # fmt: skip
        assert name in files, name
    assert not any(name.endswith((".bin", ".pt", "stage_summary.json")) for name in files), files
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mobilemoe.MobileMoEForCausalLM"
    assert json.loads((out / "tokenizer_config.json").read_text())["auto_map"]["AutoTokenizer"][0].startswith(
        "tokenization_mobilemoe."
    )
    assert (out / "model.safetensors").read_bytes() == (base_folder / "model.safetensors").read_bytes()
    assert json.loads((out / "onnx" / "export_config.json").read_text())["quantize"] == "none"  # float stays float
    validate_card(ModelCard.load(out / "README.md"))
    assert yaml.safe_load((out / "README.md").read_text().split("---")[1])["library_name"] == "transformers"

    result = run_without_package(LOAD_WITHOUT_PACKAGE, str(out), cwd=tmp_path)
    assert result.stdout.split() == ["MobileMoETokenizer", "MobileMoEForCausalLM"]
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32).eval()
    inputs = tokenizer(["A cow has four legs and", "The day after Monday is"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "remote_logits.pt"), model(**inputs).logits)
        expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(torch.load(tmp_path / "remote_generated.pt"), expected)


@pytest.mark.slow
def test_publish_uploads_the_folder_through_the_hub_http_api(base_folder, tmp_path):
    expected = assemble_folder(base_folder, tmp_path / "expected", repo_id="alice/tiny-base")
    with FakeHub() as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_fake_token", "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(tmp_path / "hf_home")}  # fmt: skip
        env.pop("HF_HUB_OFFLINE", None)
        result = _cli("publish", "--model", str(base_folder), "--repo-id", "alice/tiny-base", "--private",
                      "--commit-message", "First upload", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"uploaded to alice/tiny-base: {hub.url}/alice/tiny-base/commit/" in result.stdout
    assert hub.repos == [{"name": "tiny-base", "organization": "alice", "visibility": "private", "type": "model"}]
    assert len(hub.commits) == 1 and hub.commits[0]["header"]["summary"] == "First upload"
    # Exactly the dry-run folder's files, byte for byte; the weights went through Git LFS.
    local = {str(p.relative_to(expected)): p.read_bytes() for p in expected.rglob("*") if p.is_file()}
    assert hub.files == local
    assert list(hub.lfs_objects.values()) == [local["model.safetensors"]]
    assert hub.validated and hub.validated[-1] == local["README.md"].decode()
    authorized = [auth for method, path, auth in hub.requests if path.startswith(("/api/repos", "/api/models"))]
    assert authorized and set(authorized) == {"Bearer hf_fake_token"}  # the token from HF_TOKEN


def test_publish_cli_errors_name_the_field(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["publish", "--model", str(tmp_path / "missing"), "--repo-id", "alice/x", "--dry-run", str(tmp_path)])
    assert exit_info.value.code == 2 and "publish: model: no model folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


@pytest.mark.slow
def test_eval_cli_runs_the_local_task_offline_and_feeds_the_card(base_folder, tmp_path, capsys):
    assert main(["eval", "--model", str(base_folder), "--tasks", LOCAL_TASK, "--limit", "40", "--out",
                 str(tmp_path / "eval.json")]) == 0  # fmt: skip
    stdout = capsys.readouterr().out
    results = json.loads((tmp_path / "eval.json").read_text())
    metrics = results["results"][LOCAL_TASK]
    assert 0.0 <= metrics["acc,none"] <= 1.0 and metrics["acc_stderr,none"] > 0
    assert results["n-samples"][LOCAL_TASK]["effective"] == 40 and "samples" not in results
    assert f"{LOCAL_TASK}: acc {metrics['acc,none']:.4f}" in stdout

    render_card(base_folder, results=tmp_path / "eval.json", repo_id="alice/tiny-base").save(tmp_path / "README.md")
    name, evals = model_index_to_eval_results(metadata_load(tmp_path / "README.md")["model-index"])
    assert {(e.dataset_name, e.metric_type): e.metric_value for e in evals}[(LOCAL_TASK, "acc")] == metrics["acc,none"]


def test_local_task_data_and_evaluate_errors(base_folder):
    rows = [json.loads(line) for line in (LOCAL_TASKS_DIR / "toy_facts.jsonl").read_text().splitlines()]
    assert len(rows) == 279 and all(0 <= row["answer"] < len(row["choices"]) for row in rows)
    assert all(len(set(row["choices"])) == len(row["choices"]) for row in rows)
    with pytest.raises(ValueError, match="batch_size: 0"):
        evaluate(base_folder, batch_size=0)
    with pytest.raises(ValueError, match="model: no model folder"):
        evaluate(str(base_folder / "missing"))


@pytest.mark.slow
def test_paper_group_is_made_of_lm_eval_tasks(base_folder):
    manager = task_manager([PAPER_GROUP])  # lm-eval's own tasks and ours
    with pytest.raises(ValueError, match=r"tasks: unknown lm-eval task\(s\) \['no_such_task'\]"):
        evaluate(base_folder, ["no_such_task"])
    group = yaml.safe_load((LOCAL_TASKS_DIR / f"{PAPER_GROUP}.yaml").read_text())
    assert PAPER_GROUP in manager.all_groups
    assert [task for task in group["task"] if task not in manager.all_tasks] == []
    assert {"hellaswag", "piqa", "social_iqa", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "boolq",
            "mmlu", "nq_open", "triviaqa"} == set(group["task"])  # fmt: skip
