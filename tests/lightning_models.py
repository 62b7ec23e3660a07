"""A tiny LightningModule on the bundled MNIST for the Lightning integration tests."""

import lightning.pytorch as pl
import torch
from torch import nn

from sparseopt.data import load_bundled_mnist


class MNISTNet(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))
        self.losses = []

    def training_step(self, batch, index):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.losses.append(float(loss))
        return loss

    def test_step(self, batch, index):
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def mnist_loader(n=1024, batch_size=64):
    """The first ``n`` bundled training images, in a fixed order (a resume then sees the same batches)."""
    x, y = load_bundled_mnist(True)
    data = torch.utils.data.TensorDataset(x[:n].float(), y[:n])
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)


def trainer(root, callbacks, **options):
    settings = dict(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=str(root), deterministic=True)
    settings.update(options)
    return pl.Trainer(callbacks=callbacks, **settings)
