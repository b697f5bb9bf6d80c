"""FID pieces against a direct numpy/scipy computation, and the tiny TorchScript extractor path."""
import numpy as np
import pytest
import scipy.linalg

from dmdr.errors import UserError
from dmdr.evaluation import fid
from helpers_eval import write_tiny_extractor


def _reference_fid(mu1, s1, mu2, s2):
    """The textbook formula with scipy's general matrix square root (as pytorch-fid computes it)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_statistics_and_distance_match_numpy_and_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(loc=0.3, size=(150, 6)) @ rng.normal(size=(6, 6))
    mu_a, s_a = fid.statistics(a)
    np.testing.assert_allclose(mu_a, a.mean(axis=0))
    np.testing.assert_allclose(s_a, np.cov(a.T))
    mu_b, s_b = fid.statistics(b)
    assert fid.frechet_distance(mu_a, s_a, mu_b, s_b) == pytest.approx(_reference_fid(mu_a, s_a, mu_b, s_b), rel=1e-8)


def test_identical_sets_give_zero_and_shifted_gaussians_the_closed_form():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(500, 5))
    mu, sigma = fid.statistics(feats)
    assert fid.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-9)
    assert fid.frechet_distance(*fid.statistics(feats + 2.0), mu, sigma) == pytest.approx(5 * 4.0, rel=1e-9)
    # N(m1, a^2 I) vs N(m2, b^2 I) in d dims: |m1 - m2|^2 + d (a - b)^2
    d, a, b = 4, 2.0, 0.5
    m1, m2 = np.zeros(d), np.full(d, 1.5)
    got = fid.frechet_distance(m1, a * a * np.eye(d), m2, b * b * np.eye(d))
    assert got == pytest.approx(d * 1.5 ** 2 + d * (a - b) ** 2, rel=1e-12)


def test_singular_covariances_fewer_images_than_features():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(5, 16)), rng.normal(size=(7, 16)) + 0.1
    got = fid.frechet_distance(*fid.statistics(x), *fid.statistics(y))
    assert got == pytest.approx(_reference_fid(*fid.statistics(x), *fid.statistics(y)), rel=1e-6)


def test_stats_npz_round_trip_and_errors(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    path = fid.save_stats(tmp_path / "ref.npz", mu, sigma, count=10)
    got_mu, got_sigma = fid.load_stats(path)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(UserError, match="'mu' and 'sigma'"):
        fid.load_stats(tmp_path / "bad.npz")
    with pytest.raises(UserError, match="no such file"):
        fid.load_stats(tmp_path / "none.npz")
    with pytest.raises(UserError, match="do not match"):
        fid.frechet_distance(mu, sigma, np.zeros(2), np.eye(2))


def test_tiny_torchscript_extractor_through_the_real_loader(tmp_path):
    from helpers_rewards import colour_images, write_pngs

    model = fid.load_extractor(write_tiny_extractor(tmp_path / "tiny.pt"))
    images, _ = colour_images(size=24)
    feats = fid.features(model, images)
    assert feats.shape == (4, 8) and feats.dtype == np.float64
    # the images folder path gives the same statistics as the tensors (PNG is 8-bit, as features quantise)
    write_pngs(tmp_path / "imgs", images, [f"{i}.png" for i in range(4)])
    mu, sigma, count = fid.image_dir_stats(tmp_path / "imgs", model, batch_size=3)
    ref_mu, ref_sigma = fid.statistics(feats)
    assert count == 4
    np.testing.assert_allclose(mu, ref_mu, atol=1e-5)
    np.testing.assert_allclose(sigma, ref_sigma, atol=1e-5)
    with pytest.raises(UserError, match="no such file"):
        fid.load_extractor(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a TorchScript"):
        fid.load_extractor(tmp_path / "junk.pt")
    with pytest.raises(UserError, match="at least 2 images"):
        fid.statistics(feats[:1])
