"""The common way to train a VAE, as a baseline: the official PyTorch example's style.

A DataLoader over a TensorDataset of float images, a sigmoid decoder scored with
binary_cross_entropy, Adam 1e-3, batch 128, dynamic binarisation with torch.bernoulli. Run as a
script it trains for --epochs (or --seconds) and prints one JSON line: images/s of the training
pass and peak RSS; with --save it writes the weights for the likelihood benchmarks.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class ReferenceVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, 784))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def loss_function(recon_x, x, mu, logvar):
    bce = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=None, help="train for this wall time")
    parser.add_argument("--save", default=None, help="write the weights (safetensors) here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    from vaekit.data import load_dataset

    data = load_dataset("fashion-mnist", download=False)
    images = data.train_x.float().div(255).view(-1, 784)  # the usual float copy of the data
    loader = DataLoader(TensorDataset(images), batch_size=128, shuffle=True)
    model = ReferenceVAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    seen, train_seconds, epochs = 0, 0.0, 0
    started = time.perf_counter()
    while True:
        epoch_start = time.perf_counter()
        for (x,) in loader:
            x = torch.bernoulli(x)  # dynamic binarisation
            optimizer.zero_grad()
            recon, mu, logvar = model(x)
            loss = loss_function(recon, x, mu, logvar)
            loss.backward()
            optimizer.step()
            seen += len(x)
            if args.seconds is not None and time.perf_counter() - started >= args.seconds:
                break
        train_seconds += time.perf_counter() - epoch_start
        epochs += 1
        if args.seconds is not None:
            if time.perf_counter() - started >= args.seconds:
                break
        elif epochs >= args.epochs:
            break
    if args.save:
        from safetensors.torch import save_file

        save_file(model.state_dict(), args.save)
    from common import peak_rss_mib

    print(json.dumps({"images_per_second": seen / train_seconds, "images": seen,
                      "train_seconds": train_seconds, "peak_rss_mib": peak_rss_mib()}))


if __name__ == "__main__":
    main()
