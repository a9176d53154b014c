"""A small common test mixin for mPLUG models (transformers' ModelTesterMixin is not in the wheel)."""

from __future__ import annotations

import functools
import tempfile

import torch
import torch.utils.checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from .conftest import tiny_config, tiny_inputs


def _counting_checkpoint(calls: list[int], *args, **kwargs):
    calls.append(1)
    return torch.utils.checkpoint.checkpoint(*args, **kwargs)


class MPLUGModelTesterMixin:
    """Subclasses set `model_class` and may override `make_inputs` / `output_tensors` / `loss_fn`."""

    model_class: type
    atol = 1e-5

    def make_config(self, **overrides):
        return tiny_config(**overrides)

    def make_inputs(self, config, **kwargs):
        return tiny_inputs(config, **kwargs)

    def build(self, attn_implementation: str = "eager", **overrides):
        torch.manual_seed(0)
        model = self.model_class._from_config(self.make_config(**overrides), attn_implementation=attn_implementation)
        return model.eval()

    def output_tensors(self, output, inputs) -> dict[str, torch.Tensor]:
        """Tensors to compare, with padded text positions removed (name -> tensor of shape (B, ...))."""
        raise NotImplementedError

    def loss_fn(self, output) -> torch.Tensor:
        return sum(t.float().pow(2).mean() for t in self.output_tensors(output, None).values())

    # ------------------------------------------------------------------------------------------------ tests
    def test_save_load_strict(self):
        model = self.build()
        inputs = self.make_inputs(model.config)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            loaded, info = self.model_class.from_pretrained(
                folder, output_loading_info=True, attn_implementation="eager"
            )
        assert info["missing_keys"] == [] or info["missing_keys"] == set()
        assert not info["unexpected_keys"]
        assert not info["mismatched_keys"]
        assert set(loaded.state_dict()) == set(model.state_dict())
        loaded.eval()
        with torch.no_grad():
            a = self.output_tensors(model(**inputs), inputs)
            b = self.output_tensors(loaded(**inputs), inputs)
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)

    def test_eager_equals_sdpa_on_padded_batch(self):
        eager, sdpa = self.build("eager"), self.build("sdpa")
        sdpa.load_state_dict(eager.state_dict())
        inputs = self.make_inputs(eager.config, padded=True)
        with torch.no_grad():
            a = self.output_tensors(eager(**inputs), inputs)
            b = self.output_tensors(sdpa(**inputs), inputs)
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=self.atol, rtol=1e-4, msg=name)

    def test_batched_equals_one_by_one(self):
        model = self.build()
        inputs = self.make_inputs(model.config, padded=True)
        with torch.no_grad():
            batched = self.output_tensors(model(**inputs), inputs)
            for row in range(inputs["input_ids"].shape[0]):
                keep = int(inputs["attention_mask"][row].sum())
                single = {k: v[row : row + 1] for k, v in inputs.items()}
                single["input_ids"] = single["input_ids"][:, :keep]
                single["attention_mask"] = single["attention_mask"][:, :keep]
                alone = self.output_tensors(model(**single), single)
                for name in alone:
                    # the batched row is longer (padding); its valid part is the leading block of the same shape
                    row_slice = batched[name][row : row + 1]
                    row_slice = row_slice[tuple(slice(0, size) for size in alone[name].shape)]
                    torch.testing.assert_close(
                        row_slice, alone[name], atol=self.atol, rtol=1e-4, msg=f"{name} row {row}"
                    )

    def test_gradient_checkpointing_same_loss_and_gradients(self):
        model = self.build()
        inputs = self.make_inputs(model.config)
        model.config.vision_config.attention_dropout = 0.0
        model.train()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if isinstance(getattr(module, "dropout", None), float):  # CLIP attention keeps its rate as a float
                module.dropout = 0.0
        results = []
        for enabled in (False, True):
            model.zero_grad()
            if enabled:
                if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
                    model.activation_checkpointing_enable({"use_reentrant": False})
                else:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
                assert layers and all(m.gradient_checkpointing for m in layers)
                calls: list[int] = []
                counting = functools.partial(_counting_checkpoint, calls)
                for layer in layers:
                    layer._gradient_checkpointing_func = functools.partial(counting, use_reentrant=False)
            loss = self.loss_fn(model(**inputs))
            loss.backward()
            if enabled:
                assert len(calls) >= len(layers)  # every layer really ran under checkpointing
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append((loss.detach(), grads))
        (loss_a, grads_a), (loss_b, grads_b) = results
        torch.testing.assert_close(loss_a, loss_b, atol=0, rtol=0)
        assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
        for name in grads_a:
            torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=name)

    def test_return_dict_false_gives_same_tuple(self):
        model = self.build()
        inputs = self.make_inputs(model.config)
        with torch.no_grad():
            as_dict = model(**inputs)
            as_tuple = model(**inputs, return_dict=False)
        assert isinstance(as_tuple, tuple)
        expected = as_dict.to_tuple()
        assert len(as_tuple) == len(expected)
        for a, b in zip(as_tuple, expected):
            torch.testing.assert_close(a, b, atol=0, rtol=0)

    def test_deterministic_in_eval(self):
        model = self.build()
        inputs = self.make_inputs(model.config)
        with torch.no_grad():
            a = self.output_tensors(model(**inputs), inputs)
            b = self.output_tensors(model(**inputs), inputs)
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)

    # the recorded fields the head returns with output_hidden_states/output_attentions (empty: the head refuses them)
    recorded_fields: tuple[str, ...] = ("vision_hidden_states", "vision_attentions")

    def make_recording_inputs(self, config):
        return self.make_inputs(config)

    def recording_output_tensors(self, output, inputs) -> dict[str, torch.Tensor]:
        return self.output_tensors(output, inputs)

    def test_hidden_states_and_attentions_are_recorded(self):
        model = self.build()  # eager: attention weights exist
        inputs = self.make_recording_inputs(model.config)
        if not self.recorded_fields:
            import pytest

            with pytest.raises(ValueError, match="record"):
                model(**inputs, output_hidden_states=True)
            return
        with torch.no_grad():
            plain = model(**inputs)
            out = model(**inputs, output_hidden_states=True, output_attentions=True)
        a, b = self.recording_output_tensors(plain, inputs), self.recording_output_tensors(out, inputs)
        for name in a:
            torch.testing.assert_close(b[name], a[name], atol=0, rtol=0, msg=name)
        batch = inputs["input_ids"].shape[0]
        for name in self.recorded_fields:
            states = out[name]
            assert isinstance(states, tuple) and states, name
            # rows: one per example, or per frame / image of a pair (their vision states)
            assert all(isinstance(t, torch.Tensor) and t.shape[0] % batch == 0 for t in states), name
            assert all(bool(torch.isfinite(t).all()) for t in states), name
        assert plain.get("vision_hidden_states") is None  # nothing recorded unless asked


class MPLUGGenerationTesterMixin:
    """`generate()` conventions of the decoder heads: subclasses set `model_class` and may override `make_inputs`
    (the inputs of `generate`, without generation settings)."""

    model_class: type
    settings = dict(num_beams=3, min_new_tokens=1, max_new_tokens=4)

    def make_config(self, **overrides):
        return tiny_config(**overrides)

    def make_inputs(self, config, **kwargs):
        return tiny_inputs(config, **kwargs)

    def build(self, attn_implementation: str = "eager"):
        torch.manual_seed(0)
        model = self.model_class._from_config(self.make_config(), attn_implementation=attn_implementation).eval()
        with torch.no_grad():  # a decoder that ends sequences at different steps
            model.text_decoder.cls.predictions.bias[model.config.eos_token_id] += 2.0
        return model

    def _pad_to(self, sequences: torch.Tensor, width: int, pad: int) -> torch.Tensor:
        return torch.nn.functional.pad(sequences, (0, width - sequences.shape[1]), value=pad)

    def test_generate_save_load_gives_the_same_sequences(self):
        model = self.build()
        inputs = self.make_inputs(model.config)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            loaded = self.model_class.from_pretrained(folder, attn_implementation="eager").eval()
        assert loaded.generation_config.decoding_mode == model.generation_config.decoding_mode
        assert torch.equal(model.generate(**inputs, **self.settings), loaded.generate(**inputs, **self.settings))

    def test_generate_eager_equals_sdpa(self):
        eager, sdpa = self.build("eager"), self.build("sdpa")
        sdpa.load_state_dict(eager.state_dict())
        inputs = self.make_inputs(eager.config)
        for mode in ("original", "transformers"):
            a = eager.generate(**inputs, **self.settings, decoding_mode=mode)
            b = sdpa.generate(**inputs, **self.settings, decoding_mode=mode)
            assert torch.equal(a, b), mode

    def test_generate_batched_equals_one_by_one(self):
        model = self.build()
        inputs = self.make_inputs(model.config, padded=True)
        pad = model.config.pad_token_id
        for mode in ("original", "transformers"):
            batched = model.generate(**inputs, **self.settings, decoding_mode=mode)
            for row in range(batched.shape[0]):
                single = {k: v[row : row + 1] for k, v in inputs.items()}
                if "attention_mask" in single:
                    keep = int(single["attention_mask"].sum())
                    single["input_ids"], single["attention_mask"] = (
                        single["input_ids"][:, :keep],
                        single["attention_mask"][:, :keep],
                    )
                alone = model.generate(**single, **self.settings, decoding_mode=mode)
                width = max(alone.shape[1], batched.shape[1])
                assert torch.equal(self._pad_to(alone, width, pad), self._pad_to(batched[row : row + 1], width, pad)), (
                    mode,
                    row,
                )

    def test_generate_dict_outputs_and_scores(self):
        model = self.build()
        inputs = self.make_inputs(model.config)
        out = model.generate(**inputs, **self.settings, return_dict_in_generate=True, output_scores=True)
        plain = model.generate(**inputs, **self.settings)
        assert torch.equal(out.sequences, plain)
        assert out.sequences_scores.shape == (plain.shape[0],) and len(out.scores) >= 1
        greedy = model.generate(**inputs, num_beams=1, min_new_tokens=1, max_new_tokens=4, decoding_mode="transformers")
        original_greedy = model.generate(**inputs, num_beams=1, min_new_tokens=1, max_new_tokens=4)
        width = max(greedy.shape[1], original_greedy.shape[1])  # one beam: both algorithms are greedy decoding
        pad = model.config.pad_token_id
        assert torch.equal(self._pad_to(greedy, width, pad), self._pad_to(original_greedy, width, pad))
