"""Every registered CE model under torch.compile(fullgraph=True): one training step's
gradients and the eval output equal eager, with the native CE operators traced through their
fake implementations (no graph break). Also the same models with the reference path on the
``meta`` device (shape propagation only) and, where a GPU is present, on CUDA."""

import copy

import pytest
import torch

import cenet

CE_MODELS = [name for name in cenet.list_models() if name.endswith("_ce")]


def small_input(name, batch=2):
    size = 32 if name.startswith("cifar_") else 64
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def build(name):
    torch.manual_seed(0)
    kwargs = {"num_classes": 10}
    if name.startswith("cifar_"):
        kwargs["width"] = 0.25
    model = cenet.create_model(name, **kwargs)
    for module in model.modules():  # dropout draws differ between eager and compiled code
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name", CE_MODELS)
def test_compiled_training_step_and_eval_equal_eager(name):
    torch._dynamo.reset()
    eager = build(name)
    compiled_net = copy.deepcopy(eager)
    compiled = torch.compile(compiled_net, fullgraph=True, backend="aot_eager")
    x = small_input(name)
    loss, loss_eager = compiled(x).square().mean(), eager(x).square().mean()
    torch.testing.assert_close(loss, loss_eager, rtol=1e-4, atol=1e-5)
    loss.backward()
    loss_eager.backward()
    for (key, p), q in zip(compiled_net.named_parameters(), eager.parameters(), strict=True):
        scale = q.grad.abs().max().clamp_min(1e-3)
        torch.testing.assert_close(p.grad / scale, q.grad / scale, rtol=1e-4, atol=1e-4,
                                   msg=key)
    compiled_net.eval(), eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_inductor_compiles_a_ce_network():
    """The default backend (inductor) on the smallest CE network, training and eval."""
    torch._dynamo.reset()
    eager = build("cifar_resnet20_ce")
    compiled_net = copy.deepcopy(eager)
    compiled = torch.compile(compiled_net, fullgraph=True)
    x = small_input("cifar_resnet20_ce", batch=4)
    compiled(x).square().mean().backward()
    eager(x).square().mean().backward()
    for p, q in zip(compiled_net.parameters(), eager.parameters(), strict=True):
        scale = q.grad.abs().max().clamp_min(1e-3)
        torch.testing.assert_close(p.grad / scale, q.grad / scale, rtol=1e-4, atol=1e-4)
    compiled_net.eval(), eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", CE_MODELS)
def test_training_forward_on_meta_propagates_shapes(name):
    with torch.device("meta"):
        model = cenet.create_model(name, num_classes=10)
        out = model(torch.empty(2, 3, 64, 64))
    assert out.shape == (2, 10) and out.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("name", CE_MODELS)
def test_models_train_on_cuda_through_the_reference(name):
    model = build(name).cuda()
    x = small_input(name).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x).float().square().mean()
    loss.backward()
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
