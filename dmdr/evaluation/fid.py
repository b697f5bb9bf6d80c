"""FID: Inception features -> mean and covariance -> Frechet distance, and .npz statistics.

The feature extractor is a TorchScript file with the call signature of the FID Inception of
StyleGAN2-ADA and clean-fid (``inception-2015-12-05.pt``, the weights group ``fid`` of
``dmdr/assets/weights.yaml``): ``model(x, return_features=True)`` on NCHW images in the 0..255
range, any size (it resizes to 299 itself), giving one feature row per image (2048 for Inception).
It loads from a local file only. The distance is computed with numpy alone:

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

where tr((S1 S2)^(1/2)) = tr((A S2 A)^(1/2)), A = S1^(1/2): A S2 A is symmetric positive
semi-definite, so its square root's trace is the sum of the square roots of its eigenvalues
(``eigvalsh``: no complex round-off as with a general ``sqrtm``).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dmdr.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import torch

WEIGHTS_NAME = "inception-2015-12-05.pt"


def load_extractor(path: str | Path, device: "torch.device | str" = "cpu") -> "torch.jit.ScriptModule":
    """The TorchScript feature extractor in `path` (a local file), in eval mode on `device`."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--inception {path}: no such file; fetch it with `dmdr weights fetch --groups fid` "
                        f"({WEIGHTS_NAME}) or pass its path")
    try:
        model = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--inception {path}: not a TorchScript feature extractor ({str(e).splitlines()[0]})") from None
    return model.eval()


def features(model, images: "torch.Tensor") -> "np.ndarray":
    """Feature rows (float64) of `images` in [0, 1], quantised to 8 bits as a saved PNG would be."""
    import torch

    device = next(iter(model.parameters()), torch.empty(0)).device
    x = (images.clamp(0, 1) * 255).round().to(device=device, dtype=torch.float32)
    with torch.no_grad():
        out = model(x, return_features=True)
    return out.reshape(len(images), -1).double().cpu().numpy()


def statistics(feats: "np.ndarray") -> tuple["np.ndarray", "np.ndarray"]:
    """(mean, covariance) of feature rows; the covariance is unbiased (N - 1), as np.cov."""
    import numpy as np

    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise UserError(f"FID needs at least 2 images, got {len(feats)}: raise --num-images (or add reference images)")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _psd_sqrt(matrix: "np.ndarray") -> "np.ndarray":
    import numpy as np

    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID on Inception features)."""
    import numpy as np

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise UserError(f"FID statistics do not match: {mu1.shape[0]}-d and {mu2.shape[0]}-d features "
                        "(reference statistics from another feature extractor?)")
    root = _psd_sqrt(sigma1)
    cross = np.linalg.eigvalsh(root @ sigma2 @ root)
    trace_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt, 0.0))


def save_stats(path: str | Path, mu, sigma, count: int) -> Path:
    """Write ``mu``, ``sigma`` (the keys clean-fid and pytorch-fid use) and ``count`` to an .npz, atomically."""
    import os

    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma, count=np.int64(count))
    os.replace(tmp, path)
    return path


def load_stats(path: str | Path) -> tuple["np.ndarray", "np.ndarray"]:
    """(mu, sigma) of an .npz with those keys (ours, clean-fid's or pytorch-fid's)."""
    import numpy as np

    path = Path(path)
    try:
        with np.load(path) as data:
            return data["mu"], data["sigma"]
    except FileNotFoundError:
        raise UserError(f"--ref-stats {path}: no such file") from None
    except (KeyError, ValueError, OSError) as e:
        raise UserError(f"--ref-stats {path}: not an .npz with 'mu' and 'sigma' ({e})") from None


def image_dir_stats(directory: Path, model, batch_size: int) -> tuple["np.ndarray", "np.ndarray", int]:
    """(mu, sigma, count) of the images of a folder (png/jpg/webp, any sizes: batched by size)."""
    import numpy as np
    import torch

    from dmdr.score import list_images, load_image

    files = list_images(Path(directory))
    rows = []
    for start in range(0, len(files), batch_size):
        by_size: dict[tuple, list] = {}
        for f in files[start:start + batch_size]:
            img = load_image(f)
            by_size.setdefault(tuple(img.shape), []).append(img)
        rows += [features(model, torch.stack(group)) for group in by_size.values()]
    mu, sigma = statistics(np.concatenate(rows))
    return mu, sigma, len(files)
