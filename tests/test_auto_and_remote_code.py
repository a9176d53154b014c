"""Auto classes, trust_remote_code loading, and folders shared between transformers 5.2.x and the newest release."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModel

from transformers_mplug import MPLUGConfig, MPLUGModel

from .conftest import REPO_ROOT, TF52_PATH, tiny_config

BLOCK_PACKAGE = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "transformers_mplug" or name.startswith("transformers_mplug."):
                raise ImportError("transformers_mplug must not be imported in this process")
    sys.meta_path.insert(0, _Block())
    """
)


def _run(code: str, tmp_path: Path, extra_path: str | None = None) -> str:
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([extra_path, env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed:\nSTDOUT:\n{result.stdout}\nSTDERR:\n{result.stderr}")
    return result.stdout


def test_auto_classes_round_trip_strictly(tmp_path):
    model = MPLUGModel(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MPLUGConfig)
    loaded, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(loaded, MPLUGModel)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (tmp_path / "model.safetensors").exists()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_remote_code_folder_loads_without_the_package(tmp_path, vocab_file):
    save = textwrap.dedent(
        f"""
        import torch, transformers_mplug
        from transformers_mplug import MPLUGModel, MPLUGProcessor
        from tests.conftest import tiny_config, tiny_inputs
        transformers_mplug.register_remote_code()
        torch.manual_seed(0)
        model = MPLUGModel(tiny_config()).eval()
        model.save_pretrained("folder")
        MPLUGProcessor.from_vocab_file({str(vocab_file)!r}, image_size=32).save_pretrained("folder")
        inputs = tiny_inputs(model.config)
        with torch.no_grad():
            torch.save({{"inputs": inputs, "memory": model(**inputs).last_hidden_state}}, "expected.pt")
        """
    )
    _run(f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r})\n" + save, tmp_path)
    files = set(os.listdir(tmp_path / "folder"))
    assert {"configuration_mplug.py", "modeling_mplug.py", "processing_mplug.py", "tokenization_mplug.py"} <= files
    load = BLOCK_PACKAGE + textwrap.dedent(
        """
        import torch
        from transformers import AutoModel, AutoProcessor
        model, info = AutoModel.from_pretrained("folder", trust_remote_code=True, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert type(model).__name__ == "MPLUGModel" and "transformers_mplug" not in type(model).__module__
        processor = AutoProcessor.from_pretrained("folder", trust_remote_code=True)
        assert type(processor).__name__ == "MPLUGProcessor"
        ids = processor(text="what is the cat")["input_ids"][0].tolist()
        assert ids[0] == 101 and 102 not in ids, ids
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained("folder", trust_remote_code=True)
        assert type(tokenizer).__name__ == "MPLUGTokenizer" and "transformers_mplug" not in type(tokenizer).__module__
        assert tokenizer("what is the cat")["input_ids"] == ids and processor.tokenizer("cat")["input_ids"][-1] != 102
        saved = torch.load("expected.pt", weights_only=True)
        with torch.no_grad():
            memory = model.eval()(**saved["inputs"]).last_hidden_state
        print((memory - saved["memory"]).abs().max().item())
        """
    )
    assert float(_run(load, tmp_path).strip()) < 1e-5


def _save_script(folder: str) -> str:
    return textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(REPO_ROOT)!r})
        import transformers
        from transformers_mplug import MPLUGModel
        from tests.conftest import tiny_config, tiny_inputs
        torch.manual_seed(0)
        model = MPLUGModel(tiny_config()).eval()
        model.save_pretrained({folder!r})
        inputs = tiny_inputs(model.config)
        with torch.no_grad():
            out = model(**inputs)
        torch.save({{"inputs": inputs, "memory": out.last_hidden_state}}, {folder!r} + "/expected.pt")
        print(transformers.__version__)
        """
    )


def _load_script(folder: str) -> str:
    return textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(REPO_ROOT)!r})
        import transformers
        from transformers_mplug import MPLUGModel
        model, info = MPLUGModel.from_pretrained({folder!r}, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        saved = torch.load({folder!r} + "/expected.pt", weights_only=True)
        with torch.no_grad():
            memory = model.eval()(**saved["inputs"]).last_hidden_state
        print(transformers.__version__, (memory - saved["memory"]).abs().max().item())
        """
    )


@pytest.fixture
def tf52_path():
    if not os.path.isdir(os.path.join(TF52_PATH, "transformers")):
        pytest.skip(f"transformers 5.2.x not installed at {TF52_PATH} (run `make test`, which installs it)")
    return TF52_PATH


@pytest.mark.parametrize("direction", ["new_to_52", "52_to_new"])
def test_folders_load_across_transformers_versions(tmp_path, tf52_path, direction):
    folder = str(tmp_path / "folder")
    if direction == "new_to_52":
        saver, loader = None, tf52_path
    else:
        saver, loader = tf52_path, None
    saved_version = _run(_save_script(folder), tmp_path, saver).strip().splitlines()[-1]
    loaded_version, error = _run(_load_script(folder), tmp_path, loader).strip().splitlines()[-1].split()
    versions = {saved_version, loaded_version}
    assert any(v.startswith("5.2.") for v in versions) and transformers.__version__ in versions, versions
    assert float(error) < 1e-5
