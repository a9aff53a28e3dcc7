"""The Chebyshev KAN layer against numpy's Chebyshev series, its gradients and its initialisation."""

import math

import numpy as np
import pytest
import torch
from numpy.polynomial import chebyshev

from mini_kd import MiniKDError
from mini_kd.kan import ChebyKAN, chebyshev_basis


def layer(in_dim=3, out_dim=2, degree=4, init="xavier", seed=0):
    torch.manual_seed(seed)
    return ChebyKAN(in_dim, out_dim, degree, init=init).double()


def numpy_kan(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """y_o = Σ_i chebval(tanh x_i, c[i, o, :]), one edge at a time: (..., in) -> (..., out)."""
    t = np.tanh(x)
    in_dim, out_dim, _ = c.shape
    return np.stack([sum(chebyshev.chebval(t[..., i], c[i, o]) for i in range(in_dim))
                     for o in range(out_dim)], axis=-1)


@pytest.mark.parametrize("degree", [0, 1, 12])
@pytest.mark.parametrize("shape", [(5, 3), (2, 4, 3)], ids=["[B, in]", "[B, N, in]"])
def test_chebykan_equals_a_sum_of_chebyshev_series_of_tanh(degree, shape):
    kan = layer(degree=degree)
    x = 2 * torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = kan(x)
    assert y.shape == (*shape[:-1], 2)
    np.testing.assert_allclose(y.detach().numpy(),
                               numpy_kan(x.numpy(), kan.coefficients.detach().numpy()), rtol=1e-10)


def test_chebyshev_basis_follows_the_closed_form_cos_k_theta():
    x = torch.linspace(-1, 1, 11, dtype=torch.float64)
    T = chebyshev_basis(x, 6)  # (11, 7)
    closed_form = torch.cos(torch.arange(7) * torch.arccos(x)[:, None])  # T_k(cos θ) = cos kθ
    torch.testing.assert_close(T, closed_form)


def test_edge_functions_add_up_to_the_layer_output():
    kan = layer(degree=5)
    x = torch.randn(7, 3, dtype=torch.float64)
    for o in range(2):
        total = sum(kan.edge_function(x[:, i], i, o) for i in range(3))
        torch.testing.assert_close(total, kan(x)[:, o])


def test_chebykan_gradients_match_finite_differences():
    kan = layer(in_dim=2, out_dim=2, degree=5)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    c = kan.coefficients.detach().clone().requires_grad_(True)  # (2, 2, 6)

    def kan_of(x, c):
        return torch.func.functional_call(kan, {"coefficients": c}, (x,))

    assert torch.autograd.gradcheck(kan_of, (x, c))


def test_same_seed_same_coefficients_and_another_seed_differs():
    torch.testing.assert_close(layer(seed=3).coefficients, layer(seed=3).coefficients)
    assert not torch.equal(layer(seed=3).coefficients, layer(seed=4).coefficients)


@pytest.mark.parametrize("init, std", [("xavier", math.sqrt(2 / ((512 + 4) * 13))),
                                       ("normal", 1 / (512 * 13))])
def test_initialisation_has_the_documented_spread(init, std):
    c = layer(in_dim=512, out_dim=4, degree=12, init=init).coefficients  # 26,624 draws
    assert c.shape == (512, 4, 13)
    assert c.std().item() == pytest.approx(std, rel=0.03)
    assert abs(c.mean().item()) < 3 * std / math.sqrt(c.numel())


def test_chebykan_refuses_bad_options_and_inputs():
    with pytest.raises(MiniKDError, match="init"):
        ChebyKAN(4, 1, 12, init="xaiver")
    with pytest.raises(MiniKDError, match="degree"):
        ChebyKAN(4, 1, -1)
    with pytest.raises(MiniKDError, match=r"\(\.\.\., 4\)"):
        ChebyKAN(4, 1, 3)(torch.zeros(2, 5))
