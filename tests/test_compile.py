"""torch.compile of converted models: one graph, no recompiles, eager's outputs.

The CPU suite uses the ``eager`` and ``aot_eager`` backends: they run Dynamo's
capture (and, for ``aot_eager``, AOTAutograd's tracing of forward and backward),
which is where a model breaks a graph or recompiles; inductor adds code generation
only, and takes a minute per model on a small CPU.
"""

import pytest
import torch
import torch._dynamo
from conftest import image_batch, tiny_vit
from torch._dynamo.utils import counters

import masasurgery
from masasurgery.tolerances import tolerance_for

BACKENDS = ["eager", "aot_eager"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _converted(depth=2, atoms=2):
    model = tiny_vit(depth=depth)
    masasurgery.convert(model, atoms=atoms, example_inputs=image_batch(), verify=False)
    return model


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_converted_model_compiles_to_one_graph_like_the_original(backend):
    original = tiny_vit(depth=2)
    x = image_batch()
    with torch.no_grad():
        torch.compile(original, backend=backend, fullgraph=True)(x)
    assert _graphs() == 1
    torch._dynamo.reset()
    counters.clear()

    model = _converted()
    with torch.no_grad():
        expected = model(x)
        actual = torch.compile(model, backend=backend, fullgraph=True)(x)

    assert _graphs() == 1
    tol = tolerance_for(torch.float32, "cpu")
    torch.testing.assert_close(actual, expected, atol=tol.atol, rtol=tol.rtol)


def test_new_inputs_and_new_weights_do_not_recompile():
    model = _converted()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = image_batch()
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        compiled(image_batch())
        # Atoms and coefficients are graph inputs, not constants baked in
        model.masa.group0_q.atoms.mul_(0.5)
        model.blocks[1].attn.qkv.coefficients["k"].add_(1.0)
        actual = compiled(x)
        expected = model(x)
    assert _graphs() == 1
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiling_block_by_block_compiles_the_block_once(backend):
    model = _converted(depth=4)
    x = image_batch()
    with torch.no_grad():
        expected = model(x)
        for block in model.blocks:
            block.compile(backend=backend, fullgraph=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            actual = model(x)

    # Four blocks read one dictionary each per role, through one code path
    assert _graphs() == 1
    tol = tolerance_for(torch.float32, "cpu")
    torch.testing.assert_close(actual, expected, atol=tol.atol, rtol=tol.rtol)


def test_compiled_gradients_reach_the_shared_atoms_like_eager():
    model = _converted().train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    x = image_batch()

    model(x).square().mean().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if "masa" in n}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(x).square().mean().backward()

    assert len(eager) == 4
    for name, grad in eager.items():
        actual = dict(model.named_parameters())[name].grad
        tol = tolerance_for(torch.float32, "cpu")
        torch.testing.assert_close(actual, grad, atol=tol.atol, rtol=tol.rtol)
