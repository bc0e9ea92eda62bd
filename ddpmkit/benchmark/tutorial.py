"""The reference: the tutorial's fp32 eager training step and its one-image-at-a-time sampling loop,
written as the tutorial writes them (``../shared/seed``), on any denoiser and schedule."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3

from ddpmkit.interfaces import Denoiser, NoiseSchedule


class TutorialTrainer:
    """Adam, eq. 14 with ``nn.MSELoss``, ``ema.update(model)``: the tutorial's inner loop, fp32, eager."""

    def __init__(self, model: Denoiser, schedule: NoiseSchedule, lr: float = 2e-5, ema_decay: float = 0.9999) -> None:
        self.model, self.T = model, schedule.num_timesteps
        self.alpha = schedule.alphas_cumprod.float()  # the tutorial's scheduler.alpha: the cumulative product
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.ema = ModelEmaV3(model, decay=ema_decay)

    def step(self, x: torch.Tensor) -> float:
        batch = x.shape[0]
        t = torch.randint(0, self.T, (batch,), device=x.device)
        e = torch.randn_like(x, requires_grad=False)
        a = self.alpha[t].view(batch, 1, 1, 1)
        x = torch.sqrt(a) * x + torch.sqrt(1 - a) * e
        output = self.model(x, t)
        self.optimizer.zero_grad()
        loss = F.mse_loss(output, e)
        loss_value = loss.item()
        loss.backward()
        self.optimizer.step()
        self.ema.update(self.model)
        return loss_value


@torch.no_grad()
def tutorial_sample_one(
    model: Denoiser, schedule: NoiseSchedule, image_shape: tuple[int, int, int], steps: int
) -> None:
    """The first ``steps`` steps of the tutorial's inference loop for one image (batch 1, fp32)."""
    beta = schedule.betas.float()
    alpha = schedule.alphas_cumprod.float()
    device = beta.device
    z = torch.randn(1, *image_shape, device=device)
    T = schedule.num_timesteps
    for t in list(reversed(range(1, T)))[:steps]:
        temp = beta[t] / (torch.sqrt(1 - alpha[t]) * torch.sqrt(1 - beta[t]))
        z = (1 / torch.sqrt(1 - beta[t])) * z - temp * model(z, torch.tensor([t], device=device))
        e = torch.randn(1, *image_shape, device=device)
        z = z + e * torch.sqrt(beta[t])
