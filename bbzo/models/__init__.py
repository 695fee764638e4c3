"""Models shipped with bbzo, by name (``create_model``, ``list_models``; ``bbzo models`` lists them)."""

from .registry import create_model, list_models, register_model
from .resnet_cifar import CifarResNet, resnet20, resnet32, resnet44, resnet56
from .dncnn import DnCNN, dncnn
from .simple import SIMPLE_CNN_SIZES, mlp, simple_cnn
from .sol_corrector import CORRECTOR_CHANNELS, Corrector, sol_corrector

__all__ = ["create_model", "list_models", "register_model", "CifarResNet", "resnet20", "resnet32",
           "resnet44", "resnet56", "simple_cnn", "SIMPLE_CNN_SIZES", "mlp", "Corrector", "CORRECTOR_CHANNELS", "sol_corrector",
           "DnCNN", "dncnn"]
