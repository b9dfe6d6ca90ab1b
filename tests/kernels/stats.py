"""Statistical checks with bounds from theory."""
import torch


def max_z(samples: torch.Tensor, target: torch.Tensor, variance: torch.Tensor) -> float:
    """Largest |mean - target| / standard error over elements, the standard error coming from the
    exact per-element variance. Zero-variance elements must match to rounding (z = 0 or inf)."""
    n = samples.shape[0]
    mean = samples.double().mean(0)
    err = (mean - target.double()).abs()
    se = (variance.double() / n).sqrt()
    tol = 1e-5 * target.double().abs() + 1e-30  # fp32 rounding of kept values
    z = torch.where(se > 0, (err - tol).clamp_min(0) / se.clamp_min(1e-300), torch.where(err > tol, torch.inf, 0.0))
    return z.max().item()


def variance_z(samples: torch.Tensor, exact_total: torch.Tensor) -> float:
    """|sample variance - exact variance| / its standard error, per row of groups summed.

    ``samples`` [n, G, M]; the variance of each group is summed over its elements; the standard
    error of a sample variance is sqrt((m4 - var²)/n) with m4 the fourth central moment.
    """
    n = samples.shape[0]
    s = samples.double()
    dev = s - s.mean(0)
    var = (dev**2).mean(0).sum(-1)
    m4 = ((dev**2).sum(-1) - var).pow(2).mean(0)  # variance of the per-sample summed squared deviation
    se = (m4 / n).sqrt()
    tol = 1e-6 * (s**2).mean(0).sum(-1)  # fp32 rounding where the exact variance is 0
    err = ((var - exact_total.double()).abs() - tol).clamp_min(0)
    z = torch.where(se > 0, err / se.clamp_min(1e-300), torch.where(err > 0, torch.inf, 0.0))
    return z.max().item()
