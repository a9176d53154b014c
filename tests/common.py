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
