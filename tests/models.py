"""Small models shared by the tests, with dims that are multiples of 4 unless a test says otherwise."""
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel


class MLP(nn.Module):
    def __init__(self, sizes=(32, 64, 16, 8)):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = (nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean((2, 3)))


class AddmmLayer(nn.Module):
    """A layer written as addmm(b, x, W) with W stored [in, out]: its weight gradient is x.T @ dY,
    with the neural gradient as the *right* operand."""

    def __init__(self, d_in=16, d_out=8):
        super().__init__()
        self.W = nn.Parameter(torch.randn(d_in, d_out) / d_in**0.5)
        self.b = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return torch.addmm(self.b, x, self.W)


class Encoder(nn.Module):
    """nn.TransformerEncoderLayer with attention in the math backend, so its bmm's are visible."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=0.0, batch_first=True)

    def forward(self, x):
        with sdpa_kernel(SDPBackend.MATH):
            return self.layer(x)
