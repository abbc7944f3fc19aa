# Copyright 2026 The MobileMoE for Hugging Face contributors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""transformers' own common model tests, run against MobileMoE as transformers runs them against its own models.

The common test mixins are not part of the transformers wheel. At collection time this module downloads the source
distribution of the installed transformers version from PyPI (`pip download --no-binary :all: --no-deps
transformers==X`), extracts the few test files it needs into a cache (`.cache/mobilemoe-tests/` at the repository
root, which is gitignored, or `$MOBILEMOE_TESTS_CACHE`) and imports that `tests/` folder under the package name
`transformers_tests`, so it cannot clash with this repository's own `tests/` folder. A failed download fails the
module loudly: it is never skipped.

The sdist only ships the top-level `tests/test*.py` files. The modules they import from sub-folders of transformers'
`tests/` (`generation/test_utils.py`, `exporters/test_export.py`, `utils/test_configuration_utils.py`) are not in it;
for each one that is missing, a stand-in defined below is registered in its place (see `_stand_in_modules`).
`causal_lm_tester.py` is not in the sdist either, so the tester and the test base class below follow its design
(`CausalLMModelTester` / `CausalLMModelTest`: ModelTesterMixin + GenerationTesterMixin + PipelineTesterMixin).

No common test is skipped here; the skips reported are transformers' own gates (GPU, FlashAttention, DeepSpeed,
kernels, vision extras, composite-only tests, pipelines that need the Hub's tiny models). Three common tests are
adapted, not skipped (see `MobileMoEModelTest`): two that load deliberately partial checkpoints first check that
MobileMoE's loader refuses them, then run under transformers' lenient policy; the TP-plan test gets a dense layer
through MobileMoE's own config key. `MobileMoEMixedLayersModelTest` reruns everything with a dense layer, a NoPE
layer and attention biases.

Run: `python -m pytest tests/test_transformers_common.py -q` (about 35 s on 2 CPU cores once the sdist is cached).
"""

import contextlib
import copy
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
import unittest
from pathlib import Path
from unittest import mock

import pytest
import torch
from filelock import FileLock
from safetensors.torch import save_file as safe_save_file

import transformers
from transformers import set_seed
from transformers.modeling_utils import PreTrainedModel
from transformers.models.auto import modeling_auto
from transformers.testing_utils import torch_device

from modeling_mobilemoe import MobileMoEConfig, MobileMoEForCausalLM, MobileMoEModel
from modeling_mobilemoe.modeling_mobilemoe import MobileMoEPreTrainedModel


# ---------------------------------------------------------------------------------------------------------------------
# Fetching transformers' test mixins from the sdist

TRANSFORMERS_VERSION = transformers.__version__
CACHE_DIR = Path(
    os.environ.get("MOBILEMOE_TESTS_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "mobilemoe-tests")
)
ALIAS = "transformers_tests"
# Files of the sdist's `tests/` folder that are imported; a missing one fails the module.
REQUIRED_FILES = ("test_modeling_common.py", "test_configuration_common.py", "test_pipeline_mixin.py")
# Imported by the files above but not shipped in the sdist (5.24): a stand-in is used when the sdist lacks them.
OPTIONAL_FILES = ("generation/test_utils.py", "exporters/test_export.py", "utils/test_configuration_utils.py")


def _fail(message: str):
    raise RuntimeError(f"transformers common tests unavailable: {message}")


def _download_sdist() -> Path:
    sdist_dir = CACHE_DIR / "sdist"
    sdist = sdist_dir / f"transformers-{TRANSFORMERS_VERSION}.tar.gz"
    if sdist.is_file():
        return sdist
    sdist_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--disable-pip-version-check",
        f"transformers=={TRANSFORMERS_VERSION}", "-d", str(sdist_dir),
    ]  # fmt: skip
    try:
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as error:
        _fail(f"`{' '.join(command)}` could not run: {error!r}")
    if result.returncode != 0 or not sdist.is_file():
        output = (result.stdout + result.stderr).strip()[-3000:]
        _fail(
            f"`{' '.join(command)}` failed (exit {result.returncode}); PyPI access is needed to fetch the "
            f"transformers {TRANSFORMERS_VERSION} source distribution.\n{output}"
        )
    return sdist


def _extract_tests() -> Path:
    """Returns the root holding `tests/` (the extracted files) and `src/transformers/`; extracts once per version."""
    root = CACHE_DIR / f"transformers-{TRANSFORMERS_VERSION}"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with FileLock(CACHE_DIR / f"{root.name}.lock"):  # every pytest-xdist worker collects this module at once
        if not (root / ".complete").is_file():
            _extract_sdist_tests(_download_sdist(), root)
    return root


def _extract_sdist_tests(sdist: Path, root: Path) -> None:
    """Extracts the needed test files into a staging folder, then renames it to `root` (never a half-written root)."""
    prefix = f"transformers-{TRANSFORMERS_VERSION}/tests/"
    staging = Path(tempfile.mkdtemp(prefix=f"{root.name}.", dir=CACHE_DIR))
    try:
        with tarfile.open(sdist) as archive:
            members = {member.name: member for member in archive.getmembers() if member.isfile()}
            for name in (*REQUIRED_FILES, *OPTIONAL_FILES):
                member = members.get(prefix + name)
                if member is None:
                    if name in REQUIRED_FILES:
                        _fail(f"{sdist} has no `tests/{name}`.")
                    continue
                target = staging / "tests" / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.extractfile(member).read())
        # Packages for the relative imports; `test_configuration_common` runs `direct_transformers_import` on `tests/`
        # and `test_pipeline_mixin` on `src/transformers/`: an empty `__init__.py` makes both return the installed
        # `transformers` without re-executing it.
        for package in ("tests", "tests/generation", "tests/exporters", "tests/utils", "src/transformers"):
            (staging / package).mkdir(parents=True, exist_ok=True)
            (staging / package / "__init__.py").touch()
        # `test_pipeline_mixin` reads the summary of the Hub's tiny test models; MobileMoE has none.
        (staging / "tests" / "utils" / "tiny_model_summary.json").write_text("{}\n")
        (staging / ".complete").write_text(f"{sdist.name}\n")
        staging.chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)  # an incomplete earlier extraction
        staging.rename(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _stand_in_modules() -> dict[str, dict]:
    """Contents of the modules registered for sub-folder files the sdist lacks (see the module docstring)."""
    return {
        "generation.test_utils": {"GenerationTesterMixin": GenerationTesterMixin},
        "exporters.test_export": {"ExportTesterMixin": ExportTesterMixin},
        "utils.test_configuration_utils": {"config_common_kwargs": CONFIG_COMMON_KWARGS},
    }


def _import_transformers_tests() -> types.ModuleType:
    root = _extract_tests()
    if ALIAS in sys.modules:
        return sys.modules[ALIAS]
    tests_dir = root / "tests"
    spec = importlib.util.spec_from_file_location(
        ALIAS, tests_dir / "__init__.py", submodule_search_locations=[str(tests_dir)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[ALIAS] = package
    spec.loader.exec_module(package)
    for name, contents in _stand_in_modules().items():
        if (tests_dir / (name.replace(".", "/") + ".py")).is_file():
            continue  # the sdist has the real file: it is imported normally
        module = types.ModuleType(f"{ALIAS}.{name}")
        module.__dict__.update(contents)
        sys.modules[module.__name__] = module
    return package


# ---------------------------------------------------------------------------------------------------------------------
# Stand-ins for files of transformers' `tests/` that the sdist does not ship


class ExportTesterMixin:
    """Stand-in for `tests/exporters/test_export.py` (not in the sdist): `torch.export` of every model class with the
    default experts implementation, the exported program matching the eager module. Honours `test_torch_exportable`.
    """

    def test_torch_export(self):
        if not self.test_torch_exportable:
            self.skipTest(reason="`test_torch_exportable` is False for this model")
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        inputs = {key: value.to(torch_device) for key, value in inputs_dict.items() if value is not None}
        for model_class in self.all_model_classes:
            model = model_class(copy.deepcopy(config)).to(torch_device).eval()
            with torch.no_grad():
                expected = model(**inputs, use_cache=False)[0]
                exported = torch.export.export(model, args=(), kwargs={**inputs, "use_cache": False}, strict=False)
                actual = exported.module()(**inputs, use_cache=False)[0]
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


class GenerationTesterMixin:
    """Stand-in for `tests/generation/test_utils.py` (not in the sdist).

    A compact set of `generate()` checks for decoder-only models in the spirit of transformers' mixin: output
    structure, cache vs no cache, step logits vs full forward passes, sampling, beam search, left padding, continuing
    from a returned cache, `inputs_embeds`, static cache and assisted decoding. Needs `self.model_tester` with
    `prepare_config_and_inputs_for_common()` and `self.all_generative_model_classes` (from `ModelTesterMixin`).
    """

    max_new_tokens = 3

    def prepare_config_and_inputs_for_generate(self, batch_size=2):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        input_ids = inputs_dict["input_ids"][:batch_size].to(torch_device)
        return config, input_ids, torch.ones_like(input_ids)

    def _generative_model(self, model_class, config, attn_implementation=None):
        config = copy.deepcopy(config)
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation
        model = model_class(config).to(torch_device).eval()
        # Random weights: never stop early on EOS, so every row generates exactly `max_new_tokens` tokens.
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = config.pad_token_id
        return model

    def _greedy(self, model, **kwargs):
        kwargs.setdefault("max_new_tokens", self.max_new_tokens)
        return model.generate(do_sample=False, num_beams=1, **kwargs)

    @pytest.mark.generate
    def test_greedy_generate_dict_outputs(self):
        for model_class in self.all_generative_model_classes:
            config, input_ids, attention_mask = self.prepare_config_and_inputs_for_generate()
            # Attention weights are only returned by the eager attention (SDPA does not compute them).
            model = self._generative_model(model_class, config, attn_implementation="eager")
            output = self._greedy(
                model,
                input_ids=input_ids,
                attention_mask=attention_mask,
                return_dict_in_generate=True,
                output_scores=True,
                output_logits=True,
                output_hidden_states=True,
                output_attentions=True,
                use_cache=True,
            )
            batch_size, prompt_length = input_ids.shape
            self.assertEqual(output.sequences.shape, (batch_size, prompt_length + self.max_new_tokens))
            self.assertTrue(torch.equal(output.sequences[:, :prompt_length], input_ids))
            self.assertEqual(len(output.scores), self.max_new_tokens)
            self.assertEqual(len(output.logits), self.max_new_tokens)
            for scores in (*output.scores, *output.logits):
                self.assertEqual(scores.shape, (batch_size, config.vocab_size))
            self.assertEqual(len(output.hidden_states), self.max_new_tokens)
            self.assertEqual(len(output.attentions), self.max_new_tokens)
            steps = zip(output.hidden_states, output.attentions, strict=True)
            for step, (hidden_states, attentions) in enumerate(steps):
                query_length = prompt_length if step == 0 else 1
                self.assertEqual(len(hidden_states), config.num_hidden_layers + 1)
                self.assertEqual(hidden_states[-1].shape, (batch_size, query_length, config.hidden_size))
                self.assertEqual(len(attentions), config.num_hidden_layers)
                self.assertEqual(
                    attentions[0].shape,
                    (batch_size, config.num_attention_heads, query_length, prompt_length + step),
                )
            cache = output.cache
            self.assertIsNotNone(cache)
            self.assertEqual(len(cache.layers), config.num_hidden_layers)
            # The last generated token is never fed back, so the cache holds one position less than the sequences.
            self.assertEqual(cache.get_seq_length(), prompt_length + self.max_new_tokens - 1)
            keys = cache.layers[0].keys
            self.assertEqual(
                keys.shape,
                (batch_size, config.num_key_value_heads, prompt_length + self.max_new_tokens - 1, config.head_dim),
            )

    @pytest.mark.generate
    def test_greedy_generate_with_and_without_cache(self):
        for model_class in self.all_generative_model_classes:
            config, input_ids, attention_mask = self.prepare_config_and_inputs_for_generate()
            model = self._generative_model(model_class, config)
            outputs = [
                self._greedy(
                    model,
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    use_cache=use_cache,
                    return_dict_in_generate=True,
                    output_logits=True,
                )
                for use_cache in (True, False)
            ]
            self.assertTrue(torch.equal(outputs[0].sequences, outputs[1].sequences))
            for cached, uncached in zip(outputs[0].logits, outputs[1].logits, strict=True):
                torch.testing.assert_close(cached, uncached, rtol=1e-4, atol=1e-4)

    @pytest.mark.generate
    def test_greedy_step_logits_match_forward(self):
        """Every cached decoding step gives the logits of a full forward pass over the sequence so far."""
        for model_class in self.all_generative_model_classes:
            config, input_ids, attention_mask = self.prepare_config_and_inputs_for_generate()
            model = self._generative_model(model_class, config)
            output = self._greedy(
                model, input_ids=input_ids, attention_mask=attention_mask, return_dict_in_generate=True,
                output_logits=True,
            )  # fmt: skip
            prompt_length = input_ids.shape[1]
            with torch.no_grad():
                for step, step_logits in enumerate(output.logits):
                    sequence = output.sequences[:, : prompt_length + step]
                    full_logits = model(sequence, attention_mask=torch.ones_like(sequence)).logits[:, -1]
                    torch.testing.assert_close(step_logits, full_logits, rtol=1e-4, atol=1e-4)
                    self.assertTrue(torch.equal(output.sequences[:, prompt_length + step], full_logits.argmax(-1)))

    @pytest.mark.generate
    def test_sample_generate(self):
        for model_class in self.all_generative_model_classes:
            config, input_ids, attention_mask = self.prepare_config_and_inputs_for_generate()
            model = self._generative_model(model_class, config)
            kwargs = {
                "input_ids": input_ids, "attention_mask": attention_mask, "do_sample": True, "top_k": 10,
                "temperature": 0.7, "num_return_sequences": 2, "max_new_tokens": self.max_new_tokens,
            }  # fmt: skip
            set_seed(0)
            first = model.generate(**kwargs)
            set_seed(0)
            second = model.generate(**kwargs)
            self.assertEqual(first.shape, (2 * input_ids.shape[0], input_ids.shape[1] + self.max_new_tokens))
            self.assertTrue(torch.equal(first, second))

    @pytest.mark.generate
    def test_beam_search_generate(self):
        for model_class in self.all_generative_model_classes:
            config, input_ids, attention_mask = self.prepare_config_and_inputs_for_generate()
            model = self._generative_model(model_class, config)
            output = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, do_sample=False, num_beams=3,
                num_return_sequences=2, max_new_tokens=self.max_new_tokens, return_dict_in_generate=True,
                output_scores=True,
            )  # fmt: skip
            self.assertEqual(
                output.sequences.shape, (2 * input_ids.shape[0], input_ids.shape[1] + self.max_new_tokens)
            )
            self.assertEqual(output.sequences_scores.shape, (2 * input_ids.shape[0],))
            self.assertEqual(len(output.scores), self.max_new_tokens)

    @pytest.mark.generate
    def test_left_padding_compatibility(self):
        """Left padding (with the matching position ids) does not change the logits of the real tokens."""
        for model_class in self.all_generative_model_classes:
            config, input_ids, attention_mask = self.prepare_config_and_inputs_for_generate()
            model = self._generative_model(model_class, config)
            pad_size = (input_ids.shape[0], 4)
            padding = torch.full(pad_size, config.pad_token_id, dtype=input_ids.dtype, device=torch_device)
            padded_ids = torch.cat((padding, input_ids), dim=1)
            padded_mask = torch.cat((torch.zeros_like(padding), attention_mask), dim=1)
            position_ids = (padded_mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                logits = model(input_ids, attention_mask=attention_mask).logits
                padded_logits = model(padded_ids, attention_mask=padded_mask, position_ids=position_ids).logits
            torch.testing.assert_close(padded_logits[:, pad_size[1] :], logits, rtol=1e-4, atol=1e-4)

            # And generation from a left-padded batch matches generation from each unpadded row.
            short_mask = attention_mask.clone()
            short_mask[0, :2] = 0
            batched = self._greedy(model, input_ids=input_ids, attention_mask=short_mask)
            alone = self._greedy(model, input_ids=input_ids[:1, 2:], attention_mask=attention_mask[:1, 2:])
            self.assertTrue(torch.equal(batched[0, 2:], alone[0]))

    @pytest.mark.generate
    def test_generate_continue_from_cache(self):
        for model_class in self.all_generative_model_classes:
            config, input_ids, attention_mask = self.prepare_config_and_inputs_for_generate()
            model = self._generative_model(model_class, config)
            at_once = self._greedy(model, input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6)
            first = self._greedy(
                model, input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=3,
                return_dict_in_generate=True,
            )  # fmt: skip
            resumed = self._greedy(
                model,
                input_ids=first.sequences,
                attention_mask=torch.ones_like(first.sequences),
                cache=first.cache,
                max_new_tokens=3,
            )
            self.assertTrue(torch.equal(at_once, resumed))

    @pytest.mark.generate
    def test_generate_from_inputs_embeds(self):
        for model_class in self.all_generative_model_classes:
            config, input_ids, attention_mask = self.prepare_config_and_inputs_for_generate()
            model = self._generative_model(model_class, config)
            from_ids = self._greedy(model, input_ids=input_ids, attention_mask=attention_mask)
            inputs_embeds = model.get_input_embeddings()(input_ids)
            from_embeds = self._greedy(model, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
            # With only `inputs_embeds`, `generate` returns the new tokens alone.
            self.assertTrue(torch.equal(from_ids[:, input_ids.shape[1] :], from_embeds))

    @pytest.mark.generate
    def test_generate_with_static_cache(self):
        for model_class in self.all_generative_model_classes:
            config, input_ids, attention_mask = self.prepare_config_and_inputs_for_generate()
            model = self._generative_model(model_class, config)
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "return_dict_in_generate": True}
            dynamic = self._greedy(model, **kwargs)
            static = self._greedy(model, cache_implementation="static", **kwargs)
            self.assertEqual(type(static.cache).__name__, "StaticCache")
            self.assertTrue(torch.equal(dynamic.sequences, static.sequences))

    @pytest.mark.generate
    def test_assisted_decoding_matches_greedy(self):
        """Assisted and prompt-lookup decoding check several tokens a step and crop the cache: greedy results hold."""
        for model_class in self.all_generative_model_classes:
            config, input_ids, attention_mask = self.prepare_config_and_inputs_for_generate(batch_size=1)
            model = self._generative_model(model_class, config)
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "max_new_tokens": 6}
            greedy = self._greedy(model, **kwargs)
            assistant = self._generative_model(model_class, config)  # different random weights: some drafts fail
            assistant.generation_config.num_assistant_tokens = 3
            assistant.generation_config.num_assistant_tokens_schedule = "constant"
            assisted = self._greedy(model, assistant_model=assistant, **kwargs)
            prompt_lookup = self._greedy(model, prompt_lookup_num_tokens=2, **kwargs)
            self.assertTrue(torch.equal(greedy, assisted))
            self.assertTrue(torch.equal(greedy, prompt_lookup))


# Stand-in for `tests/utils/test_configuration_utils.config_common_kwargs`: every attribute that `PreTrainedConfig`
# handles for all models, each with a non-default value; `ConfigTester.check_config_arguments_init` checks that the
# model config passes them all through.
CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["MobileMoEForCausalLM"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
    "tie_word_embeddings": False,
    "bos_token_id": 6,
    "pad_token_id": 7,
    "eos_token_id": 8,
}


_import_transformers_tests()

from transformers_tests.test_configuration_common import ConfigTester  # noqa: E402
from transformers_tests.test_modeling_common import ModelTesterMixin, ids_tensor  # noqa: E402
from transformers_tests.test_pipeline_mixin import PipelineTesterMixin  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------------
# Tester


class MobileMoEModelTester:
    """Builds a tiny MobileMoE and its inputs (the role of transformers' `CausalLMModelTester`)."""

    config_class = MobileMoEConfig
    base_model_class = MobileMoEModel
    causal_lm_class = MobileMoEForCausalLM

    def __init__(
        self,
        parent,
        batch_size=13,
        seq_length=7,
        is_training=True,
        use_input_mask=True,
        use_labels=True,
        vocab_size=99,
        hidden_size=32,
        intermediate_size=16,
        intermediate_size_mlp=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        interleave_moe_layer_step=1,
        no_rope_layers=None,
        attention_bias=False,
        max_position_embeddings=512,
        initializer_range=0.02,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = use_input_mask
        self.use_labels = use_labels
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.intermediate_size_mlp = intermediate_size_mlp
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.num_local_experts = num_local_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.interleave_moe_layer_step = interleave_moe_layer_step
        self.no_rope_layers = no_rope_layers
        self.attention_bias = attention_bias
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    @property
    def all_model_classes(self):
        return [self.base_model_class, self.causal_lm_class]

    def get_config(self):
        return self.config_class(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            intermediate_size_mlp=self.intermediate_size_mlp,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            num_local_experts=self.num_local_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            interleave_moe_layer_step=self.interleave_moe_layer_step,
            no_rope_layers=self.no_rope_layers,
            attention_bias=self.attention_bias,
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=self.initializer_range,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_mask = torch.tril(torch.ones_like(input_ids).to(torch_device)) if self.use_input_mask else None
        token_labels = ids_tensor([self.batch_size, self.seq_length], self.vocab_size) if self.use_labels else None
        return self.get_config(), input_ids, input_mask, token_labels

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, input_mask, _ = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}

    def create_and_check_model(self, config, input_ids, input_mask, token_labels):
        model = self.base_model_class(config=config).to(torch_device).eval()
        model(input_ids, attention_mask=input_mask)
        result = model(input_ids)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))

    def create_and_check_causal_lm(self, config, input_ids, input_mask, token_labels):
        model = self.causal_lm_class(config=config).to(torch_device).eval()
        result = model(input_ids, attention_mask=input_mask, labels=token_labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.seq_length, self.vocab_size))
        self.parent.assertTrue(torch.isfinite(result.loss))


# ---------------------------------------------------------------------------------------------------------------------
# Tests


class CausalLMModelTest(ModelTesterMixin, GenerationTesterMixin, PipelineTesterMixin):
    """transformers' `CausalLMModelTest` design: the common model, generation and pipeline mixins in one base."""

    model_tester_class = None
    all_model_classes = None
    pipeline_model_mapping = None
    config_tester_kwargs = {}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # The name tables of `modeling_auto` are how the common tests tell a base model from a causal LM (which inputs
        # get labels, which models are trained, ...). In-tree models are listed there; list this model the same way
        # while the class runs. The Auto classes ignore these entries (they only resolve model types listed in
        # `CONFIG_MAPPING_NAMES`), so loading still goes through `modeling_mobilemoe`'s own registration.
        tester = cls.model_tester_class
        model_type = tester.config_class.model_type
        for table, model_class in (
            (modeling_auto.MODEL_MAPPING_NAMES, tester.base_model_class),
            (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, tester.causal_lm_class),
        ):
            patcher = mock.patch.dict(table, {model_type: model_class.__name__})
            patcher.start()
            cls.addClassCleanup(patcher.stop)

    def setUp(self):
        self.model_tester = self.model_tester_class(self)
        self.config_tester = ConfigTester(
            self, config_class=self.model_tester.config_class, **self.config_tester_kwargs
        )
        if self.all_model_classes is None:
            self.all_model_classes = tuple(self.model_tester.all_model_classes)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_causal_lm(self):
        self.model_tester.create_and_check_causal_lm(*self.model_tester.prepare_config_and_inputs())


@contextlib.contextmanager
def lenient_loading():
    """Loads checkpoints with transformers' default policy (missing tensors are initialised, unexpected ones dropped)
    instead of MobileMoE's, which raises a ValueError naming them."""
    with mock.patch.object(
        MobileMoEPreTrainedModel,
        "_finalize_model_loading",
        staticmethod(PreTrainedModel._finalize_model_loading),
    ):
        yield


class MobileMoEModelTest(CausalLMModelTest, unittest.TestCase):
    model_tester_class = MobileMoEModelTester
    pipeline_model_mapping = {"feature-extraction": MobileMoEModel, "text-generation": MobileMoEForCausalLM}
    # Our config requires num_attention_heads * head_dim == hidden_size and an even head_dim.
    config_tester_kwargs = {"hidden_size": 4 * 38, "num_attention_heads": 4, "head_dim": 38, "num_key_value_heads": 2}
    # Routed experts that no token of the tiny batch picks get no gradient (as for transformers' MoE models).
    test_all_params_have_gradient = False

    # Partial checkpoints: MobileMoE's loader raises where transformers would initialise missing tensors. These
    # common tests build partial checkpoints on purpose; they run with transformers' policy after checking ours.

    def test_can_init_all_missing_weights(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            with self.assertRaisesRegex(ValueError, "missing"):
                model_class.from_pretrained(None, config=copy.deepcopy(config), state_dict={})
        with lenient_loading():
            super().test_can_init_all_missing_weights()

    def test_model_weights_reload_no_missing_tied_weights(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            with tempfile.TemporaryDirectory() as tmp_dir:
                model_class(copy.deepcopy(config)).save_pretrained(tmp_dir)
                placeholder = {"tensor": torch.tensor([1, 2])}
                safe_save_file(placeholder, os.path.join(tmp_dir, "model.safetensors"), metadata={"format": "pt"})
                with self.assertRaisesRegex(ValueError, r"(?s)missing.*unexpected.*'tensor'"):
                    model_class.from_pretrained(tmp_dir)
        with lenient_loading():
            super().test_model_weights_reload_no_missing_tied_weights()

    def test_tp_plan_matches_params(self):
        # The common test makes layer 0 dense through `first_k_dense_replace`/`mlp_only_layers`; MobileMoE picks dense
        # layers with `interleave_moe_layer_step` (Llama-4 naming). With step 2, layer 0 is dense and layer 1 MoE, so
        # the plan entries of both kinds of feed-forward have parameters to match.
        with mock.patch.object(self.model_tester, "interleave_moe_layer_step", 2):
            super().test_tp_plan_matches_params()


class MobileMoEMixedLayersModelTester(MobileMoEModelTester):
    """Layer 0 dense (`interleave_moe_layer_step=2`) and layer 1 MoE without RoPE and QK-norm (`no_rope_layers`), with
    attention biases: the config options the released checkpoints leave off."""

    def __init__(self, parent, **kwargs):
        kwargs = {"interleave_moe_layer_step": 2, "no_rope_layers": [1, 0], "attention_bias": True, **kwargs}
        super().__init__(parent, **kwargs)


class MobileMoEMixedLayersModelTest(MobileMoEModelTest):
    model_tester_class = MobileMoEMixedLayersModelTester
