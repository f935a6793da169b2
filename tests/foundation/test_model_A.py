"""MambaMixer.A(): -exp(A_log), recomputed where it must be a graph node (CPU, meta, autograd) and kept
on a CUDA device until A_log changes."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mamba_rt.exporters.model import model_from_weights, random_weights  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402


def _mixer(device: str):
    cfg = tiny_config()
    seed = int(np.random.SeedSequence().entropy % 2**31)
    return model_from_weights(cfg, random_weights(cfg, "fp32", seed=seed), "fp32", device).backbone.layers[0].mixer


def test_A_is_computed_per_call_on_the_cpu_and_under_autograd():
    m = _mixer("cpu")
    with torch.no_grad():
        a, b = m.A(), m.A()
    assert a is not b and a.dtype == torch.float32
    assert torch.equal(a, -torch.exp(m.A_log))
    m.A_log.requires_grad_(True)
    g = m.A()
    assert g.requires_grad, "under autograd A must stay differentiable in A_log"
    g.sum().backward()
    assert torch.allclose(m.A_log.grad, -torch.exp(m.A_log.detach()))


@pytest.mark.gpu
def test_A_is_kept_on_cuda_until_A_log_changes():
    m = _mixer("cuda")
    with torch.no_grad():
        a = m.A()
        assert m.A() is a and torch.equal(a, -torch.exp(m.A_log))
        m.A_log.add_(0.25)  # in place: a new version of the same storage
        b = m.A()
        assert b is not a and torch.equal(b, -torch.exp(m.A_log))
        m.A_log.data = m.A_log.data.clone() - 0.5  # new storage
        c = m.A()
        assert c is not b and torch.equal(c, -torch.exp(m.A_log))
    m.A_log.requires_grad_(True)
    assert m.A().requires_grad and m.A() is not m.A()


@pytest.mark.gpu
def test_A_under_graph_capture():
    """A capture computes A inside the graph unless it was kept before; it never keeps one made there."""
    m = _mixer("cuda")
    out = torch.empty_like(m.A_log)
    side = torch.cuda.Stream()
    with torch.no_grad():
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=side):
            out.copy_(m.A())
        assert m._A is None, "a tensor made during capture must not be kept"
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, -torch.exp(m.A_log))
        kept = m.A()  # outside capture: kept, then used by the next capture as it is
        g2 = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g2, stream=side):
            a2 = m.A()
            out.copy_(a2)
        assert a2 is kept
