import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from florain.projection import hinge_loss, mahalanobis, mahalanobis_sq, project, projection_distance


def _problem(seed: int, dim: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    cov = a @ a.T + 0.1 * torch.eye(dim, dtype=torch.float64)
    precision = torch.linalg.inv(cov)
    centre = torch.randn(dim, generator=g, dtype=torch.float64)
    return g, precision, centre


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), dim=st.integers(1, 6), rho=st.floats(0.05, 5.0), scale=st.floats(0.01, 10.0))
def test_projection_lands_in_ellipsoid_and_is_closest(seed, dim, rho, scale):
    g, precision, centre = _problem(seed, dim)
    rho_t = torch.tensor(rho, dtype=torch.float64)
    x = centre + scale * torch.randn(dim, generator=g, dtype=torch.float64)
    p = project(x, centre, precision, rho_t)
    assert mahalanobis_sq(p, centre, precision) <= rho * (1 + 1e-9)
    d_proj = torch.sqrt(mahalanobis_sq(x, p, precision))
    # closed form distance agrees
    assert torch.isclose(d_proj, projection_distance(x, centre, precision, rho_t), atol=1e-6)
    # no point of the ellipsoid is closer (random points on and inside the boundary)
    u = torch.randn(500, dim, generator=g, dtype=torch.float64)
    chol = torch.linalg.cholesky(torch.linalg.inv(precision))
    u = u / u.norm(dim=1, keepdim=True) * torch.rand(500, 1, generator=g, dtype=torch.float64) ** (1 / dim)
    pts = centre + (u @ chol.T) * rho**0.5
    assert (mahalanobis_sq(pts, centre, precision) <= rho * (1 + 1e-9)).all()
    d_pts = torch.sqrt(mahalanobis_sq(pts, x.expand_as(pts), precision))
    assert (d_pts >= d_proj - 1e-9).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), dim=st.integers(1, 6), rho=st.floats(0.5, 5.0))
def test_point_inside_is_unchanged(seed, dim, rho):
    g, precision, centre = _problem(seed, dim)
    cov = torch.linalg.inv(precision)
    direction = torch.randn(dim, generator=g, dtype=torch.float64)
    direction = direction / torch.sqrt(mahalanobis_sq(direction, torch.zeros(dim, dtype=torch.float64), precision))
    x = centre + 0.9 * rho**0.5 * direction
    rho_t = torch.tensor(rho, dtype=torch.float64)
    assert torch.equal(project(x, centre, precision, rho_t), x)
    assert projection_distance(x, centre, precision, rho_t) == 0
    del cov


def test_hinge_loss_gradient_matches_finite_differences():
    _, precision, centre = _problem(3, 4)
    rho = torch.tensor(0.7, dtype=torch.float64)
    x = (centre + 3 * torch.ones(4, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: hinge_loss(z, centre, precision, rho), (x,), eps=1e-6, atol=1e-5)


def test_mahalanobis_of_identity_is_euclidean():
    x, c = torch.tensor([3.0, 4.0]), torch.zeros(2)
    assert torch.isclose(mahalanobis(x, c, torch.eye(2)), torch.tensor(5.0))
