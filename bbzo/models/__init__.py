"""Models shipped with bbzo, by name."""

from .registry import create_model, list_models, register_model
from .resnet_cifar import CifarResNet, resnet20, resnet32, resnet44, resnet56
from .simple import mlp, simple_cnn

__all__ = ["create_model", "list_models", "register_model", "CifarResNet", "resnet20", "resnet32",
           "resnet44", "resnet56", "simple_cnn", "mlp"]
