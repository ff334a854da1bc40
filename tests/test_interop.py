"""Export to PEFT and llama.cpp control vectors, and import back."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from conftest import random_ids, tiny_model
from splitsteer.cli import main
from splitsteer.errors import InputError
from splitsteer.interop import from_gguf, to_gguf, to_peft
from splitsteer.updates import SteeringUpdate
from test_updates import random_update


@pytest.mark.parametrize("form", ["lora", "local_weight"])
def test_peft_adapter_gives_our_logits_at_factor_one(form: str, tmp_path: Path) -> None:
    from peft import PeftModel

    model = tiny_model("llama")
    update = random_update(model, form, layer=2)
    ids = random_ids(2, 6)
    with torch.no_grad(), update.apply(model, 1.0):
        ours = model(ids).logits
    to_peft(update, model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter")
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(theirs, model(ids).logits)


def test_gguf_control_vector_round_trip(tmp_path: Path) -> None:
    import gguf

    model = tiny_model("llama")
    a, b = random_update(model, "vector", layer=1, seed=1), random_update(model, "vector", layer=3, seed=2)
    path = to_gguf([a, b], tmp_path / "cv.gguf", model_hint="tiny-llama")
    reader = gguf.GGUFReader(str(path))
    assert sorted(t.name for t in reader.tensors) == ["direction.1", "direction.3"]
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    back = from_gguf(path, model)
    assert [u.layer for u in back] == [1, 3]
    for original, imported in zip([a, b], back):
        assert imported.site == original.site and imported.form == "vector"
        assert torch.equal(imported.params["delta_b"], original.params["delta_b"])


def test_gguf_convention_errors(tmp_path: Path) -> None:
    model = tiny_model("llama")
    with pytest.raises(InputError, match="cannot steer layer 0"):
        to_gguf([random_update(model, "vector", layer=0)], tmp_path / "x.gguf")
    with pytest.raises(InputError, match="only vectors"):
        to_gguf([random_update(model, "lora")], tmp_path / "x.gguf")
    with pytest.raises(InputError, match="use --to gguf"):
        to_peft(random_update(model, "vector"), model, tmp_path / "p")
    assert not list(tmp_path.iterdir())


def test_cli_export_then_import_gives_the_same_artifact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tiny import tiny_llama, tiny_tokenizer

    model, tok = tiny_llama(), tiny_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    update = SteeringUpdate.zeros(model, "vector", 1)
    update.params["delta_b"] = torch.randn(32)
    update.meta.update(hidden_size=32, num_layers=2)
    update.save(tmp_path / "vec")
    assert main(["export", str(tmp_path / "vec"), "--to", "gguf", str(tmp_path / "cv.gguf")]) == 0
    assert main(["import", str(tmp_path / "cv.gguf"), "--model", str(tmp_path / "model"),
                 "--out", str(tmp_path / "back")]) == 0
    again = SteeringUpdate.load(tmp_path / "back", model)
    assert (again.form, again.layer, again.site) == (update.form, update.layer, update.site)
    assert torch.equal(again.params["delta_b"], update.params["delta_b"])
    capsys.readouterr()
