"""The paper's two CNN families, their training loop and safetensors checkpoints.

- :class:`ResNet`: no down-sampling, 3x3 convolutions, ``zeros`` or ``circular`` padding.
- :class:`UNet`: three levels, optional self-attention at the coarsest one.
- :func:`train`: eps-prediction training, resumable; :func:`save` / :func:`load`: checkpoints as
  safetensors plus a JSON config (never pickles); :func:`load_network` also opens TorchScript files.
- :func:`network_classes`: whether a network is class-conditional (its number of classes);
  :func:`network_channels`: the image channels it takes.
"""

from .checkpoint import build, load, save
from .loading import load_network
from .embedding import network_channels, network_classes
from .resnet import ResNet
from .train import TrainConfig, train
from .unet import UNet

__all__ = ["ResNet", "UNet", "build", "save", "load", "load_network", "network_channels", "network_classes", "train",
           "TrainConfig"]
